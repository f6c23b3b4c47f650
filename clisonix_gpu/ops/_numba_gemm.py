"""The compiled (numba) pieces of the CPU GEMM methods, called with integer addresses.

- :func:`dot_kernel`: ``x @ w.T`` for at most 16 outputs, each a vectorized dot product
  (:mod:`._dot_rows`, the method it serves), plus the bias if given;
- :func:`packed_kernel`: MKL's ``cblas_sgemm_compute`` on a packed weight, in the calls its case
  allows (:mod:`._packed_gemm`): the rows that fill whole multiples of its row multiple in place,
  the few left over padded with zero rows in a small buffer, plus the bias if given.

The bias is added as torch adds it (one float32 addition per element), so either way of adding it
gives the same bits; here it costs no second pass of torch over the output.

A layer's call is short next to the Python and torch calls around it in a model (on a 2-core VM a
low-rank layer of 116 rows runs two GEMMs in about 25 us), so both take addresses and sizes, not
arrays: a numba call with integers costs about a microsecond, one that converts three tensors
through DLPack about eight; and a zero-padded copy of the whole batch (``torch.cat``) costs more
than MKL's call on the two or three rows left over (K = 256, N = 66, 114 rows: 12 us against 3). Both run serially without
the GIL: callers split large batches over threads themselves (numba's OpenMP pool is another
runtime than torch's, and each spins against the other between a model's layers).

numba compiles them once per machine (its on-disk cache: MKL's function arrives as an address at
each call, so nothing process-specific is compiled in). ``CLISONIX_NUMBA=0`` turns both off: the
dot-product method then serves no case, and packed calls go through ctypes with the same bits.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import numpy as np

from .binary._numba import COMPILED

__all__ = ["bias_address", "dot_kernel", "packed_kernel"]


class _Kernels(NamedTuple):
    dot: Any  # (x_at, w_at, out_at, m, k, n, bias_at or 0)
    packed: Any  # (compute_at, x_at, bulk, tail, tail_run, k, pack_at, n, out_at, out_rows, bias_at or 0)


def dot_kernel() -> Any:
    """The dot-product kernel, or None where numba is missing or cannot compile it, or under
    ``CLISONIX_NUMBA=0``."""
    kernels = _kernels()
    return None if kernels is None else kernels.dot


def packed_kernel() -> Any:
    """The packed-GEMM caller, or None as for :func:`dot_kernel`."""
    kernels = _kernels()
    return None if kernels is None else kernels.packed


def bias_address(bias: Any) -> int:
    """Where the kernels may read ``bias``, a float32 CPU tensor (N,) or None: its data pointer, or
    0 for None, a strided bias or a negative view (``z.conj().imag``, whose memory holds the
    unnegated values); the caller adds a bias the kernels did not take with torch."""
    return 0 if bias is None or not bias.is_contiguous() or bias.is_neg() else int(bias.data_ptr())


def _kernels() -> _Kernels | None:
    return None if COMPILED.get() == "0" else _compiled()


@functools.cache
def _compiled() -> _Kernels | None:
    try:
        from llvmlite import ir
        from numba import carray, njit, types
        from numba.extending import intrinsic
    except ImportError:
        return None

    @intrinsic
    def float32_at(typingctx: Any, address: Any) -> Any:  # pragma: no cover - compiled
        """The float32 pointer at integer ``address``."""

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            return builder.inttoptr(args[0], context.get_value_type(types.CPointer(types.float32)))

        return types.CPointer(types.float32)(address), codegen

    @intrinsic
    def sgemm_compute(typingctx: Any, compute_at: Any, m: Any, n: Any, k: Any, a_at: Any, b_at: Any, c_at: Any) -> Any:  # pragma: no cover
        """``cblas_sgemm_compute(RowMajor, NoTrans, Packed, m, n, k, a, k, b, k, 0, c, n)`` through
        the function at ``compute_at`` (MKL LP64: 32-bit integers)."""
        i32, pointer = ir.IntType(32), ir.IntType(8).as_pointer()
        signature = ir.FunctionType(ir.VoidType(), [i32] * 6 + [pointer, i32, pointer, i32, ir.FloatType(), pointer, i32])

        def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
            function, rows, cols, depth, a, b, c = args
            ints = [builder.trunc(value, i32) for value in (rows, cols, depth)]
            row_major, no_trans, packed = (ir.Constant(i32, value) for value in (101, 111, 151))
            builder.call(
                builder.inttoptr(function, signature.as_pointer()),
                [
                    row_major,
                    no_trans,
                    packed,
                    *ints,
                    builder.inttoptr(a, pointer),
                    ints[2],
                    builder.inttoptr(b, pointer),
                    ints[2],
                    ir.Constant(ir.FloatType(), 0.0),
                    builder.inttoptr(c, pointer),
                    ints[1],
                ],  # fmt: skip
            )
            return context.get_dummy_value()

        return types.void(compute_at, m, n, k, a_at, b_at, c_at), codegen

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
    # loop, the same for every row); ``contract`` fuses each multiply-add
    @njit(nogil=True, fastmath={"reassoc", "contract"}, error_model="numpy", cache=True)
    def dot(x_at: int, w_at: int, out_at: int, m: int, k: int, n: int, bias_at: int) -> None:  # pragma: no cover - compiled
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
        if bias_at:
            add_bias(out_at, m, n, bias_at)

    # the first ``bulk`` rows in one call, read and written in place; the ``tail`` rows after them
    # as a call of ``tail_run`` rows, zero rows added, through a small buffer, their products
    # written straight below the bulk where ``out`` has room for all ``tail_run`` of them
    @njit(nogil=True, cache=True)
    def packed(  # pragma: no cover - compiled
        compute_at: int, x_at: int, bulk: int, tail: int, tail_run: int, k: int, pack_at: int, n: int, out_at: int, out_rows: int, bias_at: int
    ) -> None:
        if bulk:
            sgemm_compute(compute_at, bulk, n, k, x_at, pack_at, out_at)
        if tail:
            rows = np.zeros((tail_run, k), np.float32)
            rows[:tail] = carray(float32_at(x_at + bulk * k * 4), (tail, k))
            below = out_at + bulk * n * 4
            if out_rows >= bulk + tail_run:
                sgemm_compute(compute_at, tail_run, n, k, rows.ctypes.data, pack_at, below)
            else:
                products = np.empty((tail_run, n), np.float32)
                sgemm_compute(compute_at, tail_run, n, k, rows.ctypes.data, pack_at, products.ctypes.data)
                carray(float32_at(below), (tail, n))[:] = products[:tail]
        if bias_at:
            add_bias(out_at, out_rows, n, bias_at)

    try:
        x, w, out = np.ones((1, 3), np.float32), np.ones((5, 3), np.float32), np.empty((1, 5), np.float32)
        dot(x.ctypes.data, w.ctypes.data, out.ctypes.data, 1, 3, 5, 0)
        packed.compile("(" + ", ".join(["int64"] * 11) + ")")
    except Exception:  # numba raises its own errors (typing, lowering, LLVM) when it cannot compile
        return None
    return _Kernels(dot, packed)
