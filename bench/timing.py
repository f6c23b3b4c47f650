"""Timing and result bookkeeping shared by every benchmark file.

CPU: pytest-benchmark medians (warm-up round, several rounds). CUDA: ``triton.testing.do_bench``
medians. Every timed call is paired with its accuracy against a float64 reference, so a speed
ratio never hides a wrong answer.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import torch

RESULTS: list[Result] = []
# `clisonix-gpu bench --device/--tiny` set these; by default the GPU when there is one.
DEVICE = os.environ.get("CLISONIX_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
TINY = os.environ.get("CLISONIX_BENCH_TINY", "0") == "1"
SIZES = "tiny" if TINY else DEVICE  # which case list each benchmark file runs


@dataclasses.dataclass
class Result:
    case: str  # op and shape, e.g. "transform_matrix 4096x1024x1024 float32 relu"
    impl: str  # "clisonix" or the peer's name
    device: str
    seconds: float
    rel_error: float  # max |y - ref| / max |ref| against the float64 reference
    flops: float = 0.0
    bytes: float = 0.0
    ceiling: str = ""  # compute ceiling of the roofline price (clisonix_gpu._roofline); "" for none
    ops: float = 0.0  # operations at that ceiling (flops, or popcounts)


def measure(benchmark: Any, fn: Callable[[], Any], device: str, rounds: int) -> float:
    """Median seconds of ``fn()``; ``benchmark`` is pytest-benchmark's fixture."""
    if device == "cuda":
        import triton.testing

        # do_bench zeroes a 256 MB buffer before every call, so the L2 cache never holds the inputs
        ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
        benchmark.extra_info["do_bench_median_ms"] = ms
        benchmark.pedantic(lambda: (fn(), torch.cuda.synchronize()), rounds=1, iterations=1)
        return ms / 1e3
    import time

    time.sleep(_POOL_QUIET_S)  # the previous block's pools (ours or a peer's) have gone quiet
    rounds = _warm_up([fn], rounds)
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=0)
    return float(benchmark.stats.stats.median)


def _warm_up(fns: list[Callable[[], Any]], rounds: int) -> int:
    """Call each of ``fns`` once (warm-up, and a first look at how long a call takes); the rounds
    to time: at most 2 when any call took over 2 s (exact SVD, brute force)."""
    import time

    for fn in fns:
        start = time.perf_counter()
        fn()
        if time.perf_counter() - start > 2.0:
            rounds = min(rounds, 2)
    return rounds


# Before every timed block: longer than a BLAS or OpenMP pool spins before it sleeps (OpenBLAS,
# NumPy's, spins about 2**28 cycles), so one side's idle threads never compete with the other's.
_POOL_QUIET_S = 0.15


def measure_alternating(fns: dict[str, Callable[[], Any]], device: str, rounds: int) -> dict[str, float]:
    """Median seconds of each of ``fns``, keyed like it.

    CPU: the implementations take turns, one block per round each (a pause, an untimed call, a
    timed call), the order rotating every round, so a slow spell of the machine falls on all of
    them alike. CUDA: ``triton.testing.do_bench`` for each in turn (the GPU does not drift so)."""
    if device == "cuda":
        import triton.testing

        return {name: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3 for name, fn in fns.items()}
    import statistics
    import time

    names = list(fns)
    rounds = _warm_up(list(fns.values()), rounds)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for turn in range(rounds):
        for name in names[turn % len(names) :] + names[: turn % len(names)]:
            time.sleep(_POOL_QUIET_S)
            fns[name]()
            start = time.perf_counter()
            fns[name]()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def record(result: Result) -> None:
    RESULTS.append(result)
