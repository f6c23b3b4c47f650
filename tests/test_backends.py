"""The backend layer: what is usable, how a backend is chosen, and the errors when it cannot run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import HAS_CUDA

import clisonix_gpu as cg
from clisonix_gpu import _dispatch


def test_backends_lists_every_backend_with_reasons():
    statuses = {b.name: b for b in cg.backends()}
    assert set(statuses) == {"numpy", "triton", "cupy"}
    assert statuses["numpy"].usable and statuses["numpy"].reason == ""
    for b in statuses.values():
        assert b.usable == (b.reason == ""), b


def test_use_backend_nests_and_restores():
    assert cg.current_backend() in ("auto", "numpy", "triton", "cupy")
    outer = cg.current_backend()
    with cg.use_backend("numpy"):
        assert cg.current_backend() == "numpy"
        with cg.use_backend("auto"):
            assert cg.current_backend() == "auto"
        assert cg.current_backend() == "numpy"
    assert cg.current_backend() == outer


def test_unknown_backend_name_lists_choices():
    with pytest.raises(ValueError, match="triton"):
        with cg.use_backend("opencl"):
            pass


def test_environment_variable_sets_default(monkeypatch):
    monkeypatch.setenv("CLISONIX_BACKEND", "numpy")
    assert cg.current_backend() == "numpy"
    monkeypatch.setenv("CLISONIX_BACKEND", "fpga")
    with pytest.raises(ValueError, match="CLISONIX_BACKEND"):
        cg.current_backend()


def test_auto_choice_by_array_kind():
    assert _dispatch.select_backend("numpy") == "numpy"
    assert _dispatch.select_backend("torch-cpu") == "numpy"


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU-only message")
def test_triton_on_cpu_without_interpreter_says_why(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(cg.BackendUnavailable, match="TRITON_INTERPRET"):
        with cg.use_backend("triton"):
            pass


def test_cupy_backend_rejects_other_arrays():
    if not cg.backends()[2].usable:
        pytest.skip("CuPy is not usable here")
    with cg.use_backend("cupy"), pytest.raises(cg.BackendUnavailable, match="CuPy arrays"):
        cg.transform_matrix(np.ones((2, 2), np.float32), np.ones((2, 2), np.float32))


def test_numpy_backend_serves_torch_tensors_and_returns_tensors():
    x, w = torch.randn(3, 4), torch.randn(5, 4)
    with cg.use_backend("numpy"):
        y = cg.transform_matrix(x, w)
    assert isinstance(y, torch.Tensor) and y.dtype == torch.float32 and y.shape == (3, 5)


def test_unsupported_array_types_rejected():
    with pytest.raises(TypeError, match="numpy.ndarray"):
        cg.transform_matrix([[1.0]], [[1.0]])


def test_errors_are_the_documented_types():
    assert issubclass(cg.ShapeError, ValueError)
    assert issubclass(cg.BackendUnavailable, RuntimeError)
