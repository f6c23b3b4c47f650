"""The compiled (numba) pieces of the CPU GEMM methods, called with integer addresses.

- :func:`dot_kernel`: ``x @ w.T`` for at most 15 outputs, each a vectorized dot product
  (:mod:`._dot_rows`, the method it serves), plus the bias if given;
- :func:`packed_kernel`: MKL's ``cblas_sgemm_compute`` on a packed weight, in the calls its case
  allows (:mod:`._packed_gemm`): the rows that fill whole multiples of its row multiple in place,
  the few left over padded with zero rows in a small buffer, plus the bias if given;
- ``low_rank`` (:func:`compiled_kernels`): a low-rank layer's two GEMMs in one call, each as dot
  products or packed, the hidden rows kept with their padding for the second.

The dot products are one C function (a numba ``cfunc``) that every caller reaches by its address,
as MKL's function is reached: LLVM cannot inline it into a caller and vectorize it there another
way, so a row's bits are the same from every path.

The bias is added as torch adds it (one float32 addition per element), so either way of adding it
gives the same bits; here it costs no second pass of torch over the output.

A layer's call is short next to the Python and torch calls around it in a model (on a 2-core VM a
low-rank layer of 116 rows runs two GEMMs in about 25 us), so they take addresses and sizes, not
arrays: a numba call with integers costs about a microsecond, one that converts three tensors
through DLPack about eight; and a zero-padded copy of the whole batch (``torch.cat``) costs more
than MKL's call on the two or three rows left over (K = 256, N = 66, 114 rows: 12 us against 3).
They run serially without the GIL: callers split large batches over threads themselves (numba's
OpenMP pool is another runtime than torch's, and each spins against the other between a model's
layers).

numba compiles them once per machine (its on-disk cache: MKL's function and the dot products
arrive as addresses at each call, so nothing process-specific is compiled in). ``CLISONIX_NUMBA=0`` turns them off: the
dot-product method then serves no case, and packed calls go through ctypes with the same bits.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, cast

import numpy as np

from .binary._numba import compiled_on

__all__ = ["DotKernel", "Kernels", "bias_address", "compiled_kernels", "dot_kernel", "packed_kernel"]


class DotKernel(NamedTuple):
    """The dot products: ``call(address, x_at, w_at, out_at, m, k, n, bias_at or 0)``."""

    call: Any
    address: int  # of the C function itself, for the compiled callers


class Kernels(NamedTuple):
    """The compiled kernels (module docstring)."""

    dot: DotKernel
    packed: Any  # (compute_at, x_at, bulk, tail, tail_run, k, pack_at, n, out_at, out_rows, bias_at or 0)
    low_rank: Any  # (compute_at, dot_at, x_at, m, k, first_at, first_tail, first_tail_run, r, second_at, second_tail, second_tail_run, n, out_at, out_rows, bias_at or 0)


def compiled_kernels() -> Kernels | None:
    """The compiled kernels, or None where numba is missing or cannot compile them, or under
    ``CLISONIX_NUMBA=0``."""
    return _compiled() if compiled_on() else None


def dot_kernel() -> DotKernel | None:
    """The dot-product kernel, or None as for :func:`compiled_kernels`."""
    kernels = compiled_kernels()
    return None if kernels is None else kernels.dot


def packed_kernel() -> Any:
    """The packed-GEMM caller, or None as for :func:`compiled_kernels`."""
    kernels = compiled_kernels()
    return None if kernels is None else kernels.packed


def bias_address(bias: Any) -> tuple[Any, int]:
    """``(keeper, address)`` where the kernels read ``bias``, a float32 CPU tensor (N,) or None
    (``(None, 0)``): its own memory, or for a strided bias or a negative view (``z.conj().imag``,
    whose memory holds the unnegated values) a plain copy of its values that ``keeper`` holds
    alive while the kernel reads it."""
    if bias is None:
        return None, 0
    if not bias.is_contiguous() or bias.is_neg():
        bias = bias.resolve_neg().contiguous()
    return bias, int(bias.data_ptr())


@functools.cache
def _compiled() -> Kernels | None:
    try:
        from . import _numba_gemm_kernels as kernels  # compiles the dot products (a cfunc)

        x, w, out = np.ones((1, 3), np.float32), np.ones((5, 3), np.float32), np.empty((1, 5), np.float32)
        dot = DotKernel(kernels.dot, cast(int, kernels.dot_products.address))  # a compiled cfunc has one
        dot.call(dot.address, x.ctypes.data, w.ctypes.data, out.ctypes.data, 1, 3, 5, 0)
        kernels.packed.compile("(" + ", ".join(["int64"] * 11) + ")")
        kernels.low_rank.compile("(" + ", ".join(["int64"] * 16) + ")")
    except Exception:  # numba missing (ImportError), or its own errors (typing, lowering, LLVM)
        return None
    return Kernels(dot, kernels.packed, kernels.low_rank)
