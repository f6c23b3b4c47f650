"""Triton kernel for ``transform_matrix``: ``activation(x @ w.T + bias)`` with a fused epilogue.

Batch invariance: the reduction over K runs in fixed ``BLOCK_K`` steps chosen by the host from
the dtype alone, and autotuning (keyed on N and K, never M) only varies the output tiling. A
row's result therefore never depends on M or on which rows share its tile.

The structure is Triton's matmul tutorial (grouped launch order, K loop into an fp32 accumulator);
what it adds: the fixed reduction step above (the tutorial tunes BLOCK_K, so its bits change with
the winning config), bias and activation fused into the epilogue, a batch axis with a weight
broadcast by stride 0, int64 offsets (the tutorial's int32 offsets overflow past 2^31 elements),
arbitrary row strides, an fp64 accumulator for fp64 inputs, and an interpreter-safe reduction.
"""

import triton
import triton.language as tl

from ._common import autotune_kwargs, interpreter_enabled
from .activations import apply_activation


def _configs():
    if interpreter_enabled():  # every config would be run by the slow interpreter while tuning
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "GROUP_M": 4}, num_warps=4)]
    # Every config here compiles for sm_90 without spilling to local memory (Triton 3.9, gelu_tanh
    # epilogue, fp16/bf16/fp32/tf32/fp64; tests/test_sass.py checks it). Left out, with their stack
    # bytes (fp16-bf16 / fp32 / tf32 / fp64): (128, 256, 8 warps, 3 stages) 1168/888/216/8328,
    # (128, 128, 8, 4) 64/24/0/1184, (128, 128, 4, 4) 1472/1128/568/8480, (64, 256, 4, 4)
    # 1280/1272/368/8216, (64, 256, 8, 3) 88/72/0/1512, (128, 64, 4, 4) 656/24/0/1424,
    # (64, 128, 4, 4) 792/64/0/1504, (64, 64, 4, 4) 8/16/0/232.
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bn, w, s in [
            (128, 64, 8, 3),
            (64, 128, 8, 3),
            (64, 64, 8, 3),
            (32, 64, 4, 4),
            (16, 64, 4, 4),
        ]
    ]


def prune_configs_for_dtype(configs, named_args, **kwargs):
    """An fp64 accumulator takes twice the registers: tiles above 64 x 64 spill (sm_90, Triton 3.9:
    (128, 64, 8 warps) 224 bytes, (64, 128, 8 warps) 112 bytes), so fp64 keeps the smaller ones."""
    if kwargs.get("ACC_FP64"):
        return [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 64]
    return configs


@triton.autotune(configs=_configs(), key=["N", "K", "BLOCK_K"], prune_configs_by={"early_config_prune": prune_configs_for_dtype}, **autotune_kwargs())
@triton.jit
def transform_matrix_kernel(
    x_ptr,  # (B, M, K), stride 1 along K
    w_ptr,  # (B or 1, N, K), stride 1 along K; stride_wb == 0 broadcasts one weight
    bias_ptr,  # (N,) or unused
    out_ptr,  # (B, M, N), stride 1 along N
    M,
    N,
    K,
    stride_xb,
    stride_xm,
    stride_wb,
    stride_wn,
    stride_ob,
    stride_om,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" or "tf32" for fp32 operands
    INTERPRETER_DOT: tl.constexpr,  # see below
    ACC_FP64: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # grouped launch order: GROUP_M row tiles share the same weight tiles while they are in L2
    pids_per_group = GROUP_M * num_pid_n
    first_pid_m = (pid // pids_per_group) * GROUP_M
    group_rows = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % pids_per_group) % group_rows
    pid_n = (pid % pids_per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_ptrs = x_ptr + batch * stride_xb + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + batch * stride_wb + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64 if ACC_FP64 else tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        a = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if INTERPRETER_DOT:
            # The interpreter runs tl.dot through NumPy's BLAS, whose rounding depends on a row's
            # place in the tile, and gets bf16 operands wrong; a multiply-and-sum in the
            # accumulator's precision keeps both the numbers and the batch invariance.
            acc += tl.sum(a.to(acc.dtype)[:, :, None] * b.to(acc.dtype)[None, :, :], axis=1)
        else:
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION, out_dtype=acc.dtype)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)
        acc += bias[None, :].to(acc.dtype)
    y = apply_activation(acc, ACTIVATION)
    out_ptrs = out_ptr + batch * stride_ob + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
