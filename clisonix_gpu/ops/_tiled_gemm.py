"""Batch-invariant ``activation(x @ w.T + bias)`` at BLAS speed on CPU: torch's BLAS on fixed row tiles.

The rows of ``x`` go to ``torch.mm`` in tiles of a fixed number of rows: ``big`` rows while at
least that many are left, then ``small`` rows, the last tile zero-padded. Each tile starts
64-byte aligned (a fresh buffer, or ``x`` itself when it is contiguous and aligned). So every GEMM
this module issues for a case has one of two shapes, and a row's result depends only on that row
and ``w`` if BLAS (MKL in torch's wheels) rounds a row the same at every position of a tile,
whatever its neighbours, and the same in both tile sizes. Nothing promises that: it is *measured*
for each case -- (K, N, dtype, torch's thread count, fp32 matmul precision) -- by :func:`plan_for`
the first time the case is met (a few GEMMs of the case's shape on random rows, moved to other
positions, other neighbours, the other tile size, a misaligned ``w``), then cached. Cases whose
check fails return ``None`` and keep the exact path (``_exact_gemm``).

Measured with torch 2.13's MKL (2 cores, AVX-512): within one tile size every position gives the
same bits; tile sizes fall into classes (float32 at K = N = 4096: 2-14 rows and 16-256 rows give
two different roundings); the class boundary moves with the thread count, hence the thread count
in the key. One row alone (GEMV) rounds differently again, so a single row is padded to ``small``.

The epilogue (bias, activation) is ``_cpu_epilogue``'s, shared with the packed-weight path.
"""

from __future__ import annotations

import functools
import threading
from typing import Any, NamedTuple

from .._environ import Setting
from ._cpu_epilogue import apply_epilogue_

__all__ = [
    "TilePlan",
    "call_settings",
    "case_key",
    "compute_dtype",
    "cpu_gemm_mode",
    "plan_for",
    "rows_independent",
    "small_batches_match",
    "tiled_transform_matrix",
]

_ALIGN = 64  # bytes


class TilePlan(NamedTuple):
    """Row-tile sizes for one case, ascending powers of two: whole tiles of the largest while that
    many rows are left, then at most one tile of each smaller size, the rest zero-padded to the
    smallest. A batch of M rows takes about log2(M / smallest) GEMM calls."""

    sizes: tuple[int, ...]
    call_rows: int = 0  # what one more GEMM call costs, in rows of this case

    def tiles(self, m: int) -> list[int]:
        """The tile sizes, in order, that cover ``m`` rows at the least padded rows plus calls."""
        largest = self.sizes[-1]
        return [largest] * (m // largest) + list(_cover(self.sizes, self.call_rows, m % largest)[1])


@functools.lru_cache(maxsize=4096)
def _cover(sizes: tuple[int, ...], call_rows: int, left: int) -> tuple[int, tuple[int, ...]]:
    """(cost, tiles) covering ``left`` rows: each tile costs its rows plus ``call_rows``."""
    if left <= 0:
        return 0, ()
    options = []
    for size in sizes:
        rest_cost, rest = _cover(sizes, call_rows, left - size)
        options.append((size + call_rows + rest_cost, (size,) + rest))
        if size >= left:
            break
    return min(options)


# Tried in order; the first plan whose check passes serves the case. 64-row tiles cost 0.86-0.94x
# of one GEMM over thousands of rows; 16 rows pad a single row to 16 (a few rows are GEMV-bound).
_SMALLEST = 16  # one row alone is GEMV to MKL and rounds differently; 4-15 rows take a slow path
# The largest tile: bounded so that a tile of the case costs at most this many multiply-adds
# (the first-use check runs a few), and never below 64 rows (0.86-0.94x of one GEMM at scale).
_LARGEST_ROWS, _TILE_MACS = 2048, 1 << 27
_CALL_MACS = 1 << 19  # about what a GEMM call's fixed overhead (~10 us) buys in multiply-adds
_plans: dict[tuple[Any, ...], TilePlan | None] = {}
_lock = threading.Lock()


def _candidates(k: int, n: int) -> list[TilePlan]:
    """Ladders 16, 32, ... up to the bound for this shape, then shorter ones, then single sizes."""
    top = _SMALLEST
    while top < _LARGEST_ROWS and (2 * top * max(k, 1) * max(n, 1) <= _TILE_MACS or 2 * top <= 64):
        top *= 2
    call_rows = _CALL_MACS // max(k * n, 1)
    ladders = []
    while top >= _SMALLEST:
        ladders.append(TilePlan(tuple(_SMALLEST << i for i in range((top // _SMALLEST).bit_length())), call_rows))
        top //= 2
    return ladders + [TilePlan((size,), call_rows) for size in (64, 8, 4)]


def compute_dtype(dtype: Any) -> Any:
    import torch

    return torch.float64 if dtype == torch.float64 else torch.float32


_MODES = ("auto", "tiles", "exact")


_CPU_GEMM = Setting("CLISONIX_CPU_GEMM", "auto")


def cpu_gemm_mode() -> str:
    """``CLISONIX_CPU_GEMM``: ``auto`` (default: dot products for narrow weights, else packed
    weights, else row tiles, else exact), ``tiles`` (row tiles, else exact) or ``exact`` (the exact
    path for every case)."""
    mode = _CPU_GEMM.get()
    if mode not in _MODES:
        raise ValueError(f"CLISONIX_CPU_GEMM must be one of {', '.join(_MODES)}; got {mode!r}")
    return mode


def call_settings() -> tuple[int, str]:
    """What a case's verdict depends on besides its shape and dtype: torch's thread count and fp32
    matmul precision."""
    import torch

    return torch.get_num_threads(), torch.get_float32_matmul_precision()


def case_key(k: int, n: int, dtype: Any) -> tuple[Any, ...]:
    """What a plan depends on: shape class, compute dtype, and :func:`call_settings`."""
    return (k, n, compute_dtype(dtype), *call_settings())


def _gemm_tiles(x: Any, w: Any, plan: TilePlan) -> Any:
    """``x`` (M, K) @ ``w.T`` in the plan's tiles: a contiguous (rows, N) tensor, whole tiles (rows >= M).
    Whole tiles read ``x`` in place when it is contiguous and aligned; the rest go through a fresh
    aligned buffer, zero-padded."""
    import torch

    m, k = x.shape
    n = w.shape[0]
    tiles = plan.tiles(m)
    rows = sum(tiles)
    out = torch.empty((rows, n), dtype=x.dtype, device="cpu")
    if k == 0 or rows == 0:
        return out.zero_()
    # rows read in place: the whole tiles that lie inside x, if it is contiguous and aligned (tile
    # starts stay aligned: tile sizes are multiples of 16 rows); the rest are copied
    split = 0
    if x.is_contiguous() and x.data_ptr() % _ALIGN == 0:
        for size in tiles:
            if split + size > m:
                break
            split += size
    tail = x
    if split < rows:
        tail = torch.empty((rows - split, k), dtype=x.dtype, device="cpu")
        tail[: m - split].copy_(x[split:] if split else x)
        tail[m - split :].zero_()
    wt = w.t()
    if len(tiles) == 1:  # the common small batch: no views to make
        torch.mm(tail, wt, out=out)
        return out
    start = 0
    for size in tiles:
        source = x[start : start + size] if start + size <= split else tail[start - split : start - split + size]
        torch.mm(source, wt, out=out[start : start + size])
        start += size
    return out


def rows_independent(gemm: Any, x: Any, reference: Any, shift: int, gen: Any) -> bool:
    """Whether ``gemm`` (rows -> their products with a fixed ``w``, at least as many rows back)
    gives ``reference`` (its result on ``x``) for every row moved down by ``shift`` places, and
    for every even row when the odd rows are new random ones: a row's bits depend on that row
    alone. The common part of both BLAS methods' first-use checks."""
    import torch

    count = x.shape[0]
    if not torch.equal(gemm(torch.roll(x, shift, 0))[:count], torch.roll(reference, shift, 0)):
        return False
    neighbours = x.clone()
    neighbours[1::2] = torch.randn(neighbours[1::2].shape, generator=gen, dtype=x.dtype, device="cpu")
    return torch.equal(gemm(neighbours)[0:count:2], reference[0::2])


def small_batches_match(gemm: Any, x: Any, reference: Any, smallest: int) -> bool:
    """Whether batches of ``smallest`` to 33 rows of ``x`` at odd offsets (unaligned row starts
    whenever K is odd) give the rows of ``reference`` through ``gemm`` (rows -> their products)."""
    import torch

    count = reference.shape[0]
    batches = ((1, 0), (1, count - 1), (2, 3), (3, 7), (5, 11), (15, 13), (17, 29), (33, 14))
    return all(torch.equal(gemm(x[start : start + rows]), reference[start : start + rows]) for rows, start in batches if rows >= smallest)


def _check(plan: TilePlan, k: int, n: int, dtype: Any) -> bool:
    """Does BLAS round every row the same at other positions, beside other rows, in every tile
    size of the plan and with a misaligned ``w``? Random rows of this case's shape."""
    import torch

    gen = torch.Generator().manual_seed(1234)
    spare = torch.randn(n * k + 1, generator=gen, dtype=dtype, device="cpu")
    w_misaligned = spare[1:].view(n, k)
    w = w_misaligned.clone()
    count = 2 * plan.sizes[-1]
    x = torch.randn(count, k, generator=gen, dtype=dtype, device="cpu")
    reference = _gemm_tiles(x, w, plan)[:count]
    shift = plan.sizes[0] // 2 + 1
    if not rows_independent(lambda rows: _gemm_tiles(rows, w, plan), x, reference, shift, gen):
        return False
    for size in plan.sizes:  # each size alone, over two tiles
        if not torch.equal(_gemm_tiles(x[: 2 * size], w, TilePlan((size,), plan.call_rows))[: 2 * size], reference[: 2 * size]):
            return False
        # the last row alone, zero-padded
        if not torch.equal(_gemm_tiles(x[count - 1 :], w, TilePlan((size,), plan.call_rows))[0], reference[count - 1]):
            return False
    return torch.equal(_gemm_tiles(x[:shift], w_misaligned, plan)[:shift], reference[:shift])


def plan_for(k: int, n: int, dtype: Any) -> TilePlan | None:
    """The tile plan for this case under torch's current thread count, checked on first use and
    cached; ``None`` where no candidate passes or ``CLISONIX_CPU_GEMM=exact`` (the exact path
    serves the case)."""
    if cpu_gemm_mode() == "exact":
        return None
    key = case_key(k, n, dtype)
    if key in _plans:
        return _plans[key]
    with _lock:
        if key not in _plans:
            compute = compute_dtype(dtype)
            _plans[key] = next((p for p in _candidates(k, n) if _check(p, k, n, compute)), None)
        return _plans[key]


def tiled_transform_matrix(x: Any, w: Any, bias: Any, activation: str | None, plan: TilePlan, keep_preactivation: bool = False) -> tuple[Any, Any]:
    """``(activation(x @ w.T + bias), preactivation)`` for torch CPU tensors ``x`` (M, K), ``w``
    (N, K), ``bias`` (N,) or None, all float32 or float64 (the caller widens float16/bfloat16 to
    float32): (M, N) in that dtype, and ``x @ w.T + bias`` with ``keep_preactivation`` (else None)."""
    w = w if w.is_contiguous() else w.contiguous()
    out = _gemm_tiles(x, w, plan)
    preactivation = apply_epilogue_(out, bias, activation, keep_preactivation)
    m = x.shape[0]
    return out[:m], None if preactivation is None else preactivation[:m]
