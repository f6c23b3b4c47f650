"""Triton kernels for the binary algebra: bit packing and XNOR/XOR-popcount products.

Bits pack along the last axis, LSB first (``np.packbits(..., bitorder="little")``). The popcount
kernels read packed rows as int32 words (the host pads widths to a multiple of 4 bytes with
zeros, which XOR to zero). ``HW_POPC`` selects the single-instruction popcount on CUDA; the
interpreter has no libdevice, so it counts with the SWAR bit trick instead.
"""

import triton
import triton.language as tl

from ._common import interpreter_enabled

if not interpreter_enabled():
    from triton.language.extra import libdevice
else:  # never reached in a traced kernel: HW_POPC is False under the interpreter
    libdevice = None


@triton.jit
def _popcount32(v, HW_POPC: tl.constexpr):
    if HW_POPC:
        return libdevice.popc(v)
    u = v.to(tl.uint32, bitcast=True)
    u = u - ((u >> 1) & 0x55555555)
    u = (u & 0x33333333) + ((u >> 2) & 0x33333333)
    u = (u + (u >> 4)) & 0x0F0F0F0F
    return ((u * 0x01010101) >> 24).to(tl.int32)


@triton.jit
def pack_bits_kernel(
    x_ptr,  # (R, n) any numeric dtype, unit stride along n
    out_ptr,  # (R, W) uint8, W = ceil(n / 8)
    R,
    n,
    W,
    stride_xr,
    stride_or,
    RULE: tl.constexpr,  # "nonzero", "positive" (x > 0) or "nonnegative" (x >= 0)
    BLOCK_R: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    words = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    bit = tl.arange(0, 8)
    cols = words[:, None] * 8 + bit[None, :]  # (BLOCK_W, 8)
    mask = (rows[:, None, None] < R) & (cols[None, :, :] < n)
    x = tl.load(x_ptr + rows[:, None, None].to(tl.int64) * stride_xr + cols[None, :, :], mask=mask, other=0)
    if x.dtype.is_bf16() or x.dtype.is_fp16():
        x = x.to(tl.float32)  # exact; the interpreter compares bf16 wrongly
    if RULE == "positive":
        on = x > 0
    elif RULE == "nonnegative":
        on = x >= 0
    else:
        on = x != 0
    on = on & mask  # masked lanes loaded 0, which counts as set under "nonnegative"
    byte = tl.sum(on.to(tl.int32) << bit[None, None, :], axis=2)
    out_mask = (rows[:, None] < R) & (words[None, :] < W)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_or + words[None, :], byte.to(tl.uint8), mask=out_mask)


@triton.jit
def unpack_bits_kernel(
    bits_ptr,  # (R, W) uint8
    out_ptr,  # (R, n) uint8 of 0/1
    R,
    n,
    stride_br,
    stride_or,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows[:, None] < R) & (cols[None, :] < n)
    row_off = rows[:, None].to(tl.int64)
    byte = tl.load(bits_ptr + row_off * stride_br + cols[None, :] // 8, mask=mask, other=0).to(tl.int32)
    tl.store(out_ptr + row_off * stride_or + cols[None, :], ((byte >> (cols[None, :] % 8)) & 1).to(tl.uint8), mask=mask)


@triton.jit
def popcount_gemm_kernel(
    a_ptr,  # (M, words) int32
    b_ptr,  # (N, words) int32
    out_ptr,  # (M, N) int32
    M,
    N,
    words,
    n_bits,
    stride_am,
    stride_bn,
    stride_om,
    SIGNED_DOT: tl.constexpr,  # True: n - 2*popcount(a ^ b) (the +-1 dot product); False: popcount(a ^ b)
    HW_POPC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_w = tl.arange(0, BLOCK_W)
    a_rows = a_ptr + offs_m[:, None].to(tl.int64) * stride_am
    b_rows = b_ptr + offs_n[:, None].to(tl.int64) * stride_bn
    count = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for w0 in range(0, words, BLOCK_W):
        mask_w = offs_w[None, :] < words - w0
        a = tl.load(a_rows + w0 + offs_w[None, :], mask=(offs_m[:, None] < M) & mask_w, other=0)
        b = tl.load(b_rows + w0 + offs_w[None, :], mask=(offs_n[:, None] < N) & mask_w, other=0)
        count += tl.sum(_popcount32(a[:, None, :] ^ b[None, :, :], HW_POPC), axis=2)
    if SIGNED_DOT:
        count = n_bits - 2 * count
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :], count, mask=mask)
