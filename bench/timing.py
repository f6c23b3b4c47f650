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

    start = time.perf_counter()
    fn()  # warm-up, and a first look at how long one call takes
    if time.perf_counter() - start > 2.0:
        rounds = min(rounds, 2)  # slow peers (exact SVD, brute force) get fewer rounds
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=0)
    return float(benchmark.stats.stats.median)


def record(result: Result) -> None:
    RESULTS.append(result)
