"""Batch-invariant ``activation(x @ w.T + bias)`` on CPU from MKL's packed GEMM, ``w`` packed once.

MKL's packed GEMM (``cblas_sgemm_pack`` / ``cblas_sgemm_compute`` from torch's CPU library, the
pack in memory we hold, the compute called from compiled code: :func:`_pack`,
:mod:`._numba_gemm`; through torch's ``torch.ops.mkl`` ops where the functions are not exported)
lays ``w`` out once in the panels its kernels read, then multiplies any number of rows by it. Measured with torch 2.13's MKL on an
Intel CPU (2 cores, AVX-512): its rows come out bit-identical for every M from 1 to thousands (one row included: no
GEMV kernel), at every position, beside any neighbours, with misaligned rows, for packs made with a
batch-size hint of 256 or more, and under 1 and 2 threads. Two exceptions were seen, and are worked
around where the check shows it works: at N = 1 rows differ with M (a one-row weight is packed with
a zero second row, and the first column kept); and under a hint of 128, which runs batches of about
a hundred rows up to 1.7x faster, some shapes (K=30, N=19; K=256, N=84) run a lone row through a
kernel that rounds differently (such a row then runs as two, the second zero). So a batch of up
to 1024 rows is one call (larger ones go in calls of 1024 rows, the largest call the check covers),
without the row tiles, padding and per-tile re-packing of ``_tiled_gemm``, and one row costs a
GEMV's time, not a 16-row GEMM's.

The same MKL on an AMD EPYC (Zen 4, AVX-512) rounds whole groups of four rows alike, but runs
batches of one to three rows, and the rows left over when a thread's share is not a multiple of
four, through kernels that round differently. There every call runs a multiple of four rows (the
rows of a batch that fill whole multiples in place, the rest as one call padded with zero rows),
and the shapes measured keep their bits, except N = 5, 7, 9 and 10 (K >= 16), whose rows at odd
positions round differently whatever the padding: those take the dot products of
:mod:`._dot_rows`, which serve every weight of at most 15 outputs. Padding costs little from a few rows up, but one row of a 4096x4096 weight would cost a
four-row call, about three times MKL's one-row kernel on that CPU (8-9 ms against 2.9 ms, any pack
hint). So for weights of 8 MiB or more, batches of fewer rows than the multiple run instead through
:mod:`._row_kernel`, which sums K in blocks as MKL's four-row kernel does (blocks of 192 there), at
about the speed of a GEMV; the check uses it only where its rows match MKL's bit for bit.

MKL promises none of this, so :func:`packed_ok` *checks* it per case (K, N, thread count, fp32
matmul precision) on random rows the first time the case is met, with calls run as they are,
else padded to a multiple of 4, else of 8 rows, and caches the verdict; a case that fails all
three goes to the row tiles (or the exact path). float32 only (float16/bfloat16 are widened to
float32 by the caller); float64 keeps the tiles.

The pack costs about one pass over ``w`` (and, for a fresh 86 MB buffer at 4096x4096, 25 ms of
page faults), so it is cached per weight object (:func:`packed_weight`), and reused only while the
weight is unchanged:

- a torch tensor whose memory torch allocated: same object (held weakly: the entry goes when the
  tensor does), same data pointer, shape, strides, dtype and version counter -- the counter autograd
  uses to catch in-place writes, bumped by every write through the tensor or its views -- and the
  same bits at 64 fixed sample positions, which catches whole-weight rewrites that bypass the counter
  (through ``.data``);
- a NumPy array, a tensor over memory torch did not allocate (``torch.from_numpy``, DLPack), or
  an inference-mode tensor, which can change with no counter to show it: same object, and no write
  to its memory since the pack, as the kernel records it (:mod:`._write_watch`: write-protect
  tracking of its pages, read in 0.03-0.2 ms for 64 MB), for contiguous weights of 1 MiB or more
  in private memory on Linux 6.7 or newer; else the same 128-bit xxh3 hash of its bytes as at pack
  time, computed on every call in one piece per torch thread (xxhash releases the GIL): about 2 ms
  for 64 MB on 2 cores; a change goes unseen only on a hash collision. The page record misses
  only a device's DMA into pinned host memory (``cudaHostRegister``): call
  :func:`release_packed_weights` after one.

Writes that bypass the version counter and change only a few elements of a torch-allocated weight
are not seen: call :func:`release_packed_weights` after such a write, or set
``CLISONIX_PACK_CACHE_MB=0`` (pack on every call) or ``CLISONIX_CPU_GEMM=tiles``.
"""

from __future__ import annotations

import collections
import ctypes
import functools
import os
import threading
import weakref
from typing import Any, NamedTuple

import numpy as np

from .._environ import Setting
from . import _write_watch
from ._cpu_epilogue import apply_epilogue_
from ._dot_rows import DOT_ROWS, SPLIT_MACS
from ._numba_gemm import Kernels, bias_address, packed_kernel
from ._tiled_gemm import call_settings, case_key, cpu_gemm_mode, rows_independent, small_batches_match
from .utils import cpu_workers, float32_rows

__all__ = [
    "Pack",
    "PackedCase",
    "cache_info",
    "cached_pack",
    "low_rank_rows",
    "packed_compute",
    "packed_ok",
    "packed_rows",
    "packed_transform_matrix",
    "packed_weight",
    "plain_float32",
    "ready_pack",
    "release_packed_weights",
]

# batch-size hints for MKL's pack. MKL picks its kernels and its split over threads by the hint:
# a pack for batches of about a hundred rows runs them up to 1.7x faster with hint 128 than with
# 256, and a batch of a thousand rows 5% faster with 1024. Below 256 some shapes (K=129, N=33)
# get kernels whose one-row results differ from their many-row results, so 128 serves only the
# cases whose check passes with it.
_SMALL_HINT, _MIN_HINT, _MAX_HINT = 128, 256, 1024
_MAX_CALL_ROWS = 1024  # rows of one packed call: larger batches go in calls of this many (checked)
_CHECK_MIN_ROWS = 48
_CHECK_ROW_STEP = 16  # the check's row counts, and so the rows of a call, are multiples of this
# zero-padded row counts the check tries, in order, until one gives every row the same bits: MKL on
# AMD Zen 4 rounds batches of under four rows, and a thread's share that is not a multiple of four,
# in other kernels than whole groups of four (measured on an EPYC with AVX-512)
_ROW_MULTIPLES = (1, 4, 8)
# block lengths over K the check tries for the row kernel (_row_kernel), most likely first: MKL's
# four-row kernel on AMD Zen 4 sums K in blocks of 192 at K = 1031 to 4096
_ROW_KERNEL_BLOCKS = (192, 128, 256, 384, 96, 64)
_SAMPLES = 64  # positions of a torch-allocated weight compared on every reuse
_HASH_PIECE = 1 << 22  # bytes: a weight this size or larger is hashed by every torch thread
_CACHE_MB = Setting("CLISONIX_PACK_CACHE_MB", "1024")


class PackedCase(NamedTuple):
    """What the check established for one case."""

    call_rows: int  # rows one packed call may take (larger batches go in calls of this many)
    smallest_hint: int  # the smallest pack hint whose packs give the same bits (128 or 256)
    pad_one_row: bool = False  # a one-row batch runs as two rows (it and a zero row): see _small_hint_case
    row_multiple: int = 1  # every call runs a multiple of this many rows, zero rows added: see _check
    row_kernel_kc: int = 0  # fewer rows than row_multiple run through _row_kernel in blocks of this many K values (0: padded)

    def rows_to_run(self, m: int) -> int:
        """Rows a call for ``m`` rows (1 <= m <= ``call_rows``) runs, zero rows added."""
        if m == 1 and self.pad_one_row:
            return max(2, self.row_multiple)
        return -(-m // self.row_multiple) * self.row_multiple

    def split(self, m: int) -> tuple[int, int]:
        """``(tail, tail_run)`` for a batch of ``m`` rows (1 <= m <= ``call_rows``) run by the
        compiled caller: its last ``tail`` rows as one call of ``tail_run`` rows, zero rows added,
        and the rows before them, whole row multiples, as one call read in place."""
        tail = 1 if m == 1 and self.pad_one_row else m % self.row_multiple
        return tail, (self.rows_to_run(tail) if tail else 0)


_verdicts: dict[tuple[Any, ...], PackedCase | None] = {}  # None: the check failed
_lock = threading.RLock()  # re-entered when a weight dies (its weak reference's callback) under it


# <mkl_cblas.h>
_ROW_MAJOR, _NO_TRANS, _TRANS, _PACKED, _B_MATRIX = 101, 111, 112, 151, 162
_PACK_ALIGN = 64  # bytes: a pack starts on a cache line, as MKL's own allocations do
_HUGE_PAGE_WEIGHT = 8 << 20  # bytes: a weight this large gets its pack in huge pages (_pack)


class _Mkl(NamedTuple):
    """MKL's packed-GEMM functions (LP64: 32-bit integers), called through ctypes, which releases
    the GIL for the call."""

    pack_size: Any  # cblas_sgemm_pack_get_size(identifier, m, n, k) -> bytes
    pack: Any  # cblas_sgemm_pack(layout, identifier, trans, m, n, k, alpha, src, ld, dest)
    compute: Any  # cblas_sgemm_compute(layout, transa, transb, m, n, k, a, lda, b, ldb, beta, c, ldc)


class Pack(NamedTuple):
    """A weight laid out by MKL's pack in memory we hold (see :func:`_pack`)."""

    buffer: Any  # holds the memory: a NumPy array or a torch tensor of bytes
    address: int  # where the pack starts, 64-byte aligned
    blocked: np.ndarray | None = None  # the weight's block-major copy for the row kernel, where its case uses it


@functools.cache
def _mkl_ops() -> tuple[Any, Any] | None:
    """torch's MKL pack and packed-linear ops, or None where this torch build lacks them."""
    import torch

    if not torch.backends.mkl.is_available() or not hasattr(torch.ops.mkl, "_mkl_linear"):  # type: ignore[no-untyped-call]
        return None
    try:
        return torch.ops.mkl._mkl_reorder_linear_weight.default, torch.ops.mkl._mkl_linear.default
    except (AttributeError, RuntimeError):
        return None


@functools.cache
def _mkl() -> _Mkl | None:
    """The same MKL's packed-GEMM functions, called directly (for large weights: :func:`_pack`),
    from torch's CPU library; None where it does not export them."""
    import glob

    import torch

    for path in sorted(glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "*torch_cpu.*"))):
        try:
            lib = ctypes.CDLL(path)
            functions = _Mkl(lib.cblas_sgemm_pack_get_size, lib.cblas_sgemm_pack, lib.cblas_sgemm_compute)
        except (OSError, AttributeError):
            continue
        c_int, pointer = ctypes.c_int, ctypes.c_void_p
        functions.pack_size.restype = ctypes.c_size_t
        functions.pack_size.argtypes = [c_int] * 4
        functions.pack.restype = None
        functions.pack.argtypes = [c_int] * 6 + [ctypes.c_float, pointer, c_int, pointer]
        functions.compute.restype = None
        functions.compute.argtypes = [c_int] * 6 + [pointer, c_int, pointer, c_int, ctypes.c_float, pointer, c_int]
        return functions
    return None


def _hint(m: int, case: PackedCase) -> int:
    """The batch-size hint for a pack first made for ``m`` rows: MKL picks its kernels by it, never
    the rounding of the hints this case may use (checked)."""
    if m >= _MAX_HINT:
        return _MAX_HINT
    return _MIN_HINT if m >= 2 * _MIN_HINT else case.smallest_hint


def _pack(w: Any, hint: int) -> Any:
    """MKL's pack of ``w`` (N, K), a contiguous float32 CPU tensor, for batches of about ``hint``
    rows, made directly in memory we hold (a :class:`Pack`) where MKL's CBLAS functions are
    exported, else through torch's op (an opaque tensor). Both give the same bits: the same MKL
    function with the same arguments (the check runs the route its case's weights take).

    A weight of 8 MiB or more gets its pack in NumPy's memory, which NumPy backs with 2 MB huge
    pages where the kernel allows: one row, which streams the whole pack, runs about 10% faster
    from them than from 4 KiB pages (4096x4096). Smaller weights get torch's memory (4 KiB pages):
    MKL's pack size includes several MB it never touches for small weights (7.5 MB under 100 KB),
    which in huge pages would cost 2 MB of memory per pack. A direct pack is what lets the packed
    call run from compiled code (:func:`packed_rows`)."""
    n, k = w.shape
    mkl = _mkl()
    if mkl is None:
        ops = _mkl_ops()
        assert ops is not None
        return ops[0](w, hint)
    import torch

    nbytes = mkl.pack_size(_B_MATRIX, hint, n, k) + _PACK_ALIGN
    if n * k * 4 >= _HUGE_PAGE_WEIGHT:
        raw: Any = np.empty(nbytes, np.uint8)
        start = raw.ctypes.data
    else:
        raw = torch.empty(nbytes, dtype=torch.uint8, device="cpu")
        start = raw.data_ptr()
    address = start + (-start % _PACK_ALIGN)
    mkl.pack(_ROW_MAJOR, _B_MATRIX, _TRANS, hint, n, k, 1.0, w.data_ptr(), k, address)
    return Pack(raw, address)


def _pack_for(w: Any, hint: int, case: PackedCase) -> Any:
    """:func:`_pack` of ``w``, with the block-major copy the row kernel reads where ``case`` uses it
    (a weight of 8 MiB or more, whose pack is a :class:`Pack`)."""
    pack = _pack(w, hint)
    if case.row_kernel_kc and isinstance(pack, Pack):
        from ._row_kernel import blocked_copy

        pack = pack._replace(blocked=blocked_copy(w))
    return pack


def packed_compute(x: Any, pack: Any, w: Any) -> Any:
    """``x @ w.T`` from ``pack`` (of ``w``, by :func:`_pack`) in one MKL call of x's rows as they
    are: (M, N) float32 tensor; ``x`` a contiguous float32 CPU tensor (M, K), M >= 1, K >= 1. What
    :func:`packed_rows` runs where the compiled caller (:func:`._numba_gemm.packed_kernel`) is
    off or the pack is torch's. Every route adds the products to a zeroed output, as the compiled
    caller does (faster than MKL's overwrite: ``_numba_gemm_kernels.zeroed_compute``): the same
    bits, and no zero result negative."""
    m, k = x.shape
    n = w.shape[0]
    if not isinstance(pack, Pack):
        ops = _mkl_ops()
        assert ops is not None
        # a zero bias: torch's op then adds the products to zeros, as the compiled caller does
        return ops[1](x, pack, w, x.new_zeros(n), m)
    mkl = _mkl()
    assert mkl is not None
    out = float32_rows(m, n).zero_()
    mkl.compute(_ROW_MAJOR, _NO_TRANS, _PACKED, m, n, k, x.data_ptr(), k, pack.address, k, 1.0, out.data_ptr(), n)
    return out


@functools.cache
def _compute_address() -> int:
    """Where MKL's ``cblas_sgemm_compute`` starts, for :func:`._numba_gemm.packed_kernel`."""
    mkl = _mkl()
    assert mkl is not None
    return int(ctypes.cast(mkl.compute, ctypes.c_void_p).value or 0)


def _rows_within(k: int, n: int, macs: int) -> int:
    """Rows of this case whose GEMM stays within ``macs`` multiply-adds, between 48 and 1024, a
    multiple of 16 (so of every row multiple the check tries)."""
    rows = min(_MAX_CALL_ROWS, macs // max(k * n, 1))
    return max(_CHECK_MIN_ROWS, rows - rows % _CHECK_ROW_STEP)


def _check(k: int, n: int) -> PackedCase | None:
    """Does MKL's packed GEMM give every row the same bits at other positions, beside other rows,
    in batches of 1 row to the largest a call may take, from misaligned rows, with packs made for
    1024 rows and from a misaligned ``w``? Random float32 rows of this case's shape, with calls
    run as they are or, where that fails, padded with zero rows to a multiple of 4 or 8 rows
    (``_ROW_MULTIPLES``). Returns the rows a call may take, the row multiple, and the smallest pack
    hint that gives the same bits (128, with or without one row run as two, else 256); None where
    the check fails."""
    import torch

    gen = torch.Generator().manual_seed(4321)
    spare = torch.randn(n * k + 1, generator=gen, device="cpu")
    w_misaligned = spare[1:].view(n, k)
    w = w_misaligned.clone()
    # most checks within 2^30 multiply-adds; one call of the largest batch a call may take (larger
    # batches go in calls of that many), within 2^33
    count, call_rows = _rows_within(k, n, 1 << 30), _rows_within(k, n, 1 << 33)
    rows_all = torch.randn(max(count, call_rows), k, generator=gen, device="cpu")
    packs = _CheckPacks(w, _pack(w, _MIN_HINT), _pack(w, _MAX_HINT), w_misaligned, _pack(w_misaligned, _MIN_HINT))
    for multiple in _ROW_MULTIPLES:
        case = PackedCase(call_rows, _MIN_HINT, row_multiple=multiple)
        reference = _rows_hold(case, packs, rows_all, count, gen)
        if reference is not None:
            case = case._replace(row_kernel_kc=_row_kernel_block(w, rows_all, reference, case))
            pad = _small_hint_case(w, rows_all, reference, case)
            return case if pad is None else case._replace(smallest_hint=_SMALL_HINT, pad_one_row=pad)
    return None


def _row_kernel_block(w: Any, rows_all: Any, reference: Any, case: PackedCase) -> int:
    """The block length over K with which :mod:`._row_kernel` gives ``reference``'s bits for batches
    of 1 to ``case.row_multiple - 1`` rows at several positions, for a weight of 8 MiB or more
    whose case pads (there one padded row costs a four-row call); 0 where none does or the kernel
    cannot run."""
    from . import _row_kernel

    n, k = w.shape
    if case.row_multiple == 1 or n * k * 4 < _HUGE_PAGE_WEIGHT or _mkl() is None or _row_kernel.kernel() is None:
        return 0
    import torch

    blocked = _row_kernel.blocked_copy(w)
    count = reference.shape[0]
    batches = [(rows, start) for rows in range(1, case.row_multiple) for start in (0, 7, count - rows)]
    for kc in (*_ROW_KERNEL_BLOCKS, k):
        if all(
            torch.equal(_row_kernel.rows_blocked(rows_all[start : start + rows], blocked, n, kc), reference[start : start + rows])
            for rows, start in batches
        ):
            return kc
    return 0


class _CheckPacks(NamedTuple):
    w: Any
    pack: Any  # hint 256
    pack_for_many: Any  # hint 1024
    w_misaligned: Any  # the same values one float off a cache line
    pack_of_misaligned: Any  # hint 256


def _rows_hold(case: PackedCase, packs: _CheckPacks, rows_all: Any, count: int, gen: Any) -> Any:
    """The product of the first ``count`` of ``rows_all`` in one call (run as ``case`` says), if
    every one of its rows keeps its bits in the calls the check makes (:func:`_check`); else None."""
    import torch

    w, k = packs.w, rows_all.shape[1]
    x = rows_all[:count]

    def run(rows: Any, pack: Any = packs.pack, weight: Any = w) -> Any:
        return packed_rows(rows, pack, weight, case)

    reference = run(x)
    if not rows_independent(run, x, reference, 5, gen):
        return None
    if not small_batches_match(run, x, reference, smallest=1):
        return None
    shifted = torch.empty(count * k + 1, device="cpu")[1:].view(count, k)
    shifted.copy_(x)
    if not torch.equal(run(shifted), reference):
        return None
    if not torch.equal(run(x, packs.pack_for_many), reference):
        return None
    if not torch.equal(run(x, packs.pack_of_misaligned, packs.w_misaligned), reference):
        return None
    if rows_all.shape[0] > count and not torch.equal(run(rows_all)[:count], reference):
        return None
    # batches kept with their padding (a low-rank layer's hidden rows), small ones run as one
    # padded call from a copy
    for rows in (3, 45, count - 1):
        if not torch.equal(packed_rows(x[:rows], packs.pack, w, case, padded=True)[:rows], reference[:rows]):
            return None
    return reference


def _small_hint_case(w: Any, rows_all: Any, reference: Any, case: PackedCase) -> bool | None:
    """None where a pack of ``w`` made with the small hint gives other bits than ``reference`` for
    batches of 2 to 33 rows, all the checked rows in one call, or the largest call (each run as
    ``case`` says); else whether a one-row batch must run as two rows to give its bits. Some shapes
    (K=30, N=19; K=256, N=84) run one row through another kernel under the small hint; two rows cost
    about the same."""
    import torch

    pack = _pack(w, _SMALL_HINT)
    count = reference.shape[0]

    def run(rows: Any, case: PackedCase = case) -> Any:
        return packed_rows(rows, pack, w, case)

    if not small_batches_match(run, rows_all, reference, smallest=2):
        return None
    if not torch.equal(run(rows_all)[:count], reference):
        return None
    for pad in (False, True):
        padded = case._replace(smallest_hint=_SMALL_HINT, pad_one_row=pad)
        if all(torch.equal(run(rows_all[start : start + 1], padded), reference[start : start + 1]) for start in (0, 7, count - 1)):
            return pad
    return None


def _packable(w: Any) -> Any:
    """``w`` (N, K) as it is packed: with a zero second row where N = 1 (the first column of that
    product keeps its bits whatever the batch size; a one-column product does not)."""
    import torch

    return torch.cat([w, torch.zeros_like(w)]) if w.shape[0] == 1 else w


def packed_rows(x: Any, pack: Any, w: Any, case: PackedCase, *, bias: Any = None, padded: bool = False) -> Any:
    """``x @ w.T + bias`` (M, N) float32 from ``pack`` (of ``w``) in the calls ``case`` allows; ``x``
    (M, K) contiguous, M >= 1; ``bias`` (N,) float32 or None, added as torch adds it.

    A batch of at most ``case.call_rows`` rows runs through :func:`._numba_gemm.packed_kernel`
    where the pack is ours: its rows that fill whole multiples of ``case.row_multiple`` in one call
    read in place, the rest as one call padded with zero rows; elsewhere (torch's pack, or
    ``CLISONIX_NUMBA=0``) the whole batch as one padded call (:func:`packed_compute`). The check
    established that every such call gives each row the same bits. Larger batches go in calls of
    ``case.call_rows`` rows; fewer rows than the multiple go through the row kernel where the case
    says so (a large weight's ``pack`` then holds its block-major copy).

    With ``padded``, the products of the zero rows a padded call added stay below the M rows (a
    contiguous tensor of the rows run): the next GEMM of a chain takes them as they are, in calls
    that need no padding, and whoever ends the chain keeps the first M rows."""
    m, k = x.shape
    n = w.shape[0]
    if n == 1 or m > case.call_rows or _row_kernel_serves(m, pack, case):
        out = _rows_apart(x, pack, w, case)
    else:
        tail, tail_run = case.split(m)
        kernel = packed_kernel() if isinstance(pack, Pack) else None
        if kernel is not None:
            rows_out = m - tail + tail_run if padded else m
            out = float32_rows(rows_out, n)
            keeper, bias_at = bias_address(bias)
            kernel(_compute_address(), x.data_ptr(), m - tail, tail, tail_run, k, pack.address, n, out.data_ptr(), rows_out, bias_at)
            del keeper  # the bias the kernel read stays alive until here
            return out
        import torch

        run = m - tail + tail_run
        out = packed_compute(x if run == m else torch.cat((x, x.new_zeros((run - m, k)))), pack, w)
        out = out if padded or run == m else out[:m]
    if bias is not None:
        out += bias
    return out


def low_rank_rows(x: Any, first: Any, first_ready: Any, second: Any, second_ready: Any, bias: Any, kernels: Kernels) -> Any:
    """``(x @ first.T) @ second.T + bias`` (M, N) float32, a low-rank layer's two GEMMs, in one
    call of ``kernels.low_rank`` (:func:`._numba_gemm.compiled_kernels`), each GEMM as its ready
    answer says: the dot products (:data:`._dot_rows.DOT_ROWS`), or one packed call with our pack
    (its (case, pack)), the first GEMM's products kept with their padding for the second. The bits
    of the two GEMMs run apart (each method's check: a row's bits do not depend on the rows around
    it); None where the pair does not run as one call (the caller runs them apart): a packed step
    with a one-row weight, more rows than one call takes or a few rows for the row kernel, a dot
    step large enough to split over threads. ``x`` (M, K) contiguous float32, M >= 1, ``first``
    (R, K) and ``second`` (N, R) plain float32 weights; ``bias`` (N,) float32 or None."""
    m, k = x.shape
    r, n = first.shape[0], second.shape[0]
    first_step = _pair_step(first, first_ready, m)
    if first_step is None:
        return None
    rows = m - first_step[1] + max(first_step[2], 0)  # the first GEMM's rows with their padding
    second_step = _pair_step(second, second_ready, rows)
    if second_step is None:
        return None
    out_rows = rows - second_step[1] + max(second_step[2], 0)
    out = float32_rows(out_rows, n)
    keeper, bias_at = bias_address(bias)
    kernels.low_rank(_compute_address(), kernels.dot.address, x.data_ptr(), m, k, *first_step, r, *second_step, n, out.data_ptr(), out_rows, bias_at)
    del keeper  # the bias the kernel read stays alive until here
    return out if out_rows == m else out[:m]


def _pair_step(w: Any, ready: Any, rows: int) -> tuple[int, int, int] | None:
    """(address, tail, tail_run) of one GEMM of :func:`low_rank_rows` on ``rows`` rows: the dot
    products read ``w`` (tail_run -1), a packed call its pack; None where the step does not run
    there (a batch the row kernel takes runs apart)."""
    n, k = w.shape
    if ready is DOT_ROWS:
        return None if rows * k * n >= SPLIT_MACS else (w.data_ptr(), 0, -1)
    case, pack = ready
    if n == 1 or rows > case.call_rows or type(pack) is not Pack or _row_kernel_serves(rows, pack, case):
        return None
    return (pack.address, *case.split(rows))


def _rows_apart(x: Any, pack: Any, w: Any, case: PackedCase) -> Any:
    """:func:`packed_rows` without bias where a batch is not one packed call: a one-row weight, more
    rows than one call takes, or a few rows through the row kernel."""
    m, n = x.shape[0], w.shape[0]
    if n == 1:
        # the packed call reads only the shape of the weight it is given (the pack holds the
        # values): a (2, K) view, not the zero-padded copy the pack was made from
        return packed_rows(x, pack, w.expand(2, -1), case)[:, :1].contiguous()
    if m > case.call_rows:
        out = float32_rows(m, n)
        for start in range(0, m, case.call_rows):
            out[start : start + case.call_rows] = packed_rows(x[start : start + case.call_rows], pack, w, case)
        return out
    from ._row_kernel import rows_blocked

    return rows_blocked(x, pack.blocked, n, case.row_kernel_kc)


def _row_kernel_serves(m: int, pack: Any, case: PackedCase) -> bool:
    """Whether a batch of ``m`` rows runs through the row kernel: fewer rows than the case's
    multiple, a case that uses it, a pack holding the block-major copy, the kernel compiled (not
    ``CLISONIX_NUMBA=0``, where such a batch runs padded, with the same bits)."""
    if m >= case.row_multiple or not case.row_kernel_kc or not isinstance(pack, Pack) or pack.blocked is None:
        return False
    from ._row_kernel import kernel

    return kernel() is not None


def packed_ok(k: int, n: int, dtype: Any) -> PackedCase | None:
    """What the check established for this case under torch's current thread count (the packed
    path serves it), or None: float32 compute (``dtype`` float32, float16 or bfloat16), MKL's packed
    ops present, ``CLISONIX_CPU_GEMM`` auto, and the check passed (run on first use, cached)."""
    import torch

    if dtype == torch.float64 or cpu_gemm_mode() != "auto" or k == 0 or n == 0 or _mkl_ops() is None:
        return None
    n = max(n, 2)  # a one-row weight is packed with a zero second row (_packable)
    key = case_key(k, n, torch.float32)
    if key in _verdicts:
        return _verdicts[key]
    with _lock:
        if key not in _verdicts:
            _verdicts[key] = _check(k, n)
        return _verdicts[key]


# ----------------------------------------------------------------------------- the weight cache


class _Entry(NamedTuple):
    source: weakref.ref[Any]
    stamp: tuple[Any, ...]
    proof: _Proof
    pack: Any
    nbytes: int
    case: PackedCase  # the case's verdict under the stamp's settings
    plain: bool  # the source as packed was plain float32 dense memory (plain_float32): the shortcuts may serve it

    def drop(self) -> None:
        """Called once the entry leaves the cache: ends its page watch, if any."""
        if isinstance(self.proof, _write_watch.PageWatch):
            self.proof.close()


_cache: collections.OrderedDict[int, _Entry] = collections.OrderedDict()
_cached_bytes = 0


def _cache_limit() -> int:
    """Bytes the cache may hold (``CLISONIX_PACK_CACHE_MB``, default 1024; 0 packs on every call)."""
    text = _CACHE_MB.get()
    try:
        megabytes = float(text)
    except ValueError:
        raise ValueError(f"CLISONIX_PACK_CACHE_MB must be a number of megabytes, got {text!r}") from None
    return max(0, int(megabytes * (1 << 20)))


def _bytes_of(source: Any) -> tuple[Any, memoryview]:
    """(keeper, ``source``'s bytes in memory order as a flat memoryview), copied only where
    ``source`` is not contiguous; ``keeper`` holds the memory while the view is in use. A tensor is
    read through its data pointer, never exported to NumPy: ``Tensor.numpy()`` marks the storage
    not resizable for good, a change to the caller's tensor."""
    if isinstance(source, np.ndarray):
        flat = np.ascontiguousarray(source).reshape(-1).view(np.uint8)
        return flat, flat.data
    t = source.detach()
    t = t if t.is_contiguous() else t.contiguous()
    nbytes = t.numel() * t.element_size()
    if nbytes == 0:
        return t, memoryview(b"")
    return t, memoryview((ctypes.c_char * nbytes).from_address(t.data_ptr())).cast("B")


def _tracked(source: Any) -> bool:
    """Whether every write to ``source``'s memory through torch bumps a version counter we can read:
    a tensor whose storage torch allocated (NumPy's and DLPack's memory is not resizable), outside
    inference mode (inference tensors have no version counter)."""
    return not isinstance(source, np.ndarray) and not source.is_inference() and source.untyped_storage().resizable()


def _stamp(source: Any, settings: tuple[int, str] | None = None) -> tuple[Any, ...]:
    """What must stay the same for a cached pack to serve ``source``: its memory, shape, strides,
    dtype and version counter, and the call settings (``call_settings()``, taken now unless given)
    its case's verdict holds for."""
    settings = settings or call_settings()
    if isinstance(source, np.ndarray):
        return (None, source.__array_interface__["data"][0], source.shape, source.strides, source.dtype.str, *settings)
    try:
        version = source._version
    except RuntimeError:  # an inference-mode tensor has no version counter
        version = None
    return (version, source.data_ptr(), source.shape, source.stride(), source.dtype, *settings)


def plain_float32(a: Any) -> bool:
    """``a`` is a plain float32 array in dense memory the packed GEMM reads in place: a
    C-contiguous NumPy array, or a contiguous strided CPU tensor (``torch.Tensor`` or
    ``nn.Parameter``, no subclass)."""
    if type(a) is np.ndarray:
        return bool(a.dtype == np.float32 and a.flags.c_contiguous)
    torch = _torch_names()
    return type(a) in torch.plain and a.dtype is torch.float32 and a.is_cpu and a.layout is torch.strided and a.is_contiguous()


class _TorchNames(NamedTuple):
    plain: tuple[type, ...]  # torch.Tensor, torch.nn.Parameter: no subclass
    float32: Any
    strided: Any


@functools.cache
def _torch_names() -> _TorchNames:
    """The torch names :func:`plain_float32` reads on every call, looked up once."""
    import torch

    return _TorchNames((torch.Tensor, torch.nn.Parameter), torch.float32, torch.strided)


def _sample_positions(shape: tuple[int, ...]) -> np.ndarray:
    """64 fixed flat positions (row-major over ``shape``) of a weight's elements."""
    rng = np.random.default_rng(0)
    return rng.integers(0, shape[0], _SAMPLES) * shape[1] + rng.integers(0, shape[1], _SAMPLES)


def _digest(source: Any) -> tuple[int, ...]:
    """xxh3-128 hashes of ``source``'s bytes, one per torch thread for large weights."""
    import torch
    import xxhash

    keeper, flat = _bytes_of(source)
    threads = torch.get_num_threads()
    if threads == 1 or flat.nbytes < _HASH_PIECE:
        return (xxhash.xxh3_128_intdigest(flat),)
    step = -(-flat.nbytes // threads)
    pieces = [flat[start : start + step] for start in range(0, flat.nbytes, step)]
    digests = tuple(cpu_workers(threads).map(xxhash.xxh3_128_intdigest, pieces))
    del keeper  # the memory the pieces read stays alive until here
    return digests


class _Sample(NamedTuple):
    raw: np.ndarray  # the weight's memory as integers of its item size (a view), read while its stamp holds
    positions: np.ndarray
    bits: bytes


_Proof = _Sample | _write_watch.PageWatch | tuple[int, ...]


def _proof(source: Any) -> _Proof:
    """What shows later that ``source`` is unchanged (module docstring): sampled bits of a weight in
    torch's memory, else the kernel's record of writes to its pages, else hashes of all its bits."""
    if _tracked(source):
        import torch

        integer = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[source.element_size()]
        # a NumPy view through DLPack (not .numpy(), which marks the storage not resizable): a take
        # of 64 elements and a bytes compare cost about 1 us, a quarter of torch's indexing
        raw = np.from_dlpack(source.detach().view(integer))
        positions = _sample_positions(tuple(source.shape))
        return _Sample(raw, positions, raw.take(positions).tobytes())
    page_watch = _watch_pages(source)
    return page_watch if page_watch is not None else _digest(source)


def _watch_pages(source: Any) -> _write_watch.PageWatch | None:
    """A record of writes to ``source``'s memory from now on, for a contiguous weight (a strided
    one is hashed from a copy); None where the memory cannot be watched."""
    if isinstance(source, np.ndarray):
        if not source.flags.c_contiguous:
            return None
        return _write_watch.watch(source.__array_interface__["data"][0], source.nbytes)
    if not source.is_contiguous():
        return None
    return _write_watch.watch(source.data_ptr(), source.numel() * source.element_size())


def _unchanged(source: Any, proof: _Proof) -> bool:
    if isinstance(proof, _Sample):
        return proof.raw.take(proof.positions).tobytes() == proof.bits
    if isinstance(proof, _write_watch.PageWatch):
        return not proof.written()
    return _digest(source) == proof


def _forget(key: int) -> None:
    global _cached_bytes
    with _lock:
        entry = _cache.pop(key, None)
        if entry is not None:
            _cached_bytes -= entry.nbytes
            entry.drop()


def _live_entry(source: Any, settings: tuple[int, str] | None = None) -> _Entry | None:
    """The cache entry of ``source`` (the weight as the caller passed it) while it is unchanged
    (module docstring) under ``settings`` (``call_settings()``, taken now unless given), moved to
    the recent end; else None. No lock: a dictionary lookup is atomic, and an entry dropped
    meanwhile fails the move to the end."""
    key = id(source)
    entry = _cache.get(key)
    if entry is None or entry.source() is not source or entry.stamp != _stamp(source, settings):
        return None
    try:
        _cache.move_to_end(key)
    except KeyError:
        return None
    return entry if _unchanged(source, entry.proof) else None


def ready_pack(source: Any, settings: tuple[int, str]) -> tuple[PackedCase, Any] | None:
    """(case, pack) of ``source`` for float32 rows, where it was packed as plain float32 dense
    memory (:func:`plain_float32`; its unchanged stamp keeps it so) and its pack is cached and
    unchanged under ``settings``; else None. Neither checks nor packs: the general path does both.
    For the layer shortcuts, whose callers establish that the packed method may serve
    (``CLISONIX_CPU_GEMM`` auto)."""
    entry = _live_entry(source, settings)
    return (entry.case, entry.pack) if entry is not None and entry.plain else None


def cached_pack(source: Any) -> Any:
    """The cached pack of ``source`` (the weight as the caller passed it) while it is unchanged
    (module docstring), else None; no pack is made."""
    entry = _live_entry(source)
    return None if entry is None else entry.pack


def packed_weight(source: Any, w: Any, rows: int, case: PackedCase) -> Any:
    """MKL's pack of ``w`` (N, K) float32 contiguous, the float32 form of ``source`` (the weight as
    the caller passed it: a NumPy array or CPU tensor of shape (N, K)), from the cache while
    ``source`` is unchanged (module docstring), else packed now for a batch of ``rows`` (with a
    hint ``case`` allows) and cached."""
    pack = cached_pack(source)
    if pack is not None:
        return pack
    key, stamp = id(source), _stamp(source)  # the stamp before the proof, the proof before the pack
    packable, hint = _packable(w), _hint(rows, case)
    limit = _cache_limit()
    nbytes = w.numel() * w.element_size()
    if nbytes > limit:
        return _pack_for(packable, hint, case)
    try:
        source_ref = weakref.ref(source, lambda _: _forget(key))
    except TypeError:  # an object without weak references: not cached
        return _pack_for(packable, hint, case)
    _forget(key)  # ends the stale entry's page watch, which would keep a new one off that memory
    proof = _proof(source)  # before the pack: a write in between makes the next call pack again
    pack = _pack_for(packable, hint, case)
    if isinstance(pack, Pack) and pack.blocked is not None:
        nbytes += pack.blocked.nbytes  # the row kernel's copy counts against the cache's limit too
    global _cached_bytes
    with _lock:
        _forget(key)  # an entry another thread made meanwhile
        _cache[key] = _Entry(source_ref, stamp, proof, pack, nbytes, case, plain_float32(source))
        _cached_bytes += nbytes
        while _cached_bytes > limit and _cache:
            _forget(next(iter(_cache)))  # the least recently used
    return pack


def release_packed_weights() -> None:
    """Drop every cached packed weight: they are rebuilt on the next call that needs them. Call it
    after writing a weight in a way its version counter does not see (``.data``, a ``.numpy()``
    view), or to free the cache's memory.

    >>> w = torch.randn(8, 4)
    >>> _ = cg.transform_matrix(torch.randn(2, 4), w)
    >>> w.data[0, 0] = 5.0  # bypasses w's version counter
    >>> cg.release_packed_weights()
    """
    global _cached_bytes
    with _lock:
        for entry in _cache.values():
            entry.drop()
        _cache.clear()
        _cached_bytes = 0


def cache_info() -> dict[str, int]:
    """``{"weights": cached packs, "bytes": the weights' bytes they account for, "limit": bytes,
    "watched": packs whose weights' pages the kernel watches for writes (not hashed per call)}``."""
    with _lock:
        watched = sum(isinstance(entry.proof, _write_watch.PageWatch) for entry in _cache.values())
        return {"weights": len(_cache), "bytes": _cached_bytes, "limit": _cache_limit(), "watched": watched}


def packed_transform_matrix(
    x: Any, w: Any, bias: Any, activation: str | None, source: Any, case: PackedCase, keep_preactivation: bool = False
) -> tuple[Any, Any]:
    """``(activation(x @ w.T + bias), preactivation)`` for torch CPU tensors ``x`` (M, K), ``w``
    (N, K), ``bias`` (N,) or None, all float32, ``w`` the float32 form of ``source`` (the weight
    as passed, the cache's key): (M, N) float32, and ``x @ w.T + bias`` with
    ``keep_preactivation`` (else None). ``case``: what :func:`packed_ok` returned for the case."""
    import torch

    m = x.shape[0]
    if m == 0:
        out = torch.zeros((0, w.shape[0]), dtype=torch.float32, device="cpu")
    else:
        w = w if w.is_contiguous() else w.contiguous()
        x = x if x.is_contiguous() else x.contiguous()
        out = packed_rows(x, packed_weight(source, w, m, case), w, case, bias=bias)
    preactivation = apply_epilogue_(out, None, activation, keep_preactivation)
    return out, preactivation
