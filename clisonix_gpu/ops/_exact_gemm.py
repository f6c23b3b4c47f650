"""Batch-invariant GEMM for the NumPy path: ``x @ w.T`` accumulated exactly.

BLAS gives a row different low bits depending on where it lands in the kernel's register tile,
so the same row computed in a 1-row and a 300-row call can differ. Here every BLAS call is made
exact instead: each row of ``x`` and of ``w`` is scaled by a power of two and cut into integer
slices of ``b`` bits with ``2b + log2(K) <= 53``, so every product of slices is a sum of integers
below 2^53 and float64 BLAS computes it without rounding, in any order. The slices are then
combined elementwise. The result depends only on the row of ``x`` and the row of ``w`` involved,
is within about 2^-(slices*b) of the exact dot product relative to the rows' largest entries,
and is computed with ``slices*(slices+1)/2`` float64 GEMMs (3 for float32, 1 for float16/bfloat16).
"""

from __future__ import annotations

import numpy as np

_FLOAT64_MANTISSA = 53
# Bits kept beyond the input's own mantissa, so that entries smaller than their row's largest
# one keep their precision too.
_GUARD_BITS = 8


def _slice_bits(k: int) -> int:
    return (_FLOAT64_MANTISSA - max(int(k - 1).bit_length(), 0)) // 2


def _split_rows(a: np.ndarray, bits: int, slices: int) -> tuple[list[np.ndarray], np.ndarray]:
    """``a`` (R, K) float64 -> integer-valued slices and per-row exponents e with
    ``a == sum_s slices[s] * 2**(e - bits*(s+1))`` up to the last slice's resolution."""
    row_max = np.max(np.abs(a), axis=1, initial=0.0)
    _, exponent = np.frexp(row_max)  # row_max < 2**exponent
    rest = np.ldexp(a, (bits - exponent)[:, None])
    parts = []
    for _ in range(slices):
        top = np.trunc(rest)
        parts.append(top)
        rest = np.ldexp(rest - top, bits)
    return parts, exponent


def exact_matmul_nt(x: np.ndarray, w: np.ndarray, mantissa_bits: int) -> np.ndarray:
    """``x @ w.T`` in float64 for finite ``x`` (M, K) and ``w`` (N, K) whose entries carry at most
    ``mantissa_bits`` significant bits; rows with NaN/Inf follow IEEE arithmetic."""
    m, k = x.shape
    n = w.shape[0]
    x = np.asarray(x, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    bad_x = ~np.isfinite(x).all(axis=1)
    bad_w = ~np.isfinite(w).all(axis=1)
    if bad_x.any() or bad_w.any():
        # A non-finite entry makes every product of its row NaN or +-Inf, and such a sum is the
        # same in any order; compute those outputs plainly and the rest exactly.
        out = exact_matmul_nt(np.where(bad_x[:, None], 0.0, x), np.where(bad_w[:, None], 0.0, w), mantissa_bits)
        with np.errstate(invalid="ignore"):  # 0 * inf is NaN here, as IEEE says
            out[bad_x] = x[bad_x] @ w.T
            out[:, bad_w] = x @ w[bad_w].T
        return out
    if m == 0 or n == 0 or k == 0:
        return np.zeros((m, n), dtype=np.float64)
    bits = _slice_bits(k)
    slices = -(-(mantissa_bits + _GUARD_BITS) // bits)
    xs, ex = _split_rows(x, bits, slices)
    ws, ew = _split_rows(w, bits, slices)
    out = np.zeros((m, n), dtype=np.float64)
    # Terms of equal weight 2^-(bits*order) are added first, lowest weight first.
    for order in reversed(range(slices)):
        term = np.zeros((m, n), dtype=np.float64)
        for s in range(order + 1):
            term += xs[s] @ ws[order - s].T
        out += np.ldexp(term, -bits * order)
    return np.ldexp(out, ex[:, None] + ew[None, :] - 2 * bits)
