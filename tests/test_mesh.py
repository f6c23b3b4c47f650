"""Neural Mesh on loopback with real worker processes: results equal local ones, malformed and
failing requests get error replies, dead or stalled workers fail over, nothing is lost."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
import torch
import torch.distributed as dist

import clisonix_gpu as cg
from clisonix_gpu import mesh as mesh_module


def _t(rng, *shape):
    return torch.from_numpy(rng.standard_normal(shape).astype(np.float32))


@pytest.fixture
def two_workers():
    m = mesh_module.connect(workers=2, timeout=20)
    yield m
    for p in m._processes:  # a test may have stopped one
        try:
            os.kill(p.pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
    m.close()


def test_offload_and_map_equal_local_results(two_workers, rng):
    m = two_workers
    x, w, b = _t(rng, 129, 33), _t(rng, 17, 33), _t(rng, 17)
    local = cg.transform_matrix(x, w, b, activation="gelu")
    assert torch.equal(m.offload("transform_matrix", x, w, b, activation="gelu"), local)
    assert torch.equal(m.map("transform_matrix", x, w, b, activation="gelu"), local)
    codes, db = cg.pack_bits(_t(rng, 11, 70)), cg.pack_bits(_t(rng, 40, 70))
    assert torch.equal(m.offload("binary_matmul", codes, db, n=70), cg.binary_matmul(codes, db, 70))
    dist_, idx = m.offload("hamming_topk", codes, db, k=5)
    ref_d, ref_i = cg.hamming_topk(codes, db, 5)
    assert torch.equal(dist_, ref_d) and torch.equal(idx, ref_i)
    big = torch.randn(640, 1024)  # 2.5 MiB
    assert torch.equal(m.offload("identity", big), big)
    status = m.status()
    assert sum(s.get("answered", 0) for s in status if s["rank"] != 0) >= 5
    assert all(s["alive"] for s in status if s["rank"] != 0)


def test_bad_requests_get_error_replies_and_the_worker_keeps_serving(two_workers, rng):
    m = two_workers
    worker = m._workers[0]
    for header in (
        mesh_module._encode(99, 42, ()),  # op id outside the allowlist
        mesh_module._encode(98, 7, (torch.empty(0),)),  # tensor block claims ...
    ):
        if int(header[3]) == 7:
            header[mesh_module._TENSOR_BLOCK + 1] = 2  # ... 2-D
            header[mesh_module._TENSOR_BLOCK + 2 : mesh_module._TENSOR_BLOCK + 4] = 2**31 - 1  # ... and 8 EiB
        dist.send(header, worker.rank, group=worker.group)
        reply = torch.empty(mesh_module.HEADER_WORDS, dtype=torch.int64)
        dist.recv(reply, worker.rank, group=worker.group)
        assert int(reply[2]) == int(header[2]) and int(reply[3]) != 0
        message = torch.empty(int(reply[5]), dtype=torch.uint8)
        dist.recv(message, worker.rank, group=worker.group)
        assert "allowlist" in bytes(message.tolist()).decode() or "limit" in bytes(message.tolist()).decode()
    x = _t(rng, 4, 3)
    assert torch.equal(m._run("identity", (x,), {}, preferred=worker)[0], x)


def test_op_errors_come_back_typed_and_named(two_workers, rng):
    with pytest.raises(mesh_module.MeshError, match="ShapeError"):
        two_workers.offload("transform_matrix", _t(rng, 4, 3), _t(rng, 5, 6))
    with pytest.raises(ValueError, match="unknown op"):
        two_workers.offload("rm -rf", _t(rng, 2, 2))
    assert all(s["alive"] for s in two_workers.status() if s["rank"] != 0)


def test_dead_and_stalled_workers_fail_over_and_nothing_is_lost(rng):
    m = mesh_module.connect(workers=2, timeout=3)
    try:
        x, w = _t(rng, 50, 8), _t(rng, 6, 8)
        local = cg.transform_matrix(x, w, activation="relu")
        m._processes[0].kill()  # worker 1 dies
        m._processes[0].wait()
        assert torch.equal(m.map("transform_matrix", x, w, activation="relu"), local)
        os.kill(m._processes[1].pid, signal.SIGSTOP)  # worker 2 stalls: its deadline passes
        assert torch.equal(m.map("transform_matrix", x, w, activation="relu"), local)  # runs locally
        status = {s["rank"]: s for s in m.status()}
        assert not status[1]["alive"] and not status[2]["alive"] and status[0]["answered"] >= 1
        m.fallback = "raise"
        with pytest.raises(mesh_module.MeshError, match="no live worker"):
            m.offload("identity", x)
    finally:
        os.kill(m._processes[1].pid, signal.SIGCONT)
        m._processes[1].kill()
        m.close()


def test_close_stops_workers_cleanly():
    m = mesh_module.connect(workers=1, timeout=20)
    m.close()
    assert [p.returncode for p in m._processes] == [0]
    assert not dist.is_initialized()
