"""Neural Mesh on loopback with real worker processes: results equal local ones, malformed and
failing requests get error replies, dead or stalled workers fail over, nothing is lost."""

from __future__ import annotations

import os
import signal
import time

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
    big = torch.randn(2600, 1024)  # 10.2 MiB: three chunks
    assert torch.equal(m.offload("identity", big), big)
    a = _t(rng, 40, 30).double()
    u, s, vh = m.offload("svd_compress", a, k=4, seed=3)
    ref = cg.svd_compress(a, k=4, seed=3)
    assert torch.equal(u, ref.u) and torch.equal(s, ref.s) and torch.equal(vh, ref.vh)
    status = m.status()
    assert sum(s.get("answered", 0) for s in status if s["rank"] != 0) >= 5
    assert all(s["alive"] for s in status if s["rank"] != 0)


_IDS = iter(range(10**12, 10**13))  # request ids of hand-made messages, apart from the mesh's own


def _message(request_id, tensors, op_id=7, chunk=0, params=()):
    """One hand-made message (NumPy uint8) of a request for ``op_id`` carrying ``tensors``."""
    header = mesh_module._header(request_id, op_id, tensors, params)
    buffer = np.empty(mesh_module.MESSAGE_BYTES, dtype=np.uint8)
    return buffer[: mesh_module._fill(buffer, header, chunk, mesh_module._Bytes.of(tensors))]


def _send_raw(worker, message):
    dist.send(torch.from_numpy(np.ascontiguousarray(message)), worker.rank, group=worker.group)


def _reply(mesh, worker, request_id):
    """(status, message text or result tensors) of the worker's reply to ``request_id``."""
    status, tensors = mesh._await_reply(worker, request_id, time.monotonic() + 20)
    return status, bytes(tensors[0].tolist()).decode() if status else tensors


def _header(request_id, op_id=7, count=1, n_params=0, dtype=0, shape=(3,), version=mesh_module.VERSION):
    h = mesh_module._header(request_id, op_id, ())
    h[1], h[4], h[5] = version, count, n_params
    base = mesh_module._SPECS_AT
    h[base], h[base + 1] = dtype, len(shape)
    h[base + 2 : base + 2 + len(shape)] = shape
    return h


def _serves_afterwards(mesh, worker):
    x = torch.arange(6.0)
    assert torch.equal(mesh._run("identity", (x,), {}, preferred=worker)[0], x)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    field=st.sampled_from(["version", "op", "count", "params", "dtype", "ndim", "shape", "huge", "truncated"]),
    value=st.integers(-(2**62), 2**62),
)
def test_fuzzed_headers_get_error_replies_and_the_worker_keeps_serving(two_workers, field, value):
    worker, request_id = two_workers._workers[0], next(_IDS)
    if field == "truncated":  # the message ends before the bytes its header declares
        message = _message(request_id, (torch.arange(3.0),))[: mesh_module.HEADER_BYTES + abs(value) % 12]
    else:
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
        message = _message(request_id, ())
        message[: mesh_module.HEADER_BYTES].view(np.int64)[:] = _header(request_id, **kwargs)
    _send_raw(worker, message)
    status, text = _reply(two_workers, worker, request_id)
    assert status == mesh_module.STATUS_BAD_REQUEST and text
    _serves_afterwards(two_workers, worker)


def test_a_request_whose_chunks_stop_early_gets_an_error_reply(two_workers):
    """A 2-chunk request of which only the first chunk comes, then a good request: one error
    reply for the first, a result for the second; nothing else comes back."""
    worker = two_workers._workers[1]
    big = torch.randint(0, 255, (mesh_module.CHUNK_BYTES + 10,), dtype=torch.uint8)
    cut, good = next(_IDS), next(_IDS)
    _send_raw(worker, _message(cut, (big,), chunk=0))
    x = torch.arange(5.0)
    _send_raw(worker, _message(good, (x,)))
    status, text = _reply(two_workers, worker, cut)
    assert status == mesh_module.STATUS_BAD_REQUEST and "1 of 2 chunks" in text
    status, (echo,) = _reply(two_workers, worker, good)
    assert status == mesh_module.STATUS_OK and torch.equal(echo, x)
    orphan = next(_IDS)  # a later chunk without its first one
    _send_raw(worker, _message(orphan, (big,), chunk=1))
    status, text = _reply(two_workers, worker, orphan)
    assert status == mesh_module.STATUS_BAD_REQUEST and "without the start" in text
    _serves_afterwards(two_workers, worker)
    assert worker.replies == {} and worker.alive


def test_large_requests_travel_in_chunks_and_come_back_whole(two_workers, rng):
    m = two_workers
    sizes = [0, 1, mesh_module.CHUNK_BYTES - 1, mesh_module.CHUNK_BYTES, 2 * mesh_module.CHUNK_BYTES + 7]
    for n in sizes:
        x = torch.from_numpy(rng.integers(0, 256, n, dtype=np.uint8))
        assert torch.equal(m.offload("identity", x), x), n
    parts = (torch.randn(300, 1000), torch.randn(3, 5, dtype=torch.float64), torch.arange(7, dtype=torch.int32)[::2], torch.randn(2, 3).bfloat16())
    for sent, echo in zip(parts, m.offload("identity", *parts)):  # tensors spanning chunk borders, non-contiguous, bf16
        assert echo.dtype == sent.dtype and torch.equal(echo, sent)
    assert all(s["alive"] and s["failures"] == 0 for s in m.status()[:-1]) and m.status()[-1]["answered"] == 0  # no local fallback


def test_requests_pipeline_with_a_bounded_queue_per_worker(rng):
    with mesh_module.connect(workers=1, timeout=20, max_in_flight=2) as m:
        futures = [m.submit("identity", torch.full((100,), float(i))) for i in range(40)]
        assert [int(f.result()[0]) for f in futures] == list(range(40))
        (worker,) = [s for s in m.status() if s["rank"] == 1]
        assert worker["answered"] == 40 and 1 <= worker["peak_in_flight"] <= 2 and worker["in_flight"] == 0
        with pytest.raises(ValueError, match="unknown op"):
            m.submit("nope", torch.ones(1))  # checked before anything is queued
    with pytest.raises(ValueError, match="max_in_flight"):
        mesh_module.connect(workers=1, max_in_flight=0)


def test_op_errors_come_back_typed_and_named(two_workers, rng):
    with pytest.raises(mesh_module.MeshError, match="ShapeError"):
        two_workers.offload("transform_matrix", _t(rng, 4, 3), _t(rng, 5, 6))
    with pytest.raises(ValueError, match="unknown op"):
        two_workers.offload("rm -rf", _t(rng, 2, 2))
    with pytest.raises(TypeError, match="complex64"):  # refused at the edge: no worker is blamed
        two_workers.offload("identity", torch.ones(3, dtype=torch.complex64))
    with pytest.raises(ValueError, match="at most 6 dimensions"):
        two_workers.offload("identity", torch.ones((1,) * 7))
    codes = cg.pack_bits(_t(rng, 5, 16))
    for k in (2.5, 2.0, "2", True):  # never truncated or coerced on the way to the worker
        with pytest.raises(TypeError, match="must be an int"):
            two_workers.offload("hamming_topk", codes, codes, k=k)
    distances, _ = two_workers.offload("hamming_topk", codes, codes, k=np.int64(2))
    assert distances.shape == (5, 2)
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
