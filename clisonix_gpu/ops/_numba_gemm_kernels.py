"""The compiled kernels of :mod:`._numba_gemm` (numba; imported only when numba is installed).

Defined at module level, so numba's on-disk cache serves them from the second process on: nothing
in them depends on the process (MKL's function and the dot products arrive as addresses at each
call).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from llvmlite import ir
from numba import carray, cfunc, njit, types
from numba.extending import intrinsic

PADDED_COPY_FLOATS = 8192  # a batch this small (rows x K) runs as one padded call from a copy


@intrinsic
def float32_at(typingctx: Any, address: Any) -> Any:  # pragma: no cover - compiled
    """The float32 pointer at integer ``address``."""

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.inttoptr(args[0], context.get_value_type(types.CPointer(types.float32)))

    return types.CPointer(types.float32)(address), codegen


@intrinsic
def keep_alive(typingctx: Any, array: Any) -> Any:  # pragma: no cover - compiled
    """Nothing, but a use of ``array``: numba frees an array after its last use it sees, and a
    call that reads or writes it by address is no such use. Placed after such a call, it keeps the
    array's memory alive through the call."""

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return context.get_dummy_value()

    return types.void(array), codegen


@intrinsic
def sgemm_compute(typingctx: Any, compute_at: Any, m: Any, n: Any, k: Any, a_at: Any, b_at: Any, c_at: Any) -> Any:  # pragma: no cover
    """``cblas_sgemm_compute(RowMajor, NoTrans, Packed, m, n, k, a, k, b, k, 1, c, n)`` (adds the
    products to ``c``) through the function at ``compute_at`` (MKL LP64: 32-bit integers)."""
    i32, pointer = ir.IntType(32), ir.IntType(8).as_pointer()
    signature = ir.FunctionType(ir.VoidType(), [i32] * 6 + [pointer, i32, pointer, i32, ir.FloatType(), pointer, i32])

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        function, rows, cols, depth, a, b, c = args
        m32, n32, k32 = (builder.trunc(value, i32) for value in (rows, cols, depth))
        row_major, no_trans, packed = (ir.Constant(i32, value) for value in (101, 111, 151))
        a, b, c = (builder.inttoptr(value, pointer) for value in (a, b, c))
        arguments = [row_major, no_trans, packed, m32, n32, k32, a, k32, b, k32, ir.Constant(ir.FloatType(), 1.0), c, n32]
        builder.call(builder.inttoptr(function, signature.as_pointer()), arguments)
        return context.get_dummy_value()

    return types.void(compute_at, m, n, k, a_at, b_at, c_at), codegen


# MKL's compute with beta = 0 costs more than zeroing the output and adding to it (beta = 1): 116
# rows, K = 19 to 66, N = 256: 5-10 us a call; the same at K = 256. The bits are those of beta = 0,
# except that no zero comes out negative (0 + -0 = +0), whichever kernel MKL picks for the rows
@njit(nogil=True, cache=True)
def zeroed_compute(compute_at: int, m: int, n: int, k: int, a_at: int, b_at: int, c_at: int) -> None:  # pragma: no cover - compiled
    carray(float32_at(c_at), (m * n,))[:] = 0.0
    sgemm_compute(compute_at, m, n, k, a_at, b_at, c_at)


# without fast-math flags: one IEEE addition per element, as torch's ``out += bias``; a
# separate function, so the dot products' reassociation cannot fold the bias into their sums
@njit(nogil=True, cache=True)
def add_bias(out_at: int, rows: int, n: int, bias_at: int) -> None:  # pragma: no cover - compiled
    out = carray(float32_at(out_at), (rows, n))
    bias = carray(float32_at(bias_at), (n,))
    for i in range(rows):
        for j in range(n):
            out[i, j] += bias[j]


# ``reassoc`` lets LLVM keep partial sums in vector lanes (the order is fixed by the compiled
# loop, the same for every row); ``contract`` fuses each multiply-add. A C function, called by its
# address from the compiled callers (``dot``, ``low_rank``): one machine code for every caller,
# which LLVM cannot inline and re-optimize into another rounding
@cfunc(types.void(*[types.int64] * 6), fastmath={"reassoc", "contract"}, error_model="numpy", cache=True)
def dot_products(x_at: int, w_at: int, out_at: int, m: int, k: int, n: int) -> None:  # pragma: no cover - compiled
    x = carray(float32_at(x_at), (m, k))
    w = carray(float32_at(w_at), (n, k))
    out = carray(float32_at(out_at), (m, n))
    for i in range(m):
        row = x[i]
        j = 0
        while j + 4 <= n:  # four outputs share each load of the row
            w0, w1, w2, w3 = w[j], w[j + 1], w[j + 2], w[j + 3]
            s0 = s1 = s2 = s3 = np.float32(0.0)
            for kk in range(k):
                value = row[kk]
                s0 += value * w0[kk]
                s1 += value * w1[kk]
                s2 += value * w2[kk]
                s3 += value * w3[kk]
            out[i, j], out[i, j + 1], out[i, j + 2], out[i, j + 3] = s0, s1, s2, s3
            j += 4
        while j < n:
            wj = w[j]
            s = np.float32(0.0)
            for kk in range(k):
                s += row[kk] * wj[kk]
            out[i, j] = s
            j += 1


@intrinsic
def call_dot_products(typingctx: Any, dot_at: Any, x_at: Any, w_at: Any, out_at: Any, m: Any, k: Any, n: Any) -> Any:  # pragma: no cover
    """``dot_products(x_at, w_at, out_at, m, k, n)`` through its address ``dot_at``."""
    i64 = ir.IntType(64)
    signature = ir.FunctionType(ir.VoidType(), [i64] * 6)

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        builder.call(builder.inttoptr(args[0], signature.as_pointer()), list(args[1:]))
        return context.get_dummy_value()

    return types.void(dot_at, x_at, w_at, out_at, m, k, n), codegen


@njit(nogil=True, cache=True)
def dot(dot_at: int, x_at: int, w_at: int, out_at: int, m: int, k: int, n: int, bias_at: int) -> None:  # pragma: no cover - compiled
    call_dot_products(dot_at, x_at, w_at, out_at, m, k, n)
    if bias_at:
        add_bias(out_at, m, n, bias_at)


# the first ``bulk`` rows in one call, read and written in place; the ``tail`` rows after them
# as a call of ``tail_run`` rows, zero rows added, through a small buffer, their products
# written straight below the bulk where ``out`` has room for all ``tail_run`` of them
@njit(nogil=True, cache=True)
def packed(  # pragma: no cover - compiled
    compute_at: int, x_at: int, bulk: int, tail: int, tail_run: int, k: int, pack_at: int, n: int, out_at: int, out_rows: int, bias_at: int
) -> None:
    if tail and bulk * k <= PADDED_COPY_FLOATS and out_rows >= bulk + tail_run:
        # a small batch with room below it: one padded call from a copy costs less than a second
        # call (116 rows of K = 30: 1 us against 4)
        rows = np.zeros((bulk + tail_run, k), np.float32)
        rows[: bulk + tail] = carray(float32_at(x_at), (bulk + tail, k))
        zeroed_compute(compute_at, bulk + tail_run, n, k, rows.ctypes.data, pack_at, out_at)
        keep_alive(rows)
        tail = 0
    elif bulk:
        zeroed_compute(compute_at, bulk, n, k, x_at, pack_at, out_at)
    if tail:
        rows = np.zeros((tail_run, k), np.float32)
        rows[:tail] = carray(float32_at(x_at + bulk * k * 4), (tail, k))
        below = out_at + bulk * n * 4
        if out_rows >= bulk + tail_run:
            zeroed_compute(compute_at, tail_run, n, k, rows.ctypes.data, pack_at, below)
        else:
            products = np.empty((tail_run, n), np.float32)
            zeroed_compute(compute_at, tail_run, n, k, rows.ctypes.data, pack_at, products.ctypes.data)
            carray(float32_at(below), (tail, n))[:] = products[:tail]
        keep_alive(rows)
    if bias_at:
        add_bias(out_at, out_rows, n, bias_at)


# a low-rank layer's two GEMMs, each as dot products (``*_tail_run`` < 0) or as ``packed`` runs
# it: the first on the ``m`` rows of ``x``, its products kept with their padding (``hidden``
# rows), the second on all of them into ``out`` (``out_rows`` rows, room for its own padding);
# then the bias on the first ``m`` rows
@njit(nogil=True, cache=True)
def low_rank(  # pragma: no cover - compiled
    compute_at: int, dot_at: int, x_at: int, m: int, k: int, first_at: int, first_tail: int, first_tail_run: int, r: int,
    second_at: int, second_tail: int, second_tail_run: int, n: int, out_at: int, out_rows: int, bias_at: int,
) -> None:  # fmt: skip
    if first_tail_run < 0:
        rows = m
        hidden = np.empty((rows, r), np.float32)
        call_dot_products(dot_at, x_at, first_at, hidden.ctypes.data, m, k, r)
    else:
        rows = m - first_tail + first_tail_run
        hidden = np.empty((rows, r), np.float32)
        packed(compute_at, x_at, m - first_tail, first_tail, first_tail_run, k, first_at, r, hidden.ctypes.data, rows, 0)
    if second_tail_run < 0:
        call_dot_products(dot_at, hidden.ctypes.data, second_at, out_at, rows, r, n)
    else:
        packed(compute_at, hidden.ctypes.data, rows - second_tail, second_tail, second_tail_run, r, second_at, n, out_at, out_rows, 0)
    keep_alive(hidden)
    if bias_at:
        add_bias(out_at, m, n, bias_at)
