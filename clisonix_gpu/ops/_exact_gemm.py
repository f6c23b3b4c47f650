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

from collections.abc import Iterator

import numpy as np

from .utils import cdiv

_FLOAT64_MANTISSA = 53
# Bits kept beyond the input's own mantissa, so entries smaller than their row's largest keep
# their own precision too.
_GUARD_BITS = 8


def _slice_bits(k: int) -> int:
    return (_FLOAT64_MANTISSA - int(max(k, 1) - 1).bit_length()) // 2


def _row_max(a: np.ndarray) -> np.ndarray:
    """max |a| per row in float64 (NaN for rows holding NaN), read in ``a``'s own dtype, without
    an |a| temporary."""
    if a.shape[1] == 0:
        return np.zeros(a.shape[0])
    row_max: np.ndarray = np.maximum(a.max(axis=1), -a.min(axis=1)).astype(np.float64)
    return row_max


def _split_rows(a: np.ndarray, row_max: np.ndarray, bits: int, slices: int) -> list[np.ndarray]:
    """``a`` (R, K), any float dtype, -> ``slices`` float64 arrays summing to ``a`` up to the last
    slice's quantum; ``a`` is not modified.

    Slice s of row r is a multiple of q_{r,s} = 2^(e_r - bits*(s+1)) with |slice| <= 2^bits q_{r,s},
    where 2^e_r > ``row_max[r]``. Rounding to a multiple of q adds and subtracts 1.5 * 2^52 * q,
    which is exact in float64 round-to-nearest (NumPy widens ``a`` to float64 on the fly).
    """
    _, exponent = np.frexp(row_max)
    parts = []
    rest = a  # the part not yet in a slice; a float64 array of our own after the first slice
    for s in range(slices):
        shifter = np.ldexp(1.5, exponent - bits * (s + 1) + 52)[:, None]
        if s and s + 1 == slices:  # the last remainder is ours: round it in place
            rest += shifter
            rest -= shifter
            parts.append(rest)
            break
        top = np.add(rest, shifter, dtype=np.float64)
        top -= shifter
        parts.append(top)
        if s + 1 < slices:
            rest = np.subtract(rest, top, dtype=np.float64) if s == 0 else np.subtract(rest, top, out=rest)
    return parts


def exact_matmul_blocks(x: np.ndarray, w: np.ndarray, mantissa_bits: int, block_rows: int) -> Iterator[tuple[int, np.ndarray]]:
    """``x @ w.T`` (float64) for ``x`` (M, K) and ``w`` (N, K) whose entries carry at most
    ``mantissa_bits`` significant bits, as ``(first row, block)`` over blocks of ``block_rows``
    rows of ``x``; ``w`` is split once. Rows holding NaN/Inf follow IEEE arithmetic."""
    m, k = x.shape
    n = w.shape[0]
    bits = _slice_bits(k)
    slices = cdiv(mantissa_bits + _GUARD_BITS, bits)
    max_w = _row_max(w)
    bad_w = ~(max_w < 2.0**900)  # NaN/Inf, or so large (float64 only) that slicing would overflow
    if bad_w.any():
        w_finite = np.where(bad_w[:, None], 0.0, w)
        ws = [p.T for p in _split_rows(w_finite, _row_max(w_finite), bits, slices)]
    else:
        ws = [p.T for p in _split_rows(w, max_w, bits, slices)]
    wide_w = None  # w in float64 for the outputs that IEEE rules decide, made once if needed
    for start in range(0, m, block_rows):
        rows = x[start : start + block_rows]
        max_x = _row_max(rows)
        bad_x = ~(max_x < 2.0**900)
        finite = np.where(bad_x[:, None], 0.0, rows) if bad_x.any() else rows
        out = np.zeros((finite.shape[0], n), dtype=np.float64)
        if finite.shape[0] and n and k:
            xs = _split_rows(finite, _row_max(finite) if bad_x.any() else max_x, bits, slices)
            for order in reversed(range(slices)):  # weight 2^(-bits*order): smallest terms first
                for s in range(order + 1):
                    out += xs[s] @ ws[order - s]
        if bad_x.any() or bad_w.any():
            # A non-finite entry makes every product of its row NaN or +-Inf, and such a sum is
            # the same in any order: those outputs are computed plainly. (Rows beyond 2^900 take
            # this path too: their products overflow float64 anyway.)
            wide_w = w.astype(np.float64) if wide_w is None else wide_w
            with np.errstate(invalid="ignore", over="ignore"):  # 0 * inf is NaN here, as IEEE says
                wide_x = rows.astype(np.float64)
                out[bad_x] = wide_x[bad_x] @ wide_w.T
                out[:, bad_w] = wide_x @ wide_w[bad_w].T
        yield start, out
