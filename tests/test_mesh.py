"""Neural Mesh on loopback with real worker processes: results equal local ones, malformed and
failing requests get error replies, dead or stalled workers fail over, nothing is lost."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
import torch
import torch.distributed as dist
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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
    big = torch.randn(640, 1024)  # 2.5 MiB: payload after the frame
    assert torch.equal(m.offload("identity", big), big)
    a = _t(rng, 40, 30).double()
    u, s, vh = m.offload("svd_compress", a, k=4, seed=3)
    ref = cg.svd_compress(a, k=4, seed=3)
    assert torch.equal(u, ref.u) and torch.equal(s, ref.s) and torch.equal(vh, ref.vh)
    status = m.status()
    assert sum(s.get("answered", 0) for s in status if s["rank"] != 0) >= 5
    assert all(s["alive"] for s in status if s["rank"] != 0)


def _raw_request(worker, header):
    """Send a hand-made request header and return (status, message) of the reply."""
    mesh_module._send(header, (), worker.rank, worker.group, 20)
    reply, frame = mesh_module._recv_frame(worker.rank, worker.group, 20)
    specs = mesh_module._decode_specs(reply, reply[4], 1 << 20)
    (message,) = mesh_module._recv_payload(reply, frame, specs, worker.rank, worker.group, 20)
    return reply[3], bytes(message.tolist()).decode()


def _header(request_id=5, op_id=7, count=1, n_params=0, dtype=0, shape=(3,), version=mesh_module.VERSION):
    h = mesh_module._encode(request_id, op_id, ())
    h[1], h[4], h[5] = version, count, n_params
    base = mesh_module._TENSOR_BLOCK
    h[base], h[base + 1] = dtype, len(shape)
    h[base + 2 : base + 2 + len(shape)] = torch.tensor(shape)
    return h


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    field=st.sampled_from(["version", "op", "count", "params", "dtype", "ndim", "shape", "huge"]),
    value=st.integers(-(2**62), 2**62),
)
def test_fuzzed_headers_get_error_replies_and_the_worker_keeps_serving(two_workers, field, value):
    worker = two_workers._workers[0]
    kwargs = {
        "version": {"version": value if value != mesh_module.VERSION else value + 1},
        "op": {"op_id": value if value not in mesh_module.OPS and value != mesh_module.SHUTDOWN else 1000},
        "count": {"count": value if not 1 <= value <= 4 else 9},
        "params": {"n_params": value if value != 0 else 3},
        "dtype": {"dtype": value if not 0 <= value < len(mesh_module.DTYPES) else -1},
        "ndim": {"shape": tuple([2] * 7)},
        "shape": {"shape": (-abs(value) - 1,)},
        "huge": {"shape": (2**31 - 1, 2**31 - 1)},
    }[field]
    status, message = _raw_request(worker, _header(**kwargs))
    assert status == 1 and message
    x = torch.arange(6.0)
    assert torch.equal(two_workers._run("identity", (x,), {}, preferred=worker)[0], x)


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


def test_thousand_requests_with_a_worker_killed_midway(rng):
    m = mesh_module.connect(workers=2, timeout=10)
    try:
        answers = []
        for i in range(1000):
            if i == 500:
                m._processes[0].kill()
            x = torch.full((4,), float(i))
            answers.append(m.offload("identity", x))
        assert [int(a[0]) for a in answers] == list(range(1000))  # none lost, none duplicated, in order
        status = {s["rank"]: s for s in m.status()}
        assert not status[1]["alive"] and status[2]["alive"]
        assert status[1]["answered"] + status[2]["answered"] + status[0]["answered"] == 1000
    finally:
        m.close()
