"""The binary algebra on torch tensors through the Triton kernels of ``kernels/binary.py``
(CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``)."""

from __future__ import annotations

import math
from typing import Any

from ... import _dispatch
from ..utils import cdiv, launch
from ._search import TorchArrayOps, clear_pad_bits, radius_from_blocks, topk_from_blocks, word_blocks


def _unit_stride_rows(t: Any) -> Any:
    """``t`` as (rows, last) with unit stride along the last axis (copied only when needed)."""
    rows = t.reshape(math.prod(t.shape[:-1]), t.shape[-1])
    return rows if rows.stride(-1) == 1 or rows.shape[-1] <= 1 else rows.contiguous()


@_dispatch.register("pack_bits", "triton")
def _pack_bits_triton(x: Any, *, rule: str) -> Any:
    import torch

    from ...kernels.binary import pack_bits_kernel

    n = x.shape[-1]
    width = cdiv(n, 8)
    rows = _unit_stride_rows(x.view(torch.uint8) if x.dtype == torch.bool else x)
    out = torch.empty((rows.shape[0], width), dtype=torch.uint8, device=x.device)
    if out.numel():
        block_r, block_w = 16, 16
        launch(pack_bits_kernel, (cdiv(rows.shape[0], block_r), cdiv(width, block_w)),
               rows, out, rows.shape[0], n, width, rows.stride(0), out.stride(0), on=x,
               RULE=rule, BLOCK_R=block_r, BLOCK_W=block_w)  # fmt: skip
    return out.reshape(x.shape[:-1] + (width,))


@_dispatch.register("unpack_bits", "triton")
def _unpack_bits_triton(bits: Any, *, n: int) -> Any:
    import torch

    from ...kernels.binary import unpack_bits_kernel

    rows = _unit_stride_rows(bits)
    out = torch.empty((rows.shape[0], n), dtype=torch.uint8, device=bits.device)
    if out.numel():
        block_r, block_c = 16, 64
        launch(unpack_bits_kernel, (cdiv(rows.shape[0], block_r), cdiv(n, block_c)),
               rows, out, rows.shape[0], n, rows.stride(0), out.stride(0), on=bits, BLOCK_R=block_r, BLOCK_C=block_c)  # fmt: skip
    return out.reshape(bits.shape[:-1] + (n,))


@_dispatch.register("mean_abs", "triton")
def _mean_abs_triton(x: Any) -> Any:
    import torch

    if x.shape[-1] == 0:
        return torch.zeros(x.shape[:-1], dtype=x.dtype, device=x.device)
    return x.abs().mean(dim=-1, dtype=torch.float64)  # a float32 sum overflows near 3e38


def _int32_words(a: Any) -> Any:
    """(R, W) uint8 -> (R, ceil(W / 4)) int32 view, zero-padded when W is not a multiple of 4."""
    import torch

    r, w = a.shape
    if a.numel() == 0:
        return torch.zeros((r, cdiv(w, 4)), dtype=torch.int32, device=a.device)
    if w % 4 == 0 and a.is_contiguous() and a.data_ptr() % 4 == 0:
        return a.view(torch.int32)
    padded = torch.zeros((r, cdiv(w, 4) * 4), dtype=torch.uint8, device=a.device)
    padded[:, :w] = a
    return padded.view(torch.int32)


def _popcount_gemm_words(a: Any, b: Any, n_bits: int | None) -> Any:
    """int32 (M, N) from int32 words (M, words) and (N, words)."""
    import torch

    from ...kernels.binary import popcount_gemm_kernel

    m, n = a.shape[0], b.shape[0]
    out = torch.empty((m, n), dtype=torch.int32, device=a.device)
    if out.numel() == 0:
        return out
    block_m, block_n, block_w = 32, 32, 8
    launch(popcount_gemm_kernel, (cdiv(m, block_m), cdiv(n, block_n)),
           a, b, out, m, n, a.shape[1], n_bits or 0, a.stride(0), b.stride(0), out.stride(0), on=a,
           SIGNED_DOT=n_bits is not None, HW_POPC=a.device.type == "cuda", BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_W=block_w)  # fmt: skip
    return out


@_dispatch.register("popcount_gemm", "triton")
def _popcount_gemm_triton(a: Any, b: Any, *, signed_bits: int | None) -> Any:
    if signed_bits is not None:
        a, b = clear_pad_bits(a, signed_bits), clear_pad_bits(b, signed_bits)
    return _popcount_gemm_words(_int32_words(a), _int32_words(b), signed_bits)


def _blocks(q: Any, db: Any) -> Any:
    return word_blocks(_int32_words(q), _int32_words(db), _popcount_gemm_words)


@_dispatch.register("hamming_topk", "triton")
def _hamming_topk_triton(q: Any, db: Any, *, k: int) -> tuple[Any, Any]:
    distances, indices = topk_from_blocks(_blocks(q, db), q.shape[0], db.shape[0], k, TorchArrayOps(q.device))
    return distances, indices


@_dispatch.register("hamming_radius", "triton")
def _hamming_radius_triton(q: Any, db: Any, *, r: int) -> tuple[Any, Any, Any]:
    return radius_from_blocks(_blocks(q, db), q.shape[0], db.shape[0], r, TorchArrayOps(q.device))
