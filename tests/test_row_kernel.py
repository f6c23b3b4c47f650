"""The row kernel: a few rows times a large packed weight, rounded as MKL's four-row packed kernel
does on AMD Zen 4, used only where the packed check finds every bit equal."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from packed_helpers import empty_cache, run_at_once, same  # noqa: F401 (empty_cache: an autouse fixture)

import clisonix_gpu as cg
from clisonix_gpu.ops import _packed_gemm, _row_kernel

pytestmark = pytest.mark.skipif(_row_kernel.kernel() is None, reason="numba cannot compile the row kernel here")


def _blocked_fma_reference(x: np.ndarray, w: np.ndarray, kc: int) -> np.ndarray:
    """Per output: a chain of fused multiply-adds over each block of ``kc`` values of K, from zero,
    each block's sum added to the running total in order; float32 rounding emulated in long double
    (the product of two float32 values is exact there)."""
    out = np.empty((x.shape[0], w.shape[0]), np.float32)
    for r in range(x.shape[0]):
        for j in range(w.shape[0]):
            total = np.float32(0)
            for start in range(0, x.shape[1], kc):
                acc = np.float32(0)
                for a, b in zip(x[r, start : start + kc], w[j, start : start + kc]):
                    acc = np.float32(np.longdouble(a) * np.longdouble(b) + np.longdouble(acc))
                total = np.float32(total + acc)
            out[r, j] = total
    return out


@pytest.mark.parametrize("k,n,kc", [(50, 70, 16), (50, 70, 50), (129, 1, 48), (7, 130, 3)])
def test_rows_sum_k_in_blocks_of_fused_multiply_adds(rng, k, n, kc):
    """N not a multiple of the 64-output blocks, blocks that do not divide K, one block, N = 1."""
    x = rng.standard_normal((3, k), dtype=np.float32)
    w = rng.standard_normal((n, k), dtype=np.float32)
    got = _row_kernel.rows_blocked(torch.from_numpy(x), _row_kernel.blocked_copy(torch.from_numpy(w)), n, kc)
    assert got.shape == (3, n) and got.is_contiguous()
    assert same(got, _blocked_fma_reference(x, w, kc))


def test_the_check_takes_the_block_length_whose_rows_match_and_none_otherwise(rng):
    """``_row_kernel_block`` returns the first block length that gives the reference's bits for
    every batch of 1 to 3 rows it tries, and 0 where no length does (or the case does not pad)."""
    n, k = 2048, 1024  # 8 MiB: the smallest weight the row kernel serves
    w = torch.randn(n, k)
    rows = torch.randn(20, k)
    case = _packed_gemm.PackedCase(1024, 256, row_multiple=4)
    blocked = _row_kernel.blocked_copy(w)
    for kc in (128, 96):  # first in the tried order, and a length the order reaches late
        reference = _row_kernel.rows_blocked(rows, blocked, n, kc)
        assert _packed_gemm._row_kernel_block(w, rows, reference, case) == kc
    exact = (rows.double() @ w.double().T).float()
    assert _packed_gemm._row_kernel_block(w, rows, exact, case) == 0
    assert _packed_gemm._row_kernel_block(w, rows, reference, case._replace(row_multiple=1)) == 0


def test_a_case_with_the_row_kernel_runs_few_rows_through_it_with_the_batch_bits(rng, monkeypatch):
    """Where this machine's check gave a case the row kernel (AMD Zen 4's MKL), batches of fewer
    rows than the case's multiple make no MKL call and keep the bits of the rows in a large batch."""
    k, n = 1100, 2048
    case = _packed_gemm.packed_ok(k, n, torch.float32)
    if case is None or not case.row_kernel_kc:
        pytest.skip("this machine's MKL rounds small batches as large ones: no row kernel needed")
    w = torch.from_numpy(rng.standard_normal((n, k), dtype=np.float32))
    b = torch.from_numpy(rng.standard_normal(n, dtype=np.float32))
    x = torch.from_numpy(rng.standard_normal((64, k), dtype=np.float32))
    full = cg.transform_matrix(x, w, b, "gelu")
    calls, real = [], _packed_gemm.packed_compute
    monkeypatch.setattr(_packed_gemm, "packed_compute", lambda x, pack, w: calls.append(x.shape[0]) or real(x, pack, w))
    for rows in range(1, case.row_multiple):
        for start in (0, 13, 64 - rows):
            assert same(cg.transform_matrix(x[start : start + rows], w, b, "gelu"), full[start : start + rows])
    assert same(cg.transform_matrix(x[:5], w, b, "gelu"), full[:5])
    assert calls == []  # the compiled caller runs MKL itself
    monkeypatch.setenv("CLISONIX_NUMBA", "0")  # no compiled CPU path: each batch runs as one padded call, same bits
    assert same(cg.transform_matrix(x[13:14], w, b, "gelu"), full[13:14]) and calls == [case.row_multiple]
    assert same(cg.transform_matrix(x[:5], w, b, "gelu"), full[:5]) and calls == [case.row_multiple, -(-5 // case.row_multiple) * case.row_multiple]


def test_threads_calling_at_once_get_the_batch_bits(rng):
    """Several threads running few-row batches of one large weight at once (the kernel runs one
    call at a time): every row keeps the bits it has in a large batch."""

    k, n = 1100, 2048
    w = torch.from_numpy(rng.standard_normal((n, k), dtype=np.float32))
    x = torch.from_numpy(rng.standard_normal((64, k), dtype=np.float32))
    full = cg.transform_matrix(x, w, None, "gelu")
    bad = []

    def work(seed):
        for j in range(12):
            rows, start = 1 + (seed + j) % 3, (seed * 5 + j) % 60
            if not same(cg.transform_matrix(x[start : start + rows], w, None, "gelu"), full[start : start + rows]):
                bad.append((rows, start))

    run_at_once(work, range(4))
    assert bad == []
