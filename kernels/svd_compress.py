"""Triton kernel for ``svd_compress``: the first range-finder GEMM ``Y = A @ Omega`` with the
Rademacher sketch ``Omega`` generated inside the kernel instead of read from memory.

Omega[i, j] = +1 if the top bit of splitmix64(seed * GOLDEN + (j << 32 | i)) is clear, else -1:
a counter-based generator that the NumPy path computes with the same integer arithmetic, so both
paths sketch with the same matrix bit for bit.
"""

import triton
import triton.language as tl

from ._common import INTERPRETER


@triton.jit
def rademacher(rows, cols, seed_mix):
    """+-1.0 (fp32) for sketch entries at ``rows`` x ``cols`` (broadcast), from a uint64 seed mix."""
    z = seed_mix + ((cols.to(tl.uint64) << 32) | rows.to(tl.uint64))
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    z = z ^ (z >> 31)
    return 1.0 - 2.0 * (z >> 63).to(tl.float32)


def _configs():
    if INTERPRETER:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_K": 32}, num_warps=4)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bm, bk, w, s in [(128, 32, 4, 4), (64, 64, 4, 4), (128, 64, 8, 3), (64, 32, 4, 4)]
    ]


@triton.autotune(configs=_configs(), key=["M", "N", "BLOCK_L"])
@triton.jit(do_not_specialize=["seed_mix"])
def sketch_matmul_kernel(
    a_ptr,  # (B, M, N), unit stride along N
    y_ptr,  # (B, M, L) in the accumulator's dtype; grid (M blocks, L blocks, B)
    M,
    N,
    L,
    stride_ab,
    stride_am,
    stride_yb,
    stride_ym,
    seed_mix,  # uint64 as int64 bits
    INTERPRETER_DOT: tl.constexpr,
    ACC_FP64: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_l = tl.program_id(1)
    batch = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_k = tl.arange(0, BLOCK_K)
    seed = seed_mix.to(tl.int64).to(tl.uint64, bitcast=True)  # small values arrive as int32
    a_rows = a_ptr + batch * stride_ab + offs_m[:, None].to(tl.int64) * stride_am
    acc = tl.zeros((BLOCK_M, BLOCK_L), dtype=tl.float64 if ACC_FP64 else tl.float32)
    for k0 in range(0, N, BLOCK_K):
        ks = k0 + offs_k
        a = tl.load(a_rows + ks[None, :], mask=(offs_m[:, None] < M) & (ks[None, :] < N), other=0.0).to(acc.dtype)
        omega = rademacher(ks[:, None], offs_l[None, :], seed).to(acc.dtype)
        omega = tl.where((ks[:, None] < N) & (offs_l[None, :] < L), omega, 0.0)
        if INTERPRETER_DOT:  # see transform_matrix: keep the interpreter off NumPy's BLAS
            acc += tl.sum(a[:, :, None] * omega[None, :, :], axis=1)
        else:
            acc = tl.dot(a, omega, acc, input_precision="ieee")
    y_ptrs = y_ptr + batch * stride_yb + offs_m[:, None].to(tl.int64) * stride_ym + offs_l[None, :]
    tl.store(y_ptrs, acc, mask=(offs_m[:, None] < M) & (offs_l[None, :] < L))
