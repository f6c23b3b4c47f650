"""Every Triton launch goes through ``ops.utils.launch``: on the tensors' device, with the
multiply-add contraction setting given explicitly (so a kernel's bits do not change when Triton
changes its default), and this test says which setting each kernel uses."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TRITON_DEVICE

import clisonix_gpu as cg
from clisonix_gpu.kernels import binary as binary_kernels
from clisonix_gpu.kernels import svd_compress as svd_kernels
from clisonix_gpu.kernels import transform_matrix as transform_matrix_kernels
from clisonix_gpu.ops import utils

# The setting each kernel is launched with: FMA contraction on (one rounding per multiply-add).
FP_FUSION_BY_KERNEL = {
    "transform_matrix_kernel": True,
    "sketch_matmul_kernel": True,
    "householder_qr_kernel": True,
    "pack_bits_kernel": True,
    "unpack_bits_kernel": True,
    "popcount_gemm_kernel": True,
}


class _Recorder:
    """Stands in for a kernel object: records the launch options, then launches the real kernel."""

    def __init__(self, name, kernel, seen):
        self.name, self.kernel, self.seen = name, kernel, seen

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.seen.setdefault(self.name, []).append(kwargs.get("enable_fp_fusion"))
            return self.kernel[grid](*args, **kwargs)

        return run


@pytest.fixture
def launches(monkeypatch):
    seen: dict[str, list[object]] = {}
    for module in (transform_matrix_kernels, svd_kernels, binary_kernels):
        for name in FP_FUSION_BY_KERNEL:
            if hasattr(module, name):
                monkeypatch.setattr(module, name, _Recorder(name, getattr(module, name), seen))
    return seen


def test_every_kernel_is_launched_with_its_fp_fusion_setting(rng, launches):
    def t(a):
        return torch.from_numpy(np.ascontiguousarray(a)).to(TRITON_DEVICE)

    x, w = t(rng.standard_normal((5, 9)).astype(np.float32)), t(rng.standard_normal((3, 9)).astype(np.float32))
    bits = t(np.packbits(rng.random((6, 20)) > 0.5, axis=-1, bitorder="little"))
    with cg.use_backend("triton"):
        cg.transform_matrix(x, w, activation="relu")
        cg.svd_compress(t(rng.standard_normal((2, 12, 10)).astype(np.float32)), k=2, power_iters=1)
        cg.unpack_bits(cg.pack_bits(x), 9)
        cg.binary_matmul(bits, bits, 20)
    assert set(launches) == set(FP_FUSION_BY_KERNEL), "a kernel was not launched, or one launched without utils.launch"
    for name, settings in launches.items():
        assert settings == [FP_FUSION_BY_KERNEL[name]] * len(settings), (name, settings)
    assert utils.FP_FUSION is True


def test_no_launcher_calls_a_kernel_directly():
    """Host code reaches Triton kernels only through ``utils.launch`` (``kernel[grid](...)`` nowhere else)."""
    ops_dir = Path(utils.__file__).parent
    for path in ops_dir.rglob("*.py"):
        if path.name == "utils.py":
            continue
        assert not re.search(r"_kernel\s*\[", path.read_text()), path
