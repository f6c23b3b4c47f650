"""The dot-product method for weights of at most 15 outputs: accuracy against float64, batch
invariance where the other tests' sweeps do not reach (large batches split over threads,
misaligned rows, threads calling at once), its check, its bias, and when it serves a case."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from packed_helpers import run_at_once

import clisonix_gpu as cg
from clisonix_gpu.ops import _dot_rows, _numba_gemm
from clisonix_gpu.ops.transform_matrix import layer_call_shortcut

pytestmark = pytest.mark.skipif(_numba_gemm.dot_kernel() is None, reason="numba cannot compile the dot-product kernel here")


def _same(a, b):
    return np.array_equal(a.numpy().view(np.uint32), b.numpy().view(np.uint32))


def _data(rng, m, k, n):
    x = torch.from_numpy(rng.standard_normal((m, k), dtype=np.float32))
    w = torch.from_numpy((rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float32))
    b = torch.from_numpy(rng.standard_normal(n, dtype=np.float32))
    return x, w, b


@pytest.mark.parametrize("k", [1, 7, 16, 127, 129, 4096])
@pytest.mark.parametrize("n", [1, 3, 4, 7, 15])
def test_error_against_float64_within_twice_numpys(rng, k, n):
    x, w, b = _data(rng, 129, k, n)
    assert cg.transform_matrix_cpu_method(k, n).startswith("compiled dot products")
    ours = cg.transform_matrix(x, w, b).double()
    exact = x.double() @ w.double().T + b.double()
    numpy_sgemm = torch.from_numpy(x.numpy() @ w.numpy().T + b.numpy()).double()
    scale = float(exact.abs().max())
    assert float((ours - exact).abs().max()) <= 2 * float((numpy_sgemm - exact).abs().max()) + 1e-7 * scale


@pytest.mark.parametrize("m", [0, 1, 7])
def test_small_and_empty_batches(rng, m):
    x, w, b = _data(rng, m, 33, 5)
    out = cg.transform_matrix(x, w, b, "relu")
    assert out.shape == (m, 5) and out.dtype == torch.float32
    expected = torch.relu(x.double() @ w.double().T + b.double())
    assert torch.allclose(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_a_large_batch_split_over_threads_keeps_every_rows_bits(rng):
    """A batch of 2^22 multiply-adds or more runs in one piece of rows per torch thread: its rows
    have the bits of the same rows in small batches, under any thread count."""
    x, w, b = _data(rng, 1501, 700, 15)
    assert 1501 * 700 * 15 >= _dot_rows.SPLIT_MACS
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        full = cg.transform_matrix(x, w, b, "gelu")
        torch.set_num_threads(1)
        assert _same(cg.transform_matrix(x, w, b, "gelu"), full)
    finally:
        torch.set_num_threads(before)
    for start, rows in ((0, 1), (750, 3), (1497, 4), (333, 17)):
        assert _same(cg.transform_matrix(x[start : start + rows], w, b, "gelu"), full[start : start + rows])


def test_misaligned_and_strided_inputs_give_the_same_rows(rng):
    x, w, b = _data(rng, 40, 129, 9)
    full = cg.transform_matrix(x, w, b, "tanh")
    flat = torch.empty(40 * 129 + 1)
    shifted = flat[1:].view(40, 129)  # rows one float off their alignment
    shifted.copy_(x)
    assert _same(cg.transform_matrix(shifted, w, b, "tanh"), full)
    strided = torch.empty(40, 2 * 129)[:, ::2]
    strided.copy_(x)
    assert _same(cg.transform_matrix(strided, w, b, "tanh"), full)
    assert _same(cg.transform_matrix(x, w.t().contiguous().t(), b, "tanh"), full)  # a strided weight


def test_a_bias_the_kernel_cannot_read_is_added_alike(rng):
    """A strided bias, or a negative view of one, is added by torch: the same bits as a dense bias."""
    x, w, b = _data(rng, 30, 20, 6)
    full = cg.transform_matrix(x, w, b)
    assert _same(full, cg.transform_matrix(x, w, None) + b)
    strided = torch.empty(12)[::2]
    strided.copy_(b)
    assert _same(cg.transform_matrix(x, w, strided), full)
    negated = torch.complex(torch.zeros(6), -b).conj().imag  # a negative view holding -b's values negated
    assert negated.is_neg() and _same(cg.transform_matrix(x, w, negated), full)


def test_threads_calling_at_once_get_the_batch_bits(rng):
    x, w, b = _data(rng, 64, 300, 12)
    full = cg.transform_matrix(x, w, b, "silu")
    failures = []

    def call(start: int) -> None:
        for _ in range(50):
            if not _same(cg.transform_matrix(x[start : start + 3], w, b, "silu"), full[start : start + 3]):
                failures.append(start)

    run_at_once(call, (0, 11, 29, 61))
    assert failures == []


def test_the_check_rejects_a_kernel_that_rounds_by_position(monkeypatch):
    """The check is not vacuous: a kernel whose last row of a call rounds differently fails it, and
    the case goes to the next method."""
    real = _numba_gemm.dot_kernel()

    def last_row_bumped(address, x_at, w_at, out_at, m, k, n, bias_at):
        real.call(address, x_at, w_at, out_at, m, k, n, bias_at)
        out = np.ctypeslib.as_array((np.ctypeslib.ctypes.c_float * (m * n)).from_address(out_at))
        out[-n:] = np.nextafter(out[-n:], np.inf)

    monkeypatch.setattr(_dot_rows, "dot_kernel", lambda: real._replace(call=last_row_bumped))
    monkeypatch.setattr(_dot_rows, "_verdicts", {})
    assert not _dot_rows._check(33, 5)
    assert "compiled dot products" not in cg.transform_matrix_cpu_method(33, 5)


def test_which_cases_it_serves(monkeypatch):
    assert cg.transform_matrix_cpu_method(256, 15).startswith("compiled dot products")
    assert cg.transform_matrix_cpu_method(256, 15, torch.bfloat16).startswith("compiled dot products")
    assert not cg.transform_matrix_cpu_method(256, 16).startswith("compiled dot products")
    assert not cg.transform_matrix_cpu_method(256, 15, np.float64).startswith("compiled dot products")
    monkeypatch.setenv("CLISONIX_NUMBA", "0")  # no compiled path: the next method serves the case
    assert not cg.transform_matrix_cpu_method(256, 15).startswith("compiled dot products")
    monkeypatch.setenv("CLISONIX_NUMBA", "1")
    monkeypatch.setenv("CLISONIX_CPU_GEMM", "tiles")
    assert not cg.transform_matrix_cpu_method(256, 15).startswith("compiled dot products")


def test_layers_take_it_through_their_shortcut_with_the_general_paths_bits(rng):
    """A narrow layer and a low-rank layer of small rank run the dot products in their shortcut:
    the bits of the general path, for every batch size tried."""
    torch.manual_seed(0)
    head = cg.nn.LIAMLinear(64, 10, activation="tanh")
    low = cg.nn.LowRankLinear(64, 40, 6, activation="gelu")
    x = torch.from_numpy(rng.standard_normal((37, 64), dtype=np.float32))
    with torch.no_grad():
        full_head, full_low = head(x), low(x)
        assert layer_call_shortcut(x, head.weight, head.bias, "tanh") is not None
        assert _same(full_head, cg.transform_matrix(x, head.weight.detach(), head.bias.detach(), "tanh"))
        hidden = cg.transform_matrix(x, low.first.detach())
        assert _same(full_low, cg.transform_matrix(hidden, low.second.detach(), low.bias.detach(), "gelu"))
        for start, rows in ((0, 1), (5, 2), (30, 7)):
            assert _same(head(x[start : start + rows]), full_head[start : start + rows])
            assert _same(low(x[start : start + rows]), full_low[start : start + rows])


def test_a_negative_view_weight_is_read_as_its_values(rng):
    """A weight that is a negative view (its memory holds the unnegated values) gives the product
    with its values, through the layer shortcut's checks and the general path alike."""
    x, w, b = _data(rng, 12, 40, 6)
    negated = torch.complex(torch.zeros(6, 40), -w).conj().imag  # reads as w, memory holds -w
    assert negated.is_neg()
    expected = cg.transform_matrix(x, w, b, "relu")
    with torch.no_grad():
        assert layer_call_shortcut(x, negated, b, "relu") is None
        assert _same(cg.transform_matrix(x, negated, b, "relu"), expected)
