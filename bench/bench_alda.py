"""ALDA: scaling of DeviceManager.map(transform_matrix) over 1..n devices, and planning overhead.

Peers: the same op called once on the whole batch (scaling), ``np.array_split`` (an unweighted
equal split, what DataParallel's ``chunk`` does) for ``plan``, and a heap-based LPT for ``plan_tasks``.
"""

from __future__ import annotations

import heapq

import numpy as np
import pytest
import torch
from timing import DEVICE, TINY, Result, measure, record

import clisonix_gpu as cg
from clisonix_gpu import alda


def _devices(n):
    if DEVICE == "cuda":
        return tuple(alda.Device("cuda", i) for i in range(min(n, torch.cuda.device_count())))
    return tuple(alda.Device("cpu", i) for i in range(n))


def _host(a):
    return a.cpu().numpy() if isinstance(a, torch.Tensor) else a


def _heap_lpt(costs, m):
    heap = [(0.0, d) for d in range(m)]
    out = [0] * len(costs)
    for t in sorted(range(len(costs)), key=lambda t: -costs[t]):
        load, d = heapq.heappop(heap)
        out[t] = d
        heapq.heappush(heap, (load + costs[t], d))
    return out


def map_case(m, k, n, devices, device):
    return f"alda map(transform_matrix) {m}x{k}x{n} over {devices} {device} device(s)"


def map_work(m, k, n):
    """(ceiling, flops, bytes): float32 operands read and the output written once."""
    return "fp32_matmul_TFLOPs", 2.0 * m * n * k, 4.0 * (m * k + n * k + m * n)


def gpu_targets():
    """(case, ceiling, ops, bytes) of the full-size CUDA case on one GPU."""
    m, k, n = 4096, 1024, 1024
    yield (map_case(m, k, n, 1, "cuda"), *map_work(m, k, n))


@pytest.mark.parametrize("slots", [1, 2, 4])
@pytest.mark.parametrize("impl", ["clisonix", "single call"])
def bench_alda_map_scaling(benchmark, quick, slots, impl):
    m, k, n = (37, 16, 8) if TINY else (1024, 512, 512) if quick else (4096, 1024, 1024)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((m, k), dtype=np.float32)
    w = rng.standard_normal((n, k), dtype=np.float32)
    if DEVICE == "cuda":
        x, w = torch.from_numpy(x).cuda(), torch.from_numpy(w).cuda()
    manager = alda.DeviceManager(_devices(slots))
    fn = (lambda: manager.map(cg.transform_matrix, x, w)) if impl == "clisonix" else (lambda: cg.transform_matrix(x, w))
    same = np.array_equal(_host(manager.map(cg.transform_matrix, x, w)), _host(cg.transform_matrix(x, w)))
    case = map_case(m, k, n, len(manager.devices), DEVICE)
    benchmark.group = case
    seconds = measure(benchmark, fn, DEVICE, rounds=3)
    ceiling, ops, nbytes = map_work(m, k, n)
    record(Result(case, impl, DEVICE, seconds, 0.0 if same else 1.0, flops=ops, bytes=nbytes, ceiling=ceiling, ops=ops))


@pytest.mark.parametrize("impl", ["clisonix", "np.array_split (equal, unweighted)"])
def bench_alda_plan(benchmark, impl):
    devices = alda.parse_devices("cpu:0=1.5,cpu:1=1,cpu:2=0.5,cpu:3=2")
    n = 1000 if TINY else 1_000_000
    fn = (lambda: alda.plan(n, devices, align=8)) if impl == "clisonix" else (lambda: np.array_split(np.arange(n), 4))
    case = f"alda.plan {n} items over 4 weighted devices"
    benchmark.group = case
    record(Result(case, impl, "cpu", measure(benchmark, fn, "cpu", rounds=20), 0.0))


@pytest.mark.parametrize("impl", ["clisonix", "heapq LPT"])
def bench_alda_plan_tasks(benchmark, impl):
    costs = list(np.random.default_rng(0).random(100 if TINY else 10_000))
    devices = tuple(alda.Device("cpu", i) for i in range(8))
    fn = (lambda: alda.plan_tasks(costs, devices)) if impl == "clisonix" else (lambda: _heap_lpt(costs, 8))
    case = f"alda.plan_tasks {len(costs)} tasks on 8 devices"
    benchmark.group = case
    record(Result(case, impl, "cpu", measure(benchmark, fn, "cpu", rounds=3), 0.0))
