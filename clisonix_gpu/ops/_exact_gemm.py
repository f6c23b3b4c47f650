"""Batch-invariant GEMM for the NumPy path: ``x @ w.T`` from exact float64 products.

BLAS gives a row different low bits depending on where it lands in the kernel's register tile
(OpenBLAS does; the same row in a 1-row and a 300-row call differs), so fixed row tiles alone do
not make a row's result independent of its batch. Here every BLAS call is exact instead: each row
of ``x`` and of ``w`` is cut into slices that are multiples of a per-row quantum q with at most
``b`` bits above it, ``2b + ceil(log2 K) <= 53``. The dot product of two slices is then a sum of
multiples of q_x*q_w below 2^53 of them, which float64 represents exactly, so BLAS returns the
same value in any order and any tiling. Slice products are combined elementwise, lowest weight
first. A row's result depends only on that row of ``x`` and on ``w``, and lies within about
2^-(slices*b) of the exact dot product relative to the rows' largest entries (float32 output is
correctly rounded almost always). Cost: ``slices*(slices+1)/2`` float64 GEMMs, 3 for float32
inputs and 1 for float16/bfloat16. Exactness needs the quanta to stay above float64's subnormal
range, which holds for every float32/float16 input and for float64 rows not near 1e-290.
"""

from __future__ import annotations

import numpy as np

_FLOAT64_MANTISSA = 53
# Bits kept beyond the input's own mantissa, so entries smaller than their row's largest keep
# their own precision too.
_GUARD_BITS = 8


def _slice_bits(k: int) -> int:
    return (_FLOAT64_MANTISSA - int(max(k, 1) - 1).bit_length()) // 2


def _row_max(a: np.ndarray) -> np.ndarray:
    """max |a| per row (NaN for rows holding NaN) without an |a| temporary."""
    if a.shape[1] == 0:
        return np.zeros(a.shape[0])
    row_max: np.ndarray = np.maximum(a.max(axis=1), -a.min(axis=1))
    return row_max


def _split_rows(a: np.ndarray, row_max: np.ndarray, bits: int, slices: int) -> list[np.ndarray]:
    """``a`` (R, K) float64 -> ``slices`` arrays summing to ``a`` up to the last slice's quantum;
    ``a`` is overwritten (it holds the remainder).

    Slice s of row r is a multiple of q_{r,s} = 2^(e_r - bits*(s+1)) with |slice| <= 2^bits q_{r,s},
    where 2^e_r > ``row_max[r]``. Rounding to a multiple of q adds and subtracts 1.5 * 2^52 * q,
    which is exact in float64 round-to-nearest.
    """
    _, exponent = np.frexp(row_max)
    parts = []
    for s in range(slices):
        shifter = np.ldexp(1.5, exponent - bits * (s + 1) + 52)[:, None]
        top = np.add(a, shifter)
        top -= shifter
        parts.append(top)
        if s + 1 < slices:
            a -= top  # the remainder for the next slice
    return parts


def exact_matmul_nt(x: np.ndarray, w: np.ndarray, mantissa_bits: int) -> np.ndarray:
    """``x @ w.T`` (float64) for ``x`` (M, K) and ``w`` (N, K) whose entries carry at most
    ``mantissa_bits`` significant bits; rows holding NaN/Inf follow IEEE arithmetic."""
    m, k = x.shape
    n = w.shape[0]
    x = np.array(x, dtype=np.float64)  # copies: the split works in place
    w = np.array(w, dtype=np.float64)
    max_x, max_w = _row_max(x), _row_max(w)
    # rows with NaN/Inf, or so large (> 2^900, float64 only) that the slicing would overflow
    bad_x, bad_w = ~(max_x < 2.0**900), ~(max_w < 2.0**900)
    if bad_x.any() or bad_w.any():
        # A non-finite entry makes every product of its row NaN or +-Inf, and such a sum is the
        # same in any order; compute those outputs plainly and the rest exactly. (Rows beyond
        # 2^900 take this path too: their products overflow float64 anyway.)
        out = exact_matmul_nt(np.where(bad_x[:, None], 0.0, x), np.where(bad_w[:, None], 0.0, w), mantissa_bits)
        with np.errstate(invalid="ignore"):  # 0 * inf is NaN here, as IEEE says
            out[bad_x] = x[bad_x] @ w.T
            out[:, bad_w] = x @ w[bad_w].T
        return out
    if m == 0 or n == 0 or k == 0:
        return np.zeros((m, n), dtype=np.float64)
    bits = _slice_bits(k)
    slices = -(-(mantissa_bits + _GUARD_BITS) // bits)
    xs = _split_rows(x, max_x, bits, slices)
    ws = [p.T for p in _split_rows(w, max_w, bits, slices)]
    out = np.zeros((m, n), dtype=np.float64)
    for order in reversed(range(slices)):  # weight 2^(-bits*order): smallest terms first
        for s in range(order + 1):
            out += xs[s] @ ws[order - s]
    return out
