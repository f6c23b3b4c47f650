"""Triton kernels for ``svd_compress``.

``sketch_matmul_kernel``: the first range-finder GEMM ``Y = A @ Omega`` with the Rademacher sketch
``Omega`` generated inside the kernel instead of read from memory.

Omega[i, j] = +1 if the top bit of splitmix64(seed * GOLDEN + (j << 32 | i)) is clear, else -1:
a counter-based generator that the NumPy path computes with the same integer arithmetic, so both
paths sketch with the same matrix bit for bit.

``householder_qr_kernel``: reduced QR of a batch of small tall matrices, one program per matrix
holding it in registers. torch's batched QR on CUDA forms Q with one cuSOLVER ``orgqr`` call per
matrix (pytorch/pytorch#143281: ~26 ms for 1024 small matrices), and the range finder needs a
QR after every GEMM, so a batch of small matrices would spend most of its time there.
"""

import triton
import triton.language as tl

from ._common import interpreter_enabled


@triton.jit
def rademacher(rows, cols, seed_mix):
    """+-1.0 (fp32) for sketch entries at ``rows`` x ``cols`` (broadcast), from a uint64 seed mix."""
    z = seed_mix + ((cols.to(tl.uint64) << 32) | rows.to(tl.uint64))
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    z = z ^ (z >> 31)
    return 1.0 - 2.0 * (z >> 63).to(tl.float32)


def _configs():
    # BLOCK_K comes from the host, not the tuner: a row's sum over k then runs in the same steps
    # whichever tile wins, so one seed gives the same bits in every process.
    if interpreter_enabled():
        return [triton.Config({"BLOCK_M": 32}, num_warps=4)]
    return [
        triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=s)
        # Spill-free on sm_90 in fp32 and fp64 (Triton 3.9; tests/test_sass.py). Left out, with their
        # fp32 stack bytes: (128, 8 warps, 3 stages) 456, (64, 4, 4) 472, (64, 8, 4) 24, (64, 8, 3) 24,
        # (32, 4, 4) 24, (32, 4, 3) 24.
        for bm, w, s in [(32, 8, 3), (16, 4, 3)]
    ]


@triton.autotune(configs=_configs(), key=["M", "N", "BLOCK_L", "BLOCK_K"])
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
            acc = tl.dot(a, omega, acc, input_precision="ieee", out_dtype=acc.dtype)
    y_ptrs = y_ptr + batch * stride_yb + offs_m[:, None].to(tl.int64) * stride_ym + offs_l[None, :]
    tl.store(y_ptrs, acc, mask=(offs_m[:, None] < M) & (offs_l[None, :] < L))


@triton.jit
def householder_qr_kernel(
    y_ptr,  # (B, M, L), any strides, M >= L; grid (B,)
    q_ptr,  # (B, M, L) contiguous: orthonormal columns, y = q @ r
    r_ptr,  # (B, L, L) contiguous: upper triangular, LAPACK's signs (r_jj = -sign(pivot) |column|)
    M,
    L,
    stride_yb,
    stride_ym,
    stride_yl,
    ACC_FP64: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    batch = tl.program_id(0).to(tl.int64)
    dtype = tl.float64 if ACC_FP64 else tl.float32
    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_L)
    inside = (rows[:, None] < M) & (cols[None, :] < L)
    y_ptrs = y_ptr + batch * stride_yb + rows[:, None].to(tl.int64) * stride_ym + cols[None, :] * stride_yl
    y = tl.load(y_ptrs, mask=inside, other=0.0).to(dtype)
    reflectors = tl.zeros((BLOCK_M, BLOCK_L), dtype=dtype)  # Householder vector j in column j
    taus = tl.zeros((BLOCK_L,), dtype=dtype)
    for j in range(0, L):
        x = tl.sum(tl.where(cols[None, :] == j, y, 0.0), axis=1)
        x = tl.where(rows >= j, x, 0.0)
        alpha = tl.sum(tl.where(rows == j, x, 0.0), axis=0)
        scale = tl.max(tl.abs(x), axis=0)  # scaled norm: squares of float32 entries may overflow
        scaled = x / tl.where(scale > 0, scale, 1.0)
        norm = scale * tl.sqrt(tl.sum(scaled * scaled, axis=0))
        beta = tl.where(alpha >= 0, -norm, norm)
        pivot = alpha - beta  # |pivot| >= norm > 0 whenever the column has entries below row j
        reflect = tl.max(tl.where(rows > j, tl.abs(x), 0.0), axis=0) > 0  # else H = I, as LAPACK
        v = tl.where(rows == j, 1.0, x / tl.where(reflect, pivot, 1.0)).to(dtype)
        tau = tl.where(reflect, (beta - alpha) / tl.where(reflect, beta, 1.0), 0.0).to(dtype)
        w = tl.sum(v[:, None] * y, axis=0)  # apply H = I - tau v v^T to the columns
        y = y - tau * v[:, None] * w[None, :]
        reflectors = tl.where(cols[None, :] == j, v[:, None], reflectors)
        taus = tl.where(cols == j, tau, taus)
    r_ptrs = r_ptr + batch * L * L + rows[:, None].to(tl.int64) * L + cols[None, :]
    tl.store(r_ptrs, tl.where(rows[:, None] <= cols[None, :], y, 0.0), mask=(rows[:, None] < L) & (cols[None, :] < L))
    q = tl.where((rows[:, None] == cols[None, :]) & inside, 1.0, 0.0).to(dtype)
    for step in range(0, L):  # q = H_0 H_1 ... H_{L-1} applied to the first L columns of I
        j = L - 1 - step
        v = tl.sum(tl.where(cols[None, :] == j, reflectors, 0.0), axis=1)
        tau = tl.sum(tl.where(cols == j, taus, 0.0), axis=0)
        w = tl.sum(v[:, None] * q, axis=0)
        q = q - tau * v[:, None] * w[None, :]
    q_ptrs = q_ptr + batch * M * L + rows[:, None].to(tl.int64) * L + cols[None, :]
    tl.store(q_ptrs, q, mask=inside)
