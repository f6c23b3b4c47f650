"""The blocked search every backend shares: one loop over (database block, query block) pairs,
one top-k merge and one CSR assembler for ``hamming_radius``, and :func:`clear_pad_bits` for the
products that take a bit count.

A backend supplies how to prepare a database block and how to compute a block of int32 distances;
array operations go through :class:`ArrayOps`, so NumPy, CuPy and torch run the same code.
Memory stays bounded for any number of queries and database codes: a block holds about
:data:`BLOCK_ENTRIES` distances.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

BLOCK_ENTRIES = 1 << 24


def clear_pad_bits(a: Any, n_bits: int) -> Any:
    """Packed rows ``a`` (..., W) with the bits past ``n_bits`` cleared (NumPy, CuPy or torch): ``a``
    itself when ``n_bits`` fills whole bytes, else a copy. Ops that take ``n`` ignore those bits."""
    if n_bits % 8 == 0 or a.shape[-1] == 0:
        return a
    cleared = a.clone() if hasattr(a, "clone") else a.copy()
    cleared[..., -1] &= 0xFF >> (8 - n_bits % 8)
    return cleared


def search_blocks(
    n_queries: int,
    n_db: int,
    prepare_db: Callable[[int, int], Any],
    distances: Callable[[int, int, Any], Any],
    *,
    entry_cost: int = 1,
    row_entries: int = 0,
) -> Iterator[tuple[int, int, Any]]:
    """Yield ``(q_start, db_start, d)`` with ``d`` the int32 distances of queries
    ``[q_start, q_start + rows)`` to database codes ``[db_start, db_start + cols)``.

    ``prepare_db(start, stop)`` runs once per database block; ``distances(q_start, q_stop, prepared)``
    once per pair of blocks. ``entry_cost``: temporaries a backend holds per distance (e.g. the
    bytes of an XOR); ``row_entries``: temporaries per query row (e.g. an unpacked row). Both count
    against the block budget.
    """
    budget = max(1, BLOCK_ENTRIES // max(entry_cost, 1))
    db_step = max(1, min(n_db, budget))
    q_step = max(1, budget // max(db_step, row_entries, 1))
    for ds in range(0, n_db, db_step):
        prepared = prepare_db(ds, min(ds + db_step, n_db))
        for qs in range(0, n_queries, q_step):
            yield qs, ds, distances(qs, min(qs + q_step, n_queries), prepared)


def word_blocks(q_words: Any, db_words: Any, popcount_gemm: Callable[[Any, Any, None], Any]) -> Iterator[tuple[int, int, Any]]:
    """:func:`search_blocks` over rows of packed words: a database block is a slice of ``db_words``
    and ``popcount_gemm(q_rows, db_rows, None)`` gives its int32 Hamming distances."""
    return search_blocks(q_words.shape[0], db_words.shape[0], lambda start, stop: db_words[start:stop],
                         lambda start, stop, db_rows: popcount_gemm(q_words[start:stop], db_rows, None))  # fmt: skip


class ArrayOps:
    """The array operations of the shared search, for a NumPy-like module (``numpy``, ``cupy``)."""

    def __init__(self, xp: Any):
        self.xp = xp

    def int64(self, a: Any) -> Any:
        return a.astype(self.xp.int64)

    def int32(self, a: Any) -> Any:
        return a.astype(self.xp.int32)

    def arange(self, start: int, stop: int) -> Any:
        return self.xp.arange(start, stop, dtype=self.xp.int64)

    def zeros(self, shape: int | tuple[int, ...], dtype: str) -> Any:
        return self.xp.zeros(shape, dtype=getattr(self.xp, dtype))

    def concat(self, parts: list[Any], axis: int = 0) -> Any:
        return self.xp.concatenate(parts, axis=axis)

    def smallest(self, keys: Any, k: int) -> Any:
        """The ``k`` smallest keys of each row (all of them when a row has fewer), in any order."""
        if k >= keys.shape[1]:
            return keys
        return self.xp.partition(keys, k - 1, axis=1)[:, :k]

    def sort_rows(self, keys: Any) -> Any:
        return self.xp.sort(keys, axis=1)

    def argsort(self, a: Any) -> Any:
        return self.xp.argsort(a)

    def nonzero(self, mask: Any) -> tuple[Any, Any]:
        rows, cols = self.xp.nonzero(mask)  # row-major order
        return rows, cols

    def bincount(self, a: Any, minlength: int) -> Any:
        return self.xp.bincount(a, minlength=minlength)

    def cumsum(self, a: Any) -> Any:
        return self.xp.cumsum(a)


class TorchArrayOps(ArrayOps):
    """:class:`ArrayOps` for torch tensors on ``device``."""

    def __init__(self, device: Any):
        import torch

        super().__init__(torch)
        self.device = device

    def int64(self, a: Any) -> Any:
        return a.to(self.xp.int64)

    def int32(self, a: Any) -> Any:
        return a.to(self.xp.int32)

    def arange(self, start: int, stop: int) -> Any:
        return self.xp.arange(start, stop, dtype=self.xp.int64, device=self.device)

    def zeros(self, shape: int | tuple[int, ...], dtype: str) -> Any:
        return self.xp.zeros(shape, dtype=getattr(self.xp, dtype), device=self.device)

    def concat(self, parts: list[Any], axis: int = 0) -> Any:
        return self.xp.cat(parts, dim=axis)

    def smallest(self, keys: Any, k: int) -> Any:
        if k >= keys.shape[1]:
            return keys
        return self.xp.topk(keys, k, dim=1, largest=False, sorted=False).values

    def sort_rows(self, keys: Any) -> Any:
        return self.xp.sort(keys, dim=1).values

    def nonzero(self, mask: Any) -> tuple[Any, Any]:
        rows, cols = self.xp.nonzero(mask, as_tuple=True)
        return rows, cols

    def cumsum(self, a: Any) -> Any:
        return self.xp.cumsum(a, dim=0)


def topk_from_blocks(blocks: Iterator[tuple[int, int, Any]], n_queries: int, n_db: int, k: int, ops: ArrayOps) -> tuple[Any, Any]:
    """``(distances int32 (Q, k), indices int64 (Q, k))`` from :func:`search_blocks`' blocks.

    Each distance and index form one int64 key ``d * n_db + index``: keys are unique, so which of
    several equal distances is kept never depends on a selection algorithm, and sorting keys
    orders by distance, then by the lower index.
    """
    best: dict[int, Any] = {}
    for qs, ds, d in blocks:
        keys = ops.smallest(ops.int64(d) * n_db + ops.arange(ds, ds + d.shape[1]), k)
        if qs in best:
            keys = ops.smallest(ops.concat([best[qs], keys], axis=1), k)
        best[qs] = keys
    keys = ops.concat([best[qs] for qs in sorted(best)]) if best else ops.zeros((n_queries, k), "int64")
    keys = ops.sort_rows(keys)
    return ops.int32(keys // n_db), keys % n_db


def radius_from_blocks(blocks: Iterator[tuple[int, int, Any]], n_queries: int, n_db: int, r: int, ops: ArrayOps) -> tuple[Any, Any, Any]:
    """``(offsets int64 (Q + 1,), indices int64, distances int32)`` in CSR layout from
    :func:`search_blocks`' blocks: every code within distance ``r``, ascending index per query."""
    counts = ops.zeros(n_queries, "int64")
    found: dict[int, list[tuple[Any, Any, Any]]] = {}
    database_blocks = set()
    for qs, ds, d in blocks:
        rows, cols = ops.nonzero(d <= r)
        counts[qs : qs + d.shape[0]] += ops.bincount(rows, minlength=d.shape[0])
        found.setdefault(qs, []).append((rows + qs, cols + ds, d[rows, cols]))
        database_blocks.add(ds)
    offsets = ops.concat([ops.zeros(1, "int64"), ops.cumsum(counts)])
    parts = [part for qs in sorted(found) for part in found[qs]]
    if not parts:
        return offsets, ops.zeros(0, "int64"), ops.zeros(0, "int32")
    rows, cols, dist = (ops.concat([part[i] for part in parts]) for i in range(3))
    if len(database_blocks) > 1:  # blocks arrive database-block first: restore (query, index) order
        order = ops.argsort(rows * n_db + cols)
        cols, dist = cols[order], dist[order]
    return offsets, ops.int64(cols), ops.int32(dist)
