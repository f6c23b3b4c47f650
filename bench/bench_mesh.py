"""Neural Mesh on loopback: offload round-trip latency (p50, p99) against a raw gloo send/recv
ping-pong of the same bytes, in alternating blocks of the same run, and map throughput over 1, 2
and 4 workers against one local call, with the requests each worker answered."""

from __future__ import annotations

import datetime
import os
import tempfile
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
ROUND_TRIPS = 20 if TINY else 1000


_PAIR_REPLY_S = 300  # seconds a block of the raw pair may take before the benchmark gives up


def _pair_reply(conn, pair) -> list[float]:
    """The raw pair's round-trip times for a block, or RuntimeError once either process is gone or
    the block takes over ``_PAIR_REPLY_S``: a benchmark never waits on a pair that died."""
    deadline = time.monotonic() + _PAIR_REPLY_S
    while not conn.poll(1.0):
        codes = [p.exitcode for p in pair.processes]
        if any(code is not None for code in codes) or time.monotonic() > deadline:
            raise RuntimeError(f"the raw gloo ping-pong pair stopped answering (exit codes {codes})")
    return conn.recv()


def _stop(pair) -> None:
    """Wait for the raw pair to end (an exit with an error raises), at most a minute, then end it."""
    deadline = time.monotonic() + 60
    while not pair.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in pair.processes:
                process.terminate()
            raise RuntimeError("the raw gloo ping-pong pair did not stop")


def _ping_pong_pair(rank: int, store_path: str, conn) -> None:
    """A raw gloo ping-pong pair that stays up between blocks: rank 0 takes (nbytes, trips) from
    ``conn`` and answers with the round-trip times; (0, 0) ends both."""
    # a file store: no port to pick ahead of time, which another process could take meanwhile
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    store = dist.FileStore(store_path, 2)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2, timeout=datetime.timedelta(seconds=120))
    command = torch.zeros(2, dtype=torch.int64)
    while True:
        if rank == 0:
            command[:] = torch.tensor(conn.recv())
            dist.send(command, 1)
        else:
            dist.recv(command, 0)
        nbytes, trips = command.tolist()
        if trips == 0:
            break
        buf = torch.ones(nbytes, dtype=torch.uint8)
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
            conn.send(times[5:])
    dist.destroy_process_group()


def bench_mesh_round_trip():
    """Blocks of mesh round trips alternate with blocks of raw ping-pong, both kept running, so
    both sides see the same machine conditions."""
    sizes = SIZES[:1] if TINY else SIZES
    blocks = 2 if TINY else 20
    ctx = mp.get_context("spawn")
    ours_end, raw_end = ctx.Pipe()
    ours: dict[int, list[float]] = {n: [] for n in sizes}
    raw: dict[int, list[float]] = {n: [] for n in sizes}
    with tempfile.TemporaryDirectory() as tmp:
        pair = mp.start_processes(_ping_pong_pair, args=(os.path.join(tmp, "store"), raw_end), nprocs=2, start_method="spawn", join=False)
        try:
            with mesh.connect(workers=1, timeout=60) as m:
                for nbytes in sizes:
                    x = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)
                    assert torch.equal(m.offload("identity", x), x)
                    trips = max(ROUND_TRIPS // blocks, 5)
                    for _ in range(blocks):
                        for _ in range(trips):
                            start = time.perf_counter()
                            m.offload("identity", x)
                            ours[nbytes].append(time.perf_counter() - start)
                        ours_end.send((nbytes, trips))
                        raw[nbytes] += _pair_reply(ours_end, pair)
        finally:
            ours_end.send((0, 0))
            _stop(pair)
    for nbytes in sizes:
        label = f"{nbytes >> 10} KiB" if nbytes < 1 << 20 else f"{nbytes >> 20} MiB"
        for q in (50, 99):
            case = f"mesh offload round trip {label} p{q} (loopback gloo)"
            record(Result(case, "clisonix", "cpu", float(np.percentile(ours[nbytes], q)), 0.0, bytes=2.0 * nbytes))
            record(Result(case, "raw gloo send/recv ping-pong", "cpu", float(np.percentile(raw[nbytes], q)), 0.0, bytes=2.0 * nbytes))


@pytest.mark.parametrize("workers", [1] if TINY else [1, 2, 4])
def bench_mesh_map_throughput(workers):
    rng = np.random.default_rng(0)
    m_rows, k, n = (64, 16, 8) if TINY else (4096, 256, 256)
    x = torch.from_numpy(rng.standard_normal((m_rows, k), dtype=np.float32))
    w = torch.from_numpy(rng.standard_normal((n, k), dtype=np.float32))
    local = cg.transform_matrix(x, w)
    with mesh.connect(workers=workers, timeout=60) as m:
        same = torch.equal(m.map("transform_matrix", x, w), local)
        before = [s["answered"] for s in m.status()]
        times_mesh, times_local = [], []
        for _ in range(3 if TINY else 5):
            start = time.perf_counter()
            m.map("transform_matrix", x, w)
            times_mesh.append(time.perf_counter() - start)
            start = time.perf_counter()
            cg.transform_matrix(x, w)
            times_local.append(time.perf_counter() - start)
        per_worker = [s["answered"] - b for s, b in zip(m.status(), before)]  # the last entry: run locally
    spread = "/".join(map(str, per_worker[:-1])) + (f" +{per_worker[-1]} local" if per_worker[-1] else "")
    case = f"mesh map(transform_matrix) {m_rows}x{k}x{n} over {workers} worker(s), requests per worker {spread} (loopback)"
    record(Result(case, "clisonix", "cpu", float(np.median(times_mesh)), 0.0 if same else 1.0, flops=2.0 * m_rows * n * k))
    record(Result(case, "one local call", "cpu", float(np.median(times_local)), 0.0, flops=2.0 * m_rows * n * k))
