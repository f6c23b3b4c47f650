"""The binary algebra on NumPy arrays (and CPU torch tensors, viewed as NumPy).

The products and searches run the compiled kernels of ``_numba`` when they are usable, and the
NumPy code below otherwise (and under ``CLISONIX_NUMBA=0``)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ... import _dispatch
from . import _numba
from ._search import ArrayOps, clear_pad_bits, radius_from_blocks, search_blocks, topk_from_blocks

_OPS = ArrayOps(np)
_BLAS_MIN_ROWS = 32  # unpacking the database to floats pays off only when enough query rows share it
_popcount = getattr(np, "bitwise_count", None)
_BYTE_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


@_dispatch.register("pack_bits", "numpy")
def _pack_bits_numpy(x: np.ndarray, *, rule: str) -> np.ndarray:
    on = {"positive": x > 0, "nonnegative": x >= 0, "nonzero": x != 0}[rule]
    return np.packbits(on, axis=-1, bitorder="little")


@_dispatch.register("unpack_bits", "numpy")
def _unpack_bits_numpy(bits: np.ndarray, *, n: int) -> np.ndarray:
    return np.unpackbits(bits, axis=-1, count=n, bitorder="little")


@_dispatch.register("mean_abs", "numpy")
def _mean_abs_numpy(x: np.ndarray) -> np.ndarray:
    if x.shape[-1] == 0:
        return np.zeros(x.shape[:-1], dtype=x.dtype)
    scale: np.ndarray = np.abs(x).mean(axis=-1, dtype=np.float64)  # a float32 sum overflows near 3e38
    return scale


def _plus_minus_one(a: np.ndarray) -> np.ndarray:
    """(R, W) packed bytes -> (R, 8W) float32 of +1 (set bit) / -1 (clear bit), pad bits included."""
    return np.unpackbits(a, axis=-1, bitorder="little").astype(np.float32) * 2 - 1


def _blocks(q: np.ndarray, db: np.ndarray) -> Any:
    """:func:`search_blocks` over ``q`` and ``db``: through BLAS when it fits, else XOR and popcount
    on 64-bit words.

    The +-1 dot product of 8W-bit rows is an integer below 2^24, which float32 sums exactly in any
    order, and distance = (8W - dot) / 2 (pad bits are equal in both rows, so they add 0).
    """
    bits = 8 * db.shape[1]
    if q.shape[0] >= _BLAS_MIN_ROWS and bits < 2**24 and db.shape[0] * bits * 4 <= 2**31:
        return search_blocks(
            q.shape[0], db.shape[0],
            lambda start, stop: _plus_minus_one(db[start:stop]).T,
            lambda start, stop, db_t: ((bits - _plus_minus_one(q[start:stop]) @ db_t) * 0.5).astype(np.int32),
            row_entries=bits,
        )  # fmt: skip
    qw = _numba.words(q)

    def distances(start: int, stop: int, words: np.ndarray) -> np.ndarray:
        x = qw[start:stop, None, :] ^ words[None, :, :]
        if _popcount is not None:
            counts: np.ndarray = _popcount(x).sum(axis=-1, dtype=np.int32)
            return counts
        table_counts: np.ndarray = _BYTE_POPCOUNT[x.view(np.uint8)].sum(axis=-1, dtype=np.int32)  # NumPy < 2.0: a byte table
        return table_counts

    # the XOR temporaries hold (rows, codes, words): each distance costs its row's bytes
    return search_blocks(q.shape[0], db.shape[0], lambda start, stop: _numba.words(db[start:stop]), distances, entry_cost=db.shape[1])


@_dispatch.register("popcount_gemm", "numpy")
def _popcount_gemm_numpy(a: np.ndarray, b: np.ndarray, *, signed_bits: int | None) -> np.ndarray:
    if _numba.enabled():
        return _numba.popcount_gemm(a, b, signed_bits)
    if signed_bits is not None:
        a, b = clear_pad_bits(a, signed_bits), clear_pad_bits(b, signed_bits)
    out = np.empty((a.shape[0], b.shape[0]), dtype=np.int32)
    for qs, ds, d in _blocks(a, b):
        out[qs : qs + d.shape[0], ds : ds + d.shape[1]] = d if signed_bits is None else signed_bits - 2 * d
    return out


@_dispatch.register("hamming_topk", "numpy")
def _hamming_topk_numpy(q: np.ndarray, db: np.ndarray, *, k: int) -> tuple[np.ndarray, np.ndarray]:
    if _numba.enabled():
        return _numba.hamming_topk(q, db, k)
    distances, indices = topk_from_blocks(_blocks(q, db), q.shape[0], db.shape[0], k, _OPS)
    return distances, indices


@_dispatch.register("hamming_radius", "numpy")
def _hamming_radius_numpy(q: np.ndarray, db: np.ndarray, *, r: int) -> tuple[Any, Any, Any]:
    if _numba.enabled():
        return _numba.hamming_radius(q, db, r)
    return radius_from_blocks(_blocks(q, db), q.shape[0], db.shape[0], r, _OPS)
