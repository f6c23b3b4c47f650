"""Compiled CPU kernels of the binary algebra (numba; imported only when numba is installed).

Every kernel works on packed rows viewed as uint64 words (``_numba.words``). Database codes are
read in tiles of :data:`TILE_WORDS` words, transposed word-major so that the innermost loop runs
over codes: XOR, ``llvm.ctpop`` and an add per code, which LLVM vectorizes (``vpopcntq`` where
the CPU has AVX-512 VPOPCNTDQ). Work items are (query block, database segment) pairs under one
``prange``; each item streams its segment tile by tile, so memory stays bounded whatever the
database size.

Top-k keeps, per query, a buffer of int64 keys ``distance * n_db + index`` in arrival (= index)
order: a code enters when its distance is below the k-th best distance so far, and a full buffer
is cut back to its k smallest keys. Keys are unique, so ties go to the lower index.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.extending import intrinsic

TILE_WORDS = 8192  # words of one transposed database tile (64 KiB: stays in the L2 cache)
MAX_TILE_CODES = 1024
SCAN_CHUNK = 64  # codes whose distances top-k checks against its bound with one vector min
NO_KEY = np.iinfo(np.int64).max  # fills the slots of a segment that holds fewer than k codes


@intrinsic
def popcount(typingctx, x):
    """``llvm.ctpop`` of a uint64 word, as int64."""

    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])

    return types.int64(types.uint64), codegen


@njit(cache=True)
def new_tile(words):
    """A zeroed tile for codes of ``words`` words: rows rounded up to a multiple of 4 (the rows past
    ``words`` stay zero), a multiple of 8 codes (one AVX-512 vector of words)."""
    codes = max(8, min(MAX_TILE_CODES, TILE_WORDS // max(words, 1) // 8 * 8))
    return np.zeros(((words + 3) // 4 * 4 if words else 4, codes), np.uint64)


@njit(cache=True)
def load_tile(db, start, count, last_mask, tile):
    """``tile[w, j] = db[start + j, w]`` for j < count, the last word masked by ``last_mask``."""
    words = db.shape[1]
    for j in range(count):
        row = db[start + j]
        for w in range(words):
            tile[w, j] = row[w]
    if words:
        for j in range(count):
            tile[words - 1, j] &= last_mask


@njit(cache=True)
def _word(query, w, last_mask):
    words = query.shape[0]
    if w >= words:
        return np.uint64(0)
    return query[w] & last_mask if w == words - 1 else query[w]


@njit(cache=True)
def row_distances(query, tile, count, last_mask, bound, out):
    """``out[j] = popcount(query ^ code j)`` for the ``count`` codes of a tile; returns whether any
    is below ``bound``. Words go four at a time, so a code's count stays in a register across them,
    and the last pass compares as it stores."""
    below = False
    rows = tile.shape[0]
    for w in range(0, rows, 4):
        x0, x1, x2, x3 = _word(query, w, last_mask), _word(query, w + 1, last_mask), _word(query, w + 2, last_mask), _word(query, w + 3, last_mask)
        c0, c1, c2, c3 = tile[w], tile[w + 1], tile[w + 2], tile[w + 3]
        if w == 0 and w + 4 == rows:
            for j in range(count):
                d = popcount(x0 ^ c0[j]) + popcount(x1 ^ c1[j]) + popcount(x2 ^ c2[j]) + popcount(x3 ^ c3[j])
                out[j] = d
                below |= d < bound
        elif w == 0:
            for j in range(count):
                out[j] = popcount(x0 ^ c0[j]) + popcount(x1 ^ c1[j]) + popcount(x2 ^ c2[j]) + popcount(x3 ^ c3[j])
        elif w + 4 == rows:
            for j in range(count):
                d = out[j] + popcount(x0 ^ c0[j]) + popcount(x1 ^ c1[j]) + popcount(x2 ^ c2[j]) + popcount(x3 ^ c3[j])
                out[j] = d
                below |= d < bound
        else:
            for j in range(count):
                out[j] += popcount(x0 ^ c0[j]) + popcount(x1 ^ c1[j]) + popcount(x2 ^ c2[j]) + popcount(x3 ^ c3[j])
    return below


@njit(parallel=True, cache=True)
def popcount_gemm(a, b, signed_bits, last_mask, rows_per_item, out):
    """``out[i, j] = popcount(a_i ^ b_j)``, or ``signed_bits - 2 * popcount`` when signed_bits >= 0."""
    m, n, words = a.shape[0], b.shape[0], a.shape[1]
    codes = new_tile(words).shape[1]
    row_blocks = (m + rows_per_item - 1) // rows_per_item
    tiles = (n + codes - 1) // codes
    for item in prange(row_blocks * tiles):
        r0 = (item // tiles) * rows_per_item
        c0 = (item % tiles) * codes
        count = min(codes, n - c0)
        tile = new_tile(words)
        dist = np.empty(codes, np.int64)
        load_tile(b, c0, count, last_mask, tile)
        for i in range(r0, min(r0 + rows_per_item, m)):
            row_distances(a[i], tile, count, last_mask, 0, dist)
            dest = out[i, c0 : c0 + count]
            if signed_bits >= 0:
                for j in range(count):
                    dest[j] = signed_bits - 2 * dist[j]
            else:
                for j in range(count):
                    dest[j] = dist[j]


@njit(cache=True)
def _topk_segment(q, db, d0, d1, k, out):
    """``out[i]``: the k smallest keys of query ``q[i]`` over codes [d0, d1), ascending."""
    n_db, words = db.shape[0], db.shape[1]
    tile = new_tile(words)
    codes = tile.shape[1]
    dist = np.empty(codes, np.int64)
    cap = 2 * k + 64
    n_q = q.shape[0]
    keys = np.empty((n_q, cap), np.int64)
    filled = np.zeros(n_q, np.int64)
    limit = np.full(n_q, 64 * words + 1, np.int64)  # a code enters when its distance is below
    all_bits = ~np.uint64(0)
    for c0 in range(d0, d1, codes):
        count = min(codes, d1 - c0)
        load_tile(db, c0, count, all_bits, tile)
        for i in range(n_q):
            bound = limit[i]
            if not row_distances(q[i], tile, count, all_bits, bound, dist):
                continue
            kept = keys[i]
            used = filled[i]
            for j in range(count):
                if dist[j] < bound:
                    kept[used] = dist[j] * n_db + c0 + j
                    used += 1
                    if used == cap:
                        kept[:] = np.partition(kept, k - 1)  # the k smallest first, the k-th at k - 1
                        used = k
                        bound = kept[k - 1] // n_db
            filled[i] = used
            limit[i] = bound
    for i in range(n_q):
        best = np.sort(keys[i, : filled[i]])
        got = min(k, best.shape[0])
        out[i, :got] = best[:got]
        out[i, got:] = NO_KEY


@njit(cache=True)
def work_items(n_q, rows_per_item, segments):
    """Work items of a parallel search: (query block, database segment) pairs."""
    return ((n_q + rows_per_item - 1) // rows_per_item) * segments


@njit(cache=True)
def work_item(item, n_q, n_db, rows_per_item, segments):
    """Queries [q0, q1) and database codes [d0, d1) of work item ``item``, and its segment s."""
    q0 = (item // segments) * rows_per_item
    s = item % segments
    seg_len = (n_db + segments - 1) // segments
    d0 = min(s * seg_len, n_db)
    return q0, min(q0 + rows_per_item, n_q), s, d0, min(d0 + seg_len, n_db)


@njit(parallel=True, cache=True)
def hamming_topk(q, db, k, rows_per_item, segments, out):
    """``out[s, i, :]``: the k smallest keys ``distance * len(db) + index`` of query i within
    database segment s, ascending (:data:`NO_KEY` past a segment's end)."""
    for item in prange(work_items(q.shape[0], rows_per_item, segments)):
        q0, q1, s, d0, d1 = work_item(item, q.shape[0], db.shape[0], rows_per_item, segments)
        _topk_segment(q[q0:q1], db, d0, d1, k, out[s, q0:q1])


@njit(cache=True)
def _radius_segment(q, db, d0, d1, r, write, at, indices, distances):
    """The codes of [d0, d1) within distance ``r`` of each query ``q[i]``, in index order: counted
    into ``at[i]``, or (``write``) stored at ``indices[at[i]:]``/``distances[at[i]:]``, advancing ``at[i]``."""
    tile = new_tile(db.shape[1])
    codes = tile.shape[1]
    dist = np.empty(codes, np.int64)
    all_bits = ~np.uint64(0)
    for c0 in range(d0, d1, codes):
        count = min(codes, d1 - c0)
        load_tile(db, c0, count, all_bits, tile)
        for i in range(q.shape[0]):
            if not row_distances(q[i], tile, count, all_bits, r + 1, dist):
                continue
            pos = at[i]
            for j in range(count):
                if dist[j] <= r:
                    if write:
                        indices[pos] = c0 + j
                        distances[pos] = dist[j]
                    pos += 1
            at[i] = pos


@njit(parallel=True, cache=True)
def hamming_radius(q, db, r, rows_per_item, segments, write, at, indices, distances):
    """Counting call: ``at[s, i]`` += codes of database segment s within ``r`` of query i. Writing
    call (``at`` = where each (segment, query) starts in the CSR arrays): store them there."""
    for item in prange(work_items(q.shape[0], rows_per_item, segments)):
        q0, q1, s, d0, d1 = work_item(item, q.shape[0], db.shape[0], rows_per_item, segments)
        _radius_segment(q[q0:q1], db, d0, d1, r, write, at[s, q0:q1], indices, distances)
