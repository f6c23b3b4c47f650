"""Neural Mesh faults with meshes of their own (one per test): bursts, stops, kills, the local
fallback's deadline, a closed mesh. Every wait here is bounded."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch
import torch.distributed as dist
from mesh_helpers import answered, random_tensor, resume_workers, wait_until

import clisonix_gpu as cg
from clisonix_gpu import mesh as mesh_module


def test_requests_pipeline_with_a_bounded_queue_per_worker():
    with mesh_module.connect(workers=1, timeout=20, max_in_flight=2) as m:
        futures = [m.submit("identity", torch.full((100,), float(i))) for i in range(40)]
        assert [int(f.result(timeout=30)[0]) for f in futures] == list(range(40))
        (worker,) = [s for s in m.status() if s["rank"] == 1]
        assert worker["answered"] == 40 and 1 <= worker["peak_in_flight"] <= 2 and worker["in_flight"] == 0
        with pytest.raises(ValueError, match="unknown op"):
            m.submit("nope", torch.ones(1))  # checked before anything is queued
    for call in (lambda: m.offload("identity", torch.ones(1)), lambda: m.submit("identity", torch.ones(1)), lambda: m.map("identity", torch.ones(1))):
        with pytest.raises(mesh_module.MeshError, match="closed"):  # the same clear error, never a quiet local run
            call()
    assert m.status()[-1]["answered"] == 0
    assert [p.returncode for p in m._processes] == [0] and not dist.is_initialized()


def _slow_op_seconds(m, x, w):
    """Seconds one worker takes for transform_matrix(x, w), both workers busy (as in a burst)."""
    futures = [m.submit("transform_matrix", x, w) for _ in range(2)]
    start = time.monotonic()
    for f in futures:
        f.result(timeout=60)
    return time.monotonic() - start


def test_a_burst_longer_than_the_deadline_keeps_healthy_workers_up():
    """16 requests on 2 workers: each takes well under the deadline, but the last in each
    worker's queue waits far longer than it. The deadline measures a request's own work."""
    x, w = torch.randn(1200, 700), torch.randn(700, 700)
    with mesh_module.connect(workers=2, timeout=30) as m:
        m.offload("transform_matrix", x, w)  # warm both
        m.offload("transform_matrix", x, w)
        one = max(_slow_op_seconds(m, x, w) for _ in range(2))
        m.timeout = max(4 * one, 0.1)
        futures = [m.submit("transform_matrix", x, w) for _ in range(16)]
        results = [f.result(timeout=120) for f in futures]
        status = m.status()
        assert all(s["state"] == "up" and s["failures"] == 0 for s in status[:-1]), (m.timeout, one, status)
        assert status[-1]["answered"] == 0  # nothing ran locally
        assert len(results) == 16


def test_stalled_workers_come_back_and_dead_ones_fail_over(rng):
    """Worker 1 dies, worker 2 stops: requests run locally. Worker 2 continues: the connection its
    late reply would come on was ended at the deadline, so it meets the edge in a new one, is
    re-admitted and serves again."""
    m = mesh_module.connect(workers=2, timeout=1)
    try:
        x, w = random_tensor(rng, 50, 8), random_tensor(rng, 6, 8)
        local = cg.transform_matrix(x, w, activation="relu")
        m._processes[0].kill()  # worker 1 dies
        m._processes[0].wait()
        assert wait_until(lambda: m.status()[0]["state"] == "dead", 1.0)  # noticed within a second
        assert torch.equal(m.map("transform_matrix", x, w, activation="relu"), local)
        os.kill(m._processes[1].pid, signal.SIGSTOP)  # worker 2 stalls: its deadline passes
        start = time.monotonic()
        assert torch.equal(m.offload("transform_matrix", x, w, activation="relu"), local)  # runs locally
        assert time.monotonic() - start < 1 + 2.0
        status = {s["rank"]: s for s in m.status()}
        assert status[1]["state"] == "dead" and status[2]["state"] == "stalled" and status[0]["answered"] >= 1
        m.fallback = "raise"
        with pytest.raises(mesh_module.MeshError, match="no live worker"):
            m.offload("identity", x)
        os.kill(m._processes[1].pid, signal.SIGCONT)
        assert wait_until(lambda: m.status()[1]["state"] == "up", 10.0), m.status()
        assert torch.equal(m.offload("transform_matrix", x, w, activation="relu"), local)
        status = {s["rank"]: s for s in m.status()}
        assert status[2]["readmissions"] == 1 and status[2]["late_replies"] == 0 and status[2]["answered"] >= 1
    finally:
        resume_workers(m)
        m.close()


def test_load_spreads_over_four_workers_and_a_worker_killed_mid_transfer_is_noticed_within_a_second():
    """Four workers share single requests evenly. Then a 12 MiB request (three chunks each way)
    goes to a worker that is killed while it travels: another worker answers it within a second
    or so, not at the 30 s deadline."""
    with mesh_module.connect(workers=4, timeout=30) as m:
        x = torch.arange(8.0)
        for _ in range(100):
            m.offload("identity", x)
        assert answered(m) == [25, 25, 25, 25]
        for f in [m.submit("identity", x) for _ in range(100)]:
            f.result(timeout=30)
        counts = [a - 25 for a in answered(m)]
        assert sum(counts) == 100 and min(counts) >= 12, counts
        big = torch.randn(3 << 20)
        for trial, delay in enumerate((0.0, 0.005, 0.02)):
            target, victim = m._workers[trial], m._processes[trial]
            killer = threading.Timer(delay, victim.kill)
            start = time.monotonic()
            killer.start()
            echo = m._run("identity", (big,), {}, preferred=target)[0]
            elapsed = time.monotonic() - start
            killer.join()
            assert torch.equal(echo, big) and elapsed < 2.5, (trial, elapsed)
            assert wait_until(lambda: target.state == "dead", 1.0)
        assert m.status()[3]["state"] == "up"


def test_local_fallback_has_the_same_deadline():
    # about 80 float64 GEMMs of 1500 x 1500 x 410: seconds on this machine, far past the deadline
    a = torch.randn(1500, 1500, dtype=torch.float64)
    with mesh_module.connect(workers=1, timeout=0.5) as m:
        m._processes[0].kill()
        assert wait_until(lambda: m.status()[0]["state"] == "dead", 1.0)
        start = time.monotonic()
        with pytest.raises(mesh_module.MeshError, match="past the 0.5 s deadline"):
            m.offload("svd_compress", a, k=400, power_iters=40)
        assert time.monotonic() - start < 1.5
    for thread in threading.enumerate():  # the computation cannot be interrupted: let it end before the next test
        if thread.name == "mesh-local":
            thread.join(timeout=60)


def test_a_local_run_hands_back_tensors_of_its_own():
    x, y = torch.randn(5), torch.arange(7)
    with mesh_module.connect(workers=1, timeout=10) as m:
        m._processes[0].kill()
        assert wait_until(lambda: m.status()[0]["state"] == "dead", 1.0)
        echoed = m.offload("identity", x, y)
    assert all(torch.equal(e, t) and e.data_ptr() != t.data_ptr() for e, t in zip(echoed, (x, y)))
    assert m.status()[1]["answered"] == 1  # the edge's own row: it ran here


def test_a_worker_killed_with_requests_in_flight_loses_none_of_them():
    """Pipelined requests from several threads; one worker dies while some of its requests are on
    the wire: every future gets its own answer, once."""
    with mesh_module.connect(workers=2, timeout=10, max_in_flight=4) as m:
        inputs = [torch.full((257,), float(i)) for i in range(400)]
        futures = []
        for i, x in enumerate(inputs):
            if i == 150:
                m._processes[0].kill()
            futures.append(m.submit("identity", x))
        answers = [f.result(timeout=60) for f in futures]
        assert all(torch.equal(a, x) for a, x in zip(answers, inputs))
        status = {s["rank"]: s for s in m.status()}
        assert not status[1]["alive"] and status[2]["alive"]
        assert status[1]["answered"] + status[2]["answered"] + status[0]["answered"] == 400
        assert status[2]["peak_in_flight"] <= 4
