"""Neural Mesh on loopback: offload round-trip latency (p50, p99) against a raw gloo send/recv
ping-pong of the same bytes measured in the same run, and map throughput over 1-3 workers
against one local call."""

from __future__ import annotations

import datetime
import os
import socket
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from timing import TINY, Result, record

import clisonix_gpu as cg
from clisonix_gpu import mesh

SIZES = [4 << 10, 256 << 10, 4 << 20]  # bytes per tensor
ROUND_TRIPS = 20 if TINY else 200


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ping_pong(rank: int, port: int, nbytes: int, trips: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    buf = torch.zeros(nbytes, dtype=torch.uint8)
    times = []
    for _ in range(trips + 5):
        start = time.perf_counter()
        if rank == 0:
            dist.send(buf, 1)
            dist.recv(buf, 1)
        else:
            dist.recv(buf, 0)
            dist.send(buf, 0)
        times.append(time.perf_counter() - start)
    if rank == 0:
        np.save(out, np.array(times[5:]))
    dist.destroy_process_group()


def _raw_latencies(nbytes: int, tmp_path) -> np.ndarray:
    out = str(tmp_path / f"pingpong-{nbytes}.npy")
    mp.start_processes(_ping_pong, args=(_free_port(), nbytes, ROUND_TRIPS, out), nprocs=2, start_method="spawn")
    return np.load(out)


def bench_mesh_round_trip(tmp_path):
    sizes = SIZES[:1] if TINY else SIZES
    with mesh.connect(workers=1, timeout=60) as m:
        ours = {}
        for nbytes in sizes:
            x = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)
            assert torch.equal(m.offload("identity", x), x)
            times = []
            for _ in range(ROUND_TRIPS):
                start = time.perf_counter()
                m.offload("identity", x)
                times.append(time.perf_counter() - start)
            ours[nbytes] = times
    for nbytes in sizes:  # the raw ping-pong runs once the mesh is closed, in the same session
        raw = _raw_latencies(nbytes, tmp_path)
        label = f"{nbytes >> 10} KiB" if nbytes < 1 << 20 else f"{nbytes >> 20} MiB"
        for q in (50, 99):
            case = f"mesh offload round trip {label} p{q} (loopback gloo)"
            record(Result(case, "clisonix", "cpu", float(np.percentile(ours[nbytes], q)), 0.0, bytes=2.0 * nbytes))
            record(Result(case, "raw gloo send/recv ping-pong", "cpu", float(np.percentile(raw, q)), 0.0, bytes=2.0 * nbytes))


@pytest.mark.parametrize("workers", [1] if TINY else [1, 2, 3])
def bench_mesh_map_throughput(workers):
    rng = np.random.default_rng(0)
    m_rows, k, n = (64, 16, 8) if TINY else (4096, 256, 256)
    x = torch.from_numpy(rng.standard_normal((m_rows, k), dtype=np.float32))
    w = torch.from_numpy(rng.standard_normal((n, k), dtype=np.float32))
    local = cg.transform_matrix(x, w)
    with mesh.connect(workers=workers, timeout=60) as m:
        same = torch.equal(m.map("transform_matrix", x, w), local)
        times_mesh, times_local = [], []
        for _ in range(3 if TINY else 5):
            start = time.perf_counter()
            m.map("transform_matrix", x, w)
            times_mesh.append(time.perf_counter() - start)
            start = time.perf_counter()
            cg.transform_matrix(x, w)
            times_local.append(time.perf_counter() - start)
    case = f"mesh map(transform_matrix) {m_rows}x{k}x{n} over {workers} worker(s) (loopback)"
    record(Result(case, "clisonix", "cpu", float(np.median(times_mesh)), 0.0 if same else 1.0, flops=2.0 * m_rows * n * k))
    record(Result(case, "one local call", "cpu", float(np.median(times_local)), 0.0, flops=2.0 * m_rows * n * k))
