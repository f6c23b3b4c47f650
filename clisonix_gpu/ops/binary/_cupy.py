"""The binary algebra on CuPy arrays through the CUDA C kernels of ``kernels/binary.cu``
(scalar arguments typed to match their C signatures)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ... import _dispatch
from ..utils import cdiv, launch_cuda
from ._search import ArrayOps, clear_pad_bits, radius_from_blocks, topk_from_blocks, word_blocks

_CUDA_CHUNK = 1024  # CHUNK in kernels/binary.cu: the per-block top-k selects from this many codes


def _ops() -> ArrayOps:
    import cupy

    return ArrayOps(cupy)


@_dispatch.register("pack_bits", "cupy")
def _pack_bits_cupy(x: Any, *, rule: str) -> Any:
    import cupy

    n = x.shape[-1]
    width = cdiv(n, 8)
    on = {"positive": x > 0, "nonnegative": x >= 0, "nonzero": x != 0}[rule]
    rows = cupy.ascontiguousarray(on.reshape(math.prod(x.shape[:-1]), n)).view(cupy.uint8)
    out = cupy.empty((rows.shape[0], width), dtype=cupy.uint8)
    if out.size:
        launch_cuda("binary", "pack_bool_rows", (cdiv(out.size, 256),), (256,),
                    (rows, out, np.int64(rows.shape[0]), np.int32(n), np.int32(width)), on=x)  # fmt: skip
    return out.reshape(x.shape[:-1] + (width,))


@_dispatch.register("unpack_bits", "cupy")
def _unpack_bits_cupy(bits: Any, *, n: int) -> Any:
    import cupy

    width = bits.shape[-1]
    rows = cupy.ascontiguousarray(bits.reshape(math.prod(bits.shape[:-1]), width))
    out = cupy.empty((rows.shape[0], n), dtype=cupy.uint8)
    if out.size:
        launch_cuda("binary", "unpack_bits_rows", (cdiv(out.size, 256),), (256,),
                    (rows, out, np.int64(rows.shape[0]), np.int32(n), np.int32(width)), on=bits)  # fmt: skip
    return out.reshape(bits.shape[:-1] + (n,))


@_dispatch.register("mean_abs", "cupy")
def _mean_abs_cupy(x: Any) -> Any:
    import cupy

    if x.shape[-1] == 0:
        return cupy.zeros(x.shape[:-1], dtype=x.dtype)
    return cupy.abs(x).mean(axis=-1, dtype=cupy.float64)  # a float32 sum overflows near 3e38


def _uint64_words(a: Any) -> Any:
    """(R, W) uint8 CuPy -> (R, ceil(W / 8)) uint64, zero-padded."""
    import cupy

    r, w = a.shape
    padded = cupy.zeros((r, cdiv(w, 8) * 8), dtype=cupy.uint8)
    padded[:, :w] = a
    return padded.view(cupy.uint64)


def _popcount_gemm_u64(a: Any, b: Any, n_bits: int | None) -> Any:
    import cupy

    m, n = a.shape[0], b.shape[0]
    out = cupy.empty((m, n), dtype=cupy.int32)
    if out.size:
        launch_cuda("binary", "popcount_gemm_u64", (cdiv(n, 16), cdiv(m, 16)), (16, 16),
                    (a, b, out, np.int32(m), np.int32(n), np.int32(a.shape[1]), np.int32(n_bits or 0),
                     np.int32(n_bits is not None)), on=a)  # fmt: skip
    return out


@_dispatch.register("popcount_gemm", "cupy")
def _popcount_gemm_cupy(a: Any, b: Any, *, signed_bits: int | None) -> Any:
    if signed_bits is not None:
        a, b = clear_pad_bits(a, signed_bits), clear_pad_bits(b, signed_bits)
    return _popcount_gemm_u64(_uint64_words(a), _uint64_words(b), signed_bits)


def _blocks(q: Any, db: Any) -> Any:
    return word_blocks(_uint64_words(q), _uint64_words(db), _popcount_gemm_u64)


@_dispatch.register("hamming_topk", "cupy")
def _hamming_topk_cupy(q: Any, db: Any, *, k: int) -> tuple[Any, Any]:
    import cupy

    n = db.shape[0]
    if k > _CUDA_CHUNK or n >= 2**31:  # beyond the per-block selection of the CUDA kernel
        distances, indices = topk_from_blocks(_blocks(q, db), q.shape[0], n, k, _ops())
        return distances, indices
    qw, dw = _uint64_words(q), _uint64_words(db)
    chunks = cdiv(n, _CUDA_CHUNK)
    cand = cupy.empty((q.shape[0], chunks * k), dtype=cupy.int64)
    if q.shape[0]:
        launch_cuda("binary", "hamming_topk_chunks", (chunks, q.shape[0]), (512,),
                    (qw, dw, cand, np.int32(n), np.int32(qw.shape[1]), np.int32(k), np.int32(chunks)), on=q)  # fmt: skip
    keys = cupy.sort(cand, axis=1)[:, :k]  # merge: k smallest of all chunks' candidates
    return (keys >> 32).astype(cupy.int32), keys & 0xFFFFFFFF


@_dispatch.register("hamming_radius", "cupy")
def _hamming_radius_cupy(q: Any, db: Any, *, r: int) -> tuple[Any, Any, Any]:
    return radius_from_blocks(_blocks(q, db), q.shape[0], db.shape[0], r, _ops())
