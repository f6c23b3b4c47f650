"""Neural Mesh on loopback with real worker processes: results equal local ones, load spreads,
malformed and failing requests get error replies, dead or stalled workers fail over and stalled
ones come back, nothing is lost. Every wait here is bounded."""

from __future__ import annotations

import os
import resource
import socket
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mesh_helpers import answered, random_tensor, resume_workers

import clisonix_gpu as cg
from clisonix_gpu import mesh as mesh_module
from clisonix_gpu.mesh import wire


@pytest.fixture(scope="module")
def two_workers():
    m = mesh_module.connect(workers=2, timeout=20)
    yield m
    resume_workers(m)
    m.close()


def test_offload_and_map_equal_local_results(two_workers, rng):
    m = two_workers
    x, w, b = random_tensor(rng, 129, 33), random_tensor(rng, 17, 33), random_tensor(rng, 17)
    local = cg.transform_matrix(x, w, b, activation="gelu")
    assert torch.equal(m.offload("transform_matrix", x, w, b, activation="gelu"), local)
    assert torch.equal(m.map("transform_matrix", x, w, b, activation="gelu"), local)
    codes, db = cg.pack_bits(random_tensor(rng, 11, 70)), cg.pack_bits(random_tensor(rng, 40, 70))
    assert torch.equal(m.offload("binary_matmul", codes, db, n=70), cg.binary_matmul(codes, db, 70))
    dist_, idx = m.offload("hamming_topk", codes, db, k=5)
    ref_d, ref_i = cg.hamming_topk(codes, db, 5)
    assert torch.equal(dist_, ref_d) and torch.equal(idx, ref_i)
    big = torch.randn(2600, 1024)  # 10.2 MiB: three chunks
    assert torch.equal(m.offload("identity", big), big)
    a = random_tensor(rng, 40, 30).double()
    u, s, vh = m.offload("svd_compress", a, k=4, seed=3)
    ref = cg.svd_compress(a, k=4, seed=3)
    assert torch.equal(u, ref.u) and torch.equal(s, ref.s) and torch.equal(vh, ref.vh)
    assert all(s["alive"] for s in m.status())


@pytest.mark.parametrize("how", ["offload", "submit"])
def test_single_requests_spread_evenly_over_two_workers(two_workers, how):
    m = two_workers
    before = answered(m)
    x = torch.arange(8.0)
    if how == "offload":
        for _ in range(100):
            m.offload("identity", x)
    else:
        for f in [m.submit("identity", x) for _ in range(100)]:
            f.result(timeout=30)
    counts = [a - b for a, b in zip(answered(m), before)]
    assert sum(counts) == 100
    assert counts == [50, 50] if how == "offload" else min(counts) >= 30, counts


def test_status_names_each_workers_host_and_pid(two_workers):
    rows = two_workers.status()
    workers = [r for r in rows if r["rank"] != 0]
    assert [r["pid"] for r in workers] == [p.pid for p in two_workers._processes]
    assert all(r["host"] == socket.gethostname() for r in rows)
    assert rows[-1]["rank"] == 0 and rows[-1]["pid"] == os.getpid()


def _listening(pid):
    """(address, port) of every TCP socket that process ``pid`` listens on, from /proc."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table, v6 in (("tcp", False), ("tcp6", True)):
        with open(f"/proc/{pid}/net/{table}") as f:
            for line in f.read().splitlines()[1:]:
                fields = line.split()
                if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                    continue
                hex_addr, hex_port = fields[1].split(":")
                raw = bytes.fromhex(hex_addr)
                raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                found.append((socket.inet_ntop(socket.AF_INET6 if v6 else socket.AF_INET, raw), int(hex_port, 16)))
    return found


def test_the_edge_and_its_workers_listen_on_loopback_only(two_workers):
    for pid in [os.getpid(), *(p.pid for p in two_workers._processes)]:
        for addr, port in _listening(pid):
            assert addr in ("127.0.0.1", "::1", "::ffff:127.0.0.1"), f"pid {pid} listens on {addr}:{port}"
    store_port = two_workers._keep_open[0].port
    assert ("127.0.0.1", store_port) in _listening(os.getpid())


def test_the_open_file_limit_is_raised_in_the_edge_and_the_workers(two_workers):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert soft == min(hard, 1 << 20)
    for p in two_workers._processes:
        with open(f"/proc/{p.pid}/limits") as f:
            line = next(x for x in f if x.startswith("Max open files"))
        assert int(line.split()[3]) == soft


_IDS = iter(range(10**12, 10**13))  # request ids of hand-made messages, apart from the mesh's own


def _send_raw(worker, message, *awaited_ids):
    """Send raw bytes to ``worker``; replies to ``awaited_ids`` are kept for :func:`_reply` (the
    edge drops replies nobody awaits, so the ids are registered before the send)."""
    with worker.cond:
        worker.awaited.update(dict.fromkeys(awaited_ids, time.monotonic()))
        worker.in_flight += len(awaited_ids)
    dist.send(torch.from_numpy(np.ascontiguousarray(message)), worker.rank, group=worker.group)


def _reply(mesh, worker, request_id):
    """(status, message text or result tensors) of the worker's reply to ``request_id``, received
    as a caller of the mesh receives its own."""
    status, tensors = mesh._await_reply(worker, worker.generation, request_id, time.monotonic())
    return status, bytes(tensors[0].tolist()).decode() if status else tensors


def _bad_header(request_id, op_id=7, count=1, n_params=0, dtype=0, shape=(3,), version=wire.VERSION, params=()):
    h = wire.header(request_id, op_id, ())
    h[wire.VERSION_AT], h[wire.N_TENSORS_AT], h[wire.N_PARAMS_AT] = version, count, n_params
    h[wire.PARAMS_AT : wire.PARAMS_AT + len(params)] = params
    h[wire.SPECS_AT], h[wire.SPECS_AT + 1] = dtype, len(shape)
    h[wire.SPECS_AT + 2 : wire.SPECS_AT + 2 + len(shape)] = shape
    return h


def _serves_afterwards(mesh, worker):
    x = torch.arange(6.0)
    assert torch.equal(mesh._run("identity", (x,), {}, preferred=worker)[0], x)


def test_a_request_belongs_to_the_connection_it_went_out_on(two_workers):
    """A caller whose request went out on a connection that has since ended (the worker missed a
    deadline and came back on its next one) stops waiting at once, and a request is never
    registered on a connection other than the one it is sent on: nothing on the next connection
    knows it, and other requests' replies there must not keep it waiting."""
    from clisonix_gpu.mesh.edge import _WorkerGone

    worker = two_workers._workers[1]
    old, request_id = worker.generation - 1, next(_IDS)
    with worker.lock:
        worker.awaited[request_id] = time.monotonic()
        worker.in_flight += 1
    start = time.monotonic()
    try:
        with pytest.raises(_WorkerGone):
            two_workers._await_reply(worker, old, request_id, time.monotonic())
    finally:
        with worker.lock:
            two_workers._free_slot_locked(worker, request_id)
    x = torch.arange(4.0)
    words = wire.header(0, 7, (x,))
    with pytest.raises(_WorkerGone):
        two_workers._call(worker, old, words, wire.Payload.of((x,)))
    assert time.monotonic() - start < 1.0
    assert worker.in_flight == 0 and not worker.awaited
    _serves_afterwards(two_workers, worker)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    field=st.sampled_from(["version", "op", "count", "params", "dtype", "ndim", "shape", "huge", "bound", "truncated"]),
    value=st.integers(-(2**62), 2**62),
)
def test_fuzzed_headers_get_error_replies_and_the_worker_keeps_serving(two_workers, field, value):
    worker, request_id = two_workers._workers[0], next(_IDS)
    if field == "truncated":  # the message ends before the bytes its header declares
        message = wire.encode(request_id, 7, (torch.arange(3.0),))[0][: wire.HEADER_BYTES + abs(value) % 12]
    else:
        kwargs = {
            "version": {"version": value if value != wire.VERSION else value + 1},
            "op": {"op_id": value if value not in mesh_module.OPS and value != wire.SHUTDOWN else 1000},
            "count": {"count": value if not 1 <= value <= 4 else 9},
            "params": {"n_params": value if value != 0 else 3},
            "dtype": {"dtype": value if not 0 <= value < len(wire.DTYPES) else -1},
            "ndim": {"shape": tuple([2] * 7)},
            "shape": {"shape": (-abs(value) - 1,)},
            "huge": {"shape": (2**31 - 1, 2**31 - 1)},
            "bound": {
                "op_id": mesh_module.allowlist.OP_IDS["svd_compress"],
                "n_params": 4,
                "shape": (4, 4),
                "params": (2, 10, 65 + abs(value) % 2**40, 0),
            },
        }[field]
        message = wire.encode(request_id, 7, ())[0]
        message[: wire.HEADER_BYTES].view(np.int64)[:] = _bad_header(request_id, **kwargs)
    _send_raw(worker, message, request_id)
    status, text = _reply(two_workers, worker, request_id)
    assert status == wire.STATUS_BAD_REQUEST and text
    _serves_afterwards(two_workers, worker)


def test_a_request_whose_chunks_stop_early_gets_an_error_reply(two_workers):
    """A 2-chunk request of which only the first chunk comes, then a good request: one error
    reply for the first, a result for the second; nothing else comes back."""
    worker = two_workers._workers[1]
    big = torch.randint(0, 255, (wire.CHUNK_BYTES + 10,), dtype=torch.uint8)
    cut, good = next(_IDS), next(_IDS)
    _send_raw(worker, wire.encode(cut, 7, (big,))[0], cut, good)
    x = torch.arange(5.0)
    _send_raw(worker, wire.encode(good, 7, (x,))[0])
    status, text = _reply(two_workers, worker, cut)
    assert status == wire.STATUS_BAD_REQUEST and "1 of 2 chunks" in text
    status, (echo,) = _reply(two_workers, worker, good)
    assert status == wire.STATUS_OK and torch.equal(echo, x)
    orphan = next(_IDS)  # a later chunk without its first one
    _send_raw(worker, wire.encode(orphan, 7, (big,))[1], orphan)
    status, text = _reply(two_workers, worker, orphan)
    assert status == wire.STATUS_BAD_REQUEST and "without the start" in text
    _serves_afterwards(two_workers, worker)
    assert worker.replies == {} and worker.alive


def test_large_requests_travel_in_chunks_and_come_back_whole(two_workers, rng):
    m = two_workers
    local_before = m.status()[-1]["answered"]
    for n in [0, 1, wire.CHUNK_BYTES - 1, wire.CHUNK_BYTES, 2 * wire.CHUNK_BYTES + 7]:
        x = torch.from_numpy(rng.integers(0, 256, n, dtype=np.uint8))
        assert torch.equal(m.offload("identity", x), x), n
    parts = (torch.randn(300, 1000), torch.randn(3, 5, dtype=torch.float64), torch.arange(7, dtype=torch.int32)[::2], torch.randn(2, 3).bfloat16())
    for sent, echo in zip(parts, m.offload("identity", *parts)):  # tensors spanning chunk borders, non-contiguous, bf16
        assert echo.dtype == sent.dtype and torch.equal(echo, sent)
    assert all(s["alive"] for s in m.status()) and m.status()[-1]["answered"] == local_before  # no local fallback


def test_op_errors_come_back_typed_and_named(two_workers, rng):
    with pytest.raises(mesh_module.MeshError, match="ShapeError"):
        two_workers.offload("transform_matrix", random_tensor(rng, 4, 3), random_tensor(rng, 5, 6))
    with pytest.raises(ValueError, match="unknown op"):
        two_workers.offload("rm -rf", random_tensor(rng, 2, 2))
    with pytest.raises(TypeError, match="complex64"):  # refused at the edge: no worker is blamed
        two_workers.offload("identity", torch.ones(3, dtype=torch.complex64))
    with pytest.raises(ValueError, match="at most 6 dimensions"):
        two_workers.offload("identity", torch.ones((1,) * 7))
    with pytest.raises(ValueError, match="power_iters"):  # bounded at the edge: never reaches a worker
        two_workers.offload("svd_compress", random_tensor(rng, 8, 8), k=2, power_iters=10**9)
    codes = cg.pack_bits(random_tensor(rng, 5, 16))
    for k in (2.5, 2.0, "2", True):  # never truncated or coerced on the way to the worker
        with pytest.raises(TypeError, match="must be an int"):
            two_workers.offload("hamming_topk", codes, codes, k=k)
    distances, _ = two_workers.offload("hamming_topk", codes, codes, k=np.int64(2))
    assert distances.shape == (5, 2)
    assert all(s["alive"] for s in two_workers.status())


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"workers": 1.5}, TypeError, "workers"),
        ({"workers": True}, TypeError, "workers"),
        ({"workers": "2"}, TypeError, "workers"),
        ({"workers": 0}, ValueError, "workers"),
        ({"workers": 1, "timeout": "30"}, TypeError, "timeout"),
        ({"workers": 1, "timeout": 0}, ValueError, "timeout"),
        ({"workers": 1, "master_addr": 127}, TypeError, "master_addr"),
        ({"workers": 1, "master_port": 80.0}, TypeError, "master_port"),
        ({"workers": 1, "fallback": None}, TypeError, "fallback"),
        ({"workers": 1, "fallback": "retry"}, ValueError, "fallback"),
        ({"workers": 1, "backend": "nccl"}, ValueError, "backend"),
        ({"workers": 1, "max_in_flight": 2.0}, TypeError, "max_in_flight"),
        ({"workers": 1, "max_in_flight": 0}, ValueError, "max_in_flight"),
    ],
)
def test_connect_names_the_argument_of_the_wrong_type_or_range(kwargs, error, name):
    with pytest.raises(error, match=name):
        mesh_module.connect(**kwargs)
