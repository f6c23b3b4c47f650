"""The compiled CPU path of the binary algebra: the numba kernels of ``_numba_kernels``, which the
numpy backend runs for NumPy arrays and CPU torch tensors when numba is installed and compiles.

Without numba (or when its kernels fail to compile, or with ``CLISONIX_NUMBA=0``) the NumPy code
of ``_numpy`` runs instead; :func:`status` says which, and ``clisonix-gpu info`` prints it. The
kernels compile once per machine (numba's on-disk cache) and run on numba's thread pool
(``NUMBA_NUM_THREADS``).

The compiled search does not go through ``_search.search_blocks``: it selects inside the kernel
as it streams the database, where the shared loop hands whole distance blocks to an array library.
It keeps the same contract (ascending distance, ties to the lower index, CSR radius results).
"""

from __future__ import annotations

import functools
import threading
from typing import Any

import numpy as np

from ..._environ import Setting
from ..utils import cdiv

ENV_SWITCH = "CLISONIX_NUMBA"  # "0" turns the compiled path off
COMPILED = Setting(ENV_SWITCH, "1")


def compiled_on() -> bool:
    """Whether the compiled CPU paths may run: ``CLISONIX_NUMBA`` is not ``0`` (read on every call)."""
    return COMPILED.get() != "0"


# one parallel kernel call at a time: numba's workqueue threading layer (its fallback where neither
# OpenMP nor TBB loads) ends the process on parallel calls from two threads, and one call uses
# every core anyway
PARALLEL_CALL = threading.Lock()
ALL_BITS = np.uint64(0xFFFF_FFFF_FFFF_FFFF)
ROWS_PER_ITEM = 64  # queries (or rows of a) that share one transposed database tile
KEYS_PER_ITEM = 1 << 22  # top-k buffer entries one work item may hold (32 MiB)
CANDIDATES = 1 << 24  # top-k candidates across database segments, before the merge
MIN_SEGMENT_CODES = 1024  # a database segment (one work item's share) holds at least this many codes


def words(a: np.ndarray) -> np.ndarray:
    """(R, W) uint8 -> (R, ceil(W / 8)) C-contiguous uint64: a view when ``a`` allows it, else a
    zero-padded copy (zero bytes XOR to zero)."""
    r, w = a.shape
    if w % 8 == 0 and a.flags.c_contiguous and a.ctypes.data % 8 == 0 and r * w:
        return a.view(np.uint64)
    padded = np.zeros((r, cdiv(w, 8)), dtype=np.uint64)
    padded.view(np.uint8)[:, :w] = a
    return padded


def _warm_up(kernels: Any) -> None:
    """Compile (or load from the cache) every kernel with the argument types the wrappers pass."""
    a = np.arange(24, dtype=np.uint64).reshape(3, 8)
    kernels.popcount_gemm(a, a, 7, ALL_BITS, ROWS_PER_ITEM, np.empty((3, 3), np.int32))
    kernels.hamming_topk(a, a, 2, ROWS_PER_ITEM, 1, np.empty((1, 3, 2), np.int64))
    at = np.zeros((1, 3), np.int64)
    kernels.hamming_radius(a, a, 3, ROWS_PER_ITEM, 1, False, at, np.empty(0, np.int64), np.empty(0, np.int32))


@functools.cache
def _load() -> tuple[Any, str]:
    """(the kernels module, "") or (None, why the compiled path cannot run)."""
    try:
        from . import _numba_kernels as kernels
    except ImportError as exc:
        return None, f"numba is not installed ({exc}); pip install numba"
    try:
        _warm_up(kernels)
    except Exception as exc:  # numba raises its own errors (typing, lowering, LLVM) when it cannot compile
        return None, f"numba could not compile the kernels ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    return kernels, ""


def _kernels() -> Any:
    return _load()[0] if compiled_on() else None


def enabled() -> bool:
    """Whether the binary ops on NumPy arrays and CPU tensors run the compiled kernels now."""
    return _kernels() is not None


def status() -> str:
    """One line for ``clisonix-gpu info``: which CPU path the binary ops take, and why."""
    if not compiled_on():
        return f"NumPy ({ENV_SWITCH}=0)"
    kernels, reason = _load()
    if kernels is None:
        return f"NumPy: {reason}"
    import numba

    return f"compiled (numba {numba.__version__}, {numba.get_num_threads()} threads)"


def _threads() -> int:
    import numba

    return int(numba.get_num_threads())


def popcount_gemm(a: np.ndarray, b: np.ndarray, signed_bits: int | None) -> np.ndarray:
    """int32 (M, N): ``popcount(a_i ^ b_j)``, or the +-1 dot product of the first ``signed_bits``
    bits (the bits past them ignored)."""
    aw, bw = words(a), words(b)
    out = np.empty((a.shape[0], b.shape[0]), dtype=np.int32)
    if out.size == 0:
        return out
    last_mask = ALL_BITS
    if signed_bits is not None and aw.shape[1]:
        last_mask = ALL_BITS >> np.uint64(64 * aw.shape[1] - signed_bits)  # < 64 bits: n > 8(W - 1)
    with PARALLEL_CALL:
        _kernels().popcount_gemm(aw, bw, -1 if signed_bits is None else signed_bits, last_mask, ROWS_PER_ITEM, out)
    return out


def _segments(row_blocks: int, n_db: int, limit: int) -> int:
    """Database segments per query block: enough work items to keep every thread busy."""
    return max(1, min(cdiv(4 * _threads(), max(row_blocks, 1)), cdiv(n_db, MIN_SEGMENT_CODES), limit))


def hamming_topk(q: np.ndarray, db: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    qw, dw = words(q), words(db)
    n_q, n_db = q.shape[0], db.shape[0]
    rows = max(1, min(ROWS_PER_ITEM, KEYS_PER_ITEM // (2 * k + 64)))
    segments = _segments(cdiv(n_q, rows), n_db, CANDIDATES // max(n_q * k, 1))
    keys = np.empty((segments, n_q, k), dtype=np.int64)
    with PARALLEL_CALL:
        _kernels().hamming_topk(qw, dw, k, rows, segments, keys)
    best = keys[0] if segments == 1 else np.sort(keys.transpose(1, 0, 2).reshape(n_q, segments * k), axis=1)[:, :k]
    return (best // n_db).astype(np.int32), best % n_db


def hamming_radius(q: np.ndarray, db: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    qw, dw = words(q), words(db)
    n_q, n_db = q.shape[0], db.shape[0]
    r = min(r, 64 * qw.shape[1])  # no distance exceeds the code length
    segments = _segments(cdiv(n_q, ROWS_PER_ITEM), n_db, n_db)
    kernels = _kernels()
    at = np.zeros((segments, n_q), dtype=np.int64)
    with PARALLEL_CALL:
        kernels.hamming_radius(qw, dw, r, ROWS_PER_ITEM, segments, False, at, np.empty(0, np.int64), np.empty(0, np.int32))
    offsets = np.zeros(n_q + 1, dtype=np.int64)
    np.cumsum(at.sum(axis=0), out=offsets[1:])
    at = offsets[:-1] + np.cumsum(at, axis=0) - at  # segment s of query i starts after segments < s
    indices = np.empty(offsets[-1], dtype=np.int64)
    distances = np.empty(offsets[-1], dtype=np.int32)
    with PARALLEL_CALL:
        kernels.hamming_radius(qw, dw, r, ROWS_PER_ITEM, segments, True, at, indices, distances)
    return offsets, indices, distances
