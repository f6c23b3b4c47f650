"""A few rows times a large packed weight at GEMV speed, with the bits of MKL's packed kernel.

On AMD Zen 4 MKL's packed GEMM rounds batches of one to three rows in other kernels than whole
groups of four, so such a batch runs padded to four rows (``_packed_gemm``); for a large weight
that costs about three times MKL's one-row kernel (4096x4096: 8-9 ms against 2.9 ms), which itself
rounds unlike the batched rows. The four-row kernel's rounding is simple, though (measured with
torch 2.13's MKL): every output is a chain of fused multiply-adds over K in blocks of ``kc``
values, each block's chain starting from zero and its sum added to the output's running total,
block after block (``kc`` = 192 at K = 4096). :func:`rows_blocked` computes exactly that, reading
a block-major copy of ``w`` (:func:`blocked_copy`: 64 outputs at a time, contiguous), streamed once
per call on numba's threads; one row of 4096x4096 runs in about the time of OpenBLAS's GEMV.

Nothing here is assumed to match MKL: ``_packed_gemm._check`` compares these rows with MKL's for
each case and block length, and uses them only where every bit agrees. numba compiles the kernel
once per machine (its on-disk cache); without numba, or where it fails to compile or the compiler
does not fuse the multiply-adds (no FMA on the CPU), the check finds no match and the case pads.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from .binary._numba import PARALLEL_CALL, compiled_on
from .utils import cdiv

__all__ = ["BLOCK_OUTPUTS", "blocked_copy", "kernel", "rows_blocked"]

BLOCK_OUTPUTS = 64  # outputs per block of the block-major copy: one work item of the kernel


def kernel() -> Any:
    """The compiled kernel, or None where numba is missing or cannot compile it, or under
    ``CLISONIX_NUMBA=0`` (which turns every compiled CPU path off: such calls run padded, with the
    same bits)."""
    return _compiled() if compiled_on() else None


@functools.cache
def _compiled() -> Any:
    try:
        from numba import njit, prange
    except ImportError:
        return None

    # ``contract`` lets LLVM fuse each ``acc += x * w`` into one FMA, as MKL's kernel does;
    # nothing else is reassociated
    @njit(parallel=True, fastmath={"contract"}, error_model="numpy", cache=True)
    def rows_kernel(x: Any, blocked: Any, kc: int, out: Any) -> None:  # pragma: no cover - compiled
        m = x.shape[0]
        blocks, k_total, width = blocked.shape
        for item in prange(blocks * m):
            block, row = item // m, item % m
            panel = blocked[block]
            total = np.zeros(width, np.float32)
            acc = np.zeros(width, np.float32)
            start = 0
            while start < k_total:
                stop = min(start + kc, k_total)
                for j in range(width):
                    acc[j] = 0.0
                for k in range(start, stop):
                    xv = x[row, k]
                    for j in range(width):
                        acc[j] += xv * panel[k, j]
                for j in range(width):
                    total[j] += acc[j]
                start = stop
            first = block * width
            for j in range(min(width, out.shape[1] - first)):
                out[row, first + j] = total[j]

    try:
        rows_kernel(np.ones((1, 3), np.float32), np.ones((1, 3, 2), np.float32), 2, np.empty((1, 1), np.float32))
    except Exception:  # numba raises its own errors (typing, lowering, LLVM) when it cannot compile
        return None
    return rows_kernel


def blocked_copy(w: Any) -> np.ndarray:
    """``w`` (N, K), a float32 CPU tensor, as (ceil(N / 64), K, 64) float32: block b holds outputs
    64b .. 64b + 63, K-major, zero-padded past N."""
    n, k = w.shape
    blocks = cdiv(n, BLOCK_OUTPUTS)
    out = np.zeros((blocks * BLOCK_OUTPUTS, k), np.float32)
    out[:n] = np.from_dlpack(w.detach())  # not .numpy(), which marks the storage not resizable
    return np.ascontiguousarray(out.reshape(blocks, BLOCK_OUTPUTS, k).transpose(0, 2, 1))


def rows_blocked(x: Any, blocked: np.ndarray, n: int, kc: int) -> Any:
    """``x @ w.T`` (M, n) float32 tensor for a few rows ``x`` (M, K), a contiguous float32 CPU
    tensor, from ``blocked`` (:func:`blocked_copy` of ``w``), in blocks of ``kc`` values of K.
    The caller has checked that the kernel compiled (:func:`kernel`)."""
    import torch

    compiled = _compiled()
    assert compiled is not None
    out = np.empty((x.shape[0], n), np.float32)
    with PARALLEL_CALL:
        compiled(np.from_dlpack(x.detach()), blocked, kc, out)
    return torch.from_numpy(out)
