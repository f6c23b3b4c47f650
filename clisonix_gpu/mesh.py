"""Neural Mesh: offload tensors from this process (the edge, rank 0) to workers (ranks >= 1) over
torch.distributed point-to-point messages, with failover; nothing is lost or answered twice.

Wire format, no pickle: every message starts with a fixed int64 header of ``HEADER_WORDS`` words
(magic, protocol version, request id, op id from an allowlist, parameters, dtype codes and shapes),
followed by each tensor's raw bytes as a uint8 tensor. A worker checks every header field against
its limits before receiving anything else; a malformed request gets an error reply and the worker
keeps serving. Each worker talks to the edge through a process group of its own, so one worker's
failure cannot poison the others.

Security: torch.distributed has no authentication or encryption. The mesh binds 127.0.0.1 unless
told otherwise; across hosts, run it inside a private network or an SSH/WireGuard tunnel.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import math
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from . import alda
from .ops import ACTIVATIONS, binary_matmul, hamming_distance, hamming_topk, pack_bits, svd_compress, transform_matrix

__all__ = ["Mesh", "MeshError", "OPS", "connect", "serve"]

MAGIC = 0x434C5358  # "CLSX"
VERSION = 1
HEADER_WORDS = 64
MAX_TENSORS = 4
MAX_PARAMS = 4
MAX_NDIM = 6
MAX_DIM = 2**31 - 1
DEFAULT_MAX_BYTES = 1 << 31  # per request, all tensors together
SHUTDOWN, HELLO = 0, 1

# dtype codes on the wire
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.uint8, torch.int32, torch.int64, torch.bool]
_CODE = {d: i for i, d in enumerate(DTYPES)}
_ITEMSIZE = {d: torch.empty(0, dtype=d).element_size() for d in DTYPES}


class MeshError(RuntimeError):
    """A request failed on a worker (message from the worker) or no worker could answer it."""


@dataclasses.dataclass(frozen=True)
class _Op:
    name: str
    fn: Callable[..., Any]
    n_tensors: tuple[int, int]  # allowed tensor count (min, max)
    params: tuple[str, ...]  # integer parameters, in header order
    defaults: tuple[tuple[str, int], ...] = ()


def _transform_matrix(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, *, activation: int = 0) -> tuple[torch.Tensor]:
    return (transform_matrix(x, w, bias, activation=ACTIVATIONS[activation]),)


def _svd_compress(a: torch.Tensor, *, k: int, oversample: int, power_iters: int, seed: int) -> tuple[torch.Tensor, ...]:
    lr = svd_compress(a, k, oversample=oversample, power_iters=power_iters, seed=seed)
    return lr.u, lr.s, lr.vh


def _hamming_topk(q: torch.Tensor, db: torch.Tensor, *, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    distances, indices = hamming_topk(q, db, k)
    return distances, indices


# The allowlist: op id -> op. Parameters travel as int64; activation by its index in ACTIVATIONS.
OPS: dict[int, _Op] = {
    2: _Op("transform_matrix", _transform_matrix, (2, 3), ("activation",)),
    3: _Op("binary_matmul", lambda a, b, *, n: (binary_matmul(a, b, n),), (2, 2), ("n",)),
    4: _Op("hamming_distance", lambda a, b: (hamming_distance(a, b),), (2, 2), ()),
    5: _Op("hamming_topk", _hamming_topk, (2, 2), ("k",)),
    6: _Op("pack_bits", lambda x: (pack_bits(x),), (1, 1), ()),
    7: _Op("identity", lambda *ts: tuple(t.clone() for t in ts), (1, MAX_TENSORS), ()),
    8: _Op("svd_compress", _svd_compress, (1, 1), ("k", "oversample", "power_iters", "seed"), (("oversample", 10), ("power_iters", 2), ("seed", 0))),
}
_OP_IDS = {op.name: i for i, op in OPS.items()}

# ----------------------------------------------------------------------------- wire format
# Every message is a fixed-size uint8 frame: the int64 header, then up to INLINE_BYTES of payload,
# so a small request or reply is one message each way. Larger payloads follow the frame as one
# raw uint8 message per tensor.
# header: [MAGIC, VERSION, request_id, op id (request) | status (reply), n_tensors, n_params,
#          inline (0/1), 0, params x MAX_PARAMS, (dtype, ndim, shape x MAX_NDIM) x MAX_TENSORS]
# A reply with status != 0 carries one uint8 tensor: the error message.
_TENSOR_BLOCK = 8 + MAX_PARAMS
_SPEC_WORDS = 2 + MAX_NDIM
HEADER_BYTES = HEADER_WORDS * 8
INLINE_BYTES = 8192
FRAME_BYTES = HEADER_BYTES + INLINE_BYTES


def _encode(request_id: int, code: int, tensors: Sequence[torch.Tensor], params: Sequence[int] = ()) -> torch.Tensor:
    """The int64 header for a request (code = op id) or a reply (code = status)."""
    words = [0] * HEADER_WORDS  # built as a list: one tensor conversion instead of dozens
    words[:6] = [MAGIC, VERSION, request_id, code, len(tensors), len(params)]
    words[8 : 8 + len(params)] = [int(p) for p in params]
    for i, t in enumerate(tensors):
        base = _TENSOR_BLOCK + i * _SPEC_WORDS
        words[base : base + 2 + t.ndim] = [_CODE[t.dtype], t.ndim, *t.shape]
    return torch.tensor(words, dtype=torch.int64)


_TensorSpec = tuple[torch.dtype, tuple[int, ...]]


def _decode_specs(header: Sequence[int], count: int, max_bytes: int) -> list[_TensorSpec]:
    """Tensor (dtype, shape) pairs from a header (as a list); ``ValueError`` naming the first field out of range."""
    if not 0 <= count <= MAX_TENSORS:
        raise ValueError(f"tensor count {count} outside [0, {MAX_TENSORS}]")
    specs: list[_TensorSpec] = []
    total = 0
    for i in range(count):
        base = _TENSOR_BLOCK + i * _SPEC_WORDS
        code, ndim = header[base], header[base + 1]
        if not 0 <= code < len(DTYPES):
            raise ValueError(f"tensor {i}: dtype code {code} unknown")
        if not 0 <= ndim <= MAX_NDIM:
            raise ValueError(f"tensor {i}: ndim {ndim} outside [0, {MAX_NDIM}]")
        shape = tuple(header[base + 2 : base + 2 + ndim])
        if any(not 0 <= d <= MAX_DIM for d in shape):
            raise ValueError(f"tensor {i}: shape {shape} has a dimension outside [0, {MAX_DIM}]")
        total += math.prod(shape) * _ITEMSIZE[DTYPES[code]]
        if total > max_bytes:
            raise ValueError(f"tensors exceed the {max_bytes}-byte request limit")
        specs.append((DTYPES[code], shape))
    return specs


def _raw(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().cpu().reshape(-1).view(torch.uint8)


def _wait(work: Any, timeout: float | None) -> None:
    if timeout is None:
        work.wait()
    else:
        work.wait(timeout=datetime.timedelta(seconds=timeout))


def _send(header: torch.Tensor, tensors: Sequence[torch.Tensor], dst: int, group: Any, timeout: float | None) -> None:
    """One frame (header + payload when it fits), then any payload that did not fit."""
    parts = [_raw(t) for t in tensors]
    total = sum(p.numel() for p in parts)
    inline = total <= INLINE_BYTES
    header = header.clone()
    header[6] = int(inline)
    frame = torch.zeros(FRAME_BYTES, dtype=torch.uint8)
    frame[:HEADER_BYTES] = header.view(torch.uint8)
    if inline and total:
        frame[HEADER_BYTES : HEADER_BYTES + total] = torch.cat(parts)
    _wait(dist.isend(frame, dst, group=group), timeout)
    if not inline:
        for part in parts:
            if part.numel():
                _wait(dist.isend(part, dst, group=group), timeout)


def _recv_frame(src: int, group: Any, timeout: float | None) -> tuple[list[int], torch.Tensor]:
    """(header as a list of ints, the whole frame)."""
    frame = torch.empty(FRAME_BYTES, dtype=torch.uint8)
    _wait(dist.irecv(frame, src, group=group), timeout)
    return frame[:HEADER_BYTES].view(torch.int64).tolist(), frame


def _recv_payload(
    header: Sequence[int], frame: torch.Tensor, specs: list[_TensorSpec], src: int, group: Any, timeout: float | None
) -> list[torch.Tensor]:
    out, offset = [], HEADER_BYTES
    for dtype, shape in specs:
        t = torch.empty(shape, dtype=dtype)
        raw = t.reshape(-1).view(torch.uint8)
        if header[6]:  # inline in the frame
            raw.copy_(frame[offset : offset + raw.numel()])
            offset += raw.numel()
        elif raw.numel():
            _wait(dist.irecv(raw, src, group=group), timeout)
        out.append(t)
    return out


# ----------------------------------------------------------------------------- worker


def _groups(world_size: int) -> dict[int, Any]:
    """One process group per worker: {worker rank: group of (0, worker)}; every rank calls this."""
    timeout = datetime.timedelta(days=1)  # a worker may wait long for its next request
    return {w: dist.new_group([0, w], timeout=timeout) for w in range(1, world_size)}


def _capacity() -> tuple[int, float]:
    """(1 if CUDA else 0, relative capacity) that this worker announces."""
    if torch.cuda.is_available():
        return 1, float(torch.cuda.get_device_properties(0).multi_processor_count)
    return 0, float(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def serve(*, max_bytes: int = DEFAULT_MAX_BYTES, capacity: float | None = None) -> int:
    """Serve requests from rank 0 until it sends shutdown; returns the number of requests answered.

    Call in every rank >= 1 after ``torch.distributed`` is initialised (``clisonix-gpu worker``
    does both).
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    group = _groups(world)[rank]
    kind, cap = _capacity()
    _send(_encode(0, HELLO, (), (kind, int(1000 * (capacity or cap)))), (), 0, group, None)
    device = "cuda" if kind else "cpu"
    answered = 0
    while True:
        header, frame = _recv_frame(0, group, None)
        request_id = header[2]
        try:
            if header[0] != MAGIC or header[1] != VERSION:
                raise ValueError(f"bad magic/version {header[0]:#x}/{header[1]}, expected {MAGIC:#x}/{VERSION}")
            op_id = header[3]
            if op_id == SHUTDOWN:
                break
            op = OPS.get(op_id)
            if op is None:
                raise ValueError(f"op id {op_id} is not in the allowlist {sorted(OPS)}")
            count, n_params = header[4], header[5]
            if not op.n_tensors[0] <= count <= op.n_tensors[1] or n_params != len(op.params):
                raise ValueError(f"{op.name} takes {op.n_tensors} tensors and {len(op.params)} parameters; got {count} and {n_params}")
            specs = _decode_specs(header, count, max_bytes)
            if header[6] and sum(math.prod(sh) * _ITEMSIZE[dt] for dt, sh in specs) > INLINE_BYTES:
                raise ValueError(f"inline payload larger than the {INLINE_BYTES}-byte frame")
        except ValueError as exc:  # nothing follows a header we cannot trust
            _reply_error(request_id, 1, str(exc), group)
            continue
        try:
            tensors = [t.to(device) for t in _recv_payload(header, frame, specs, 0, group, None)]
        except RuntimeError as exc:  # a payload that does not match its header
            _reply_error(request_id, 1, f"payload: {exc}", group)
            continue
        params = {name: header[8 + i] for i, name in enumerate(op.params)}
        try:
            results = op.fn(*tensors, **params)
        except Exception as exc:  # the op's own typed errors, sent back by name and message
            _reply_error(request_id, 2, f"{type(exc).__name__}: {exc}", group)
            continue
        _send(_encode(request_id, 0, results), results, 0, group, None)
        answered += 1
    return answered


def _reply_error(request_id: int, status: int, message: str, group: Any) -> None:
    data = torch.tensor(list(message.encode()[:4096]), dtype=torch.uint8)
    _send(_encode(request_id, status, (data,)), (data,), 0, group, None)


# ----------------------------------------------------------------------------- edge


@dataclasses.dataclass
class _Worker:
    rank: int
    group: Any
    device: alda.Device
    alive: bool = True
    in_flight: int = 0
    answered: int = 0
    failures: int = 0
    last_error: str = ""
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)


class Mesh:
    """The edge's handle on the workers. Use :func:`connect` to make one; close it when done."""

    def __init__(self, workers: list[_Worker], *, timeout: float, fallback: str, processes: Sequence[subprocess.Popen[bytes]] = ()):
        if fallback not in ("local", "raise"):
            raise ValueError(f"fallback must be 'local' or 'raise'; got {fallback!r}")
        self._workers = workers
        self.timeout = timeout
        self.fallback = fallback
        self._processes = list(processes)
        self._next_id = 1
        self._id_lock = threading.Lock()
        self._local_runs = 0
        self._closed = False

    # -- public API

    def offload(self, op: str, *tensors: torch.Tensor, **params: Any) -> Any:
        """Run ``op`` (a name from :data:`OPS`) on a live worker; the result comes back on the
        device of the first tensor. Failover: a worker that dies or misses the deadline is marked
        down and the request goes to the next live one, then runs locally (``fallback="local"``)
        or raises :class:`MeshError` (``"raise"``). Errors of the op itself are raised as
        :class:`MeshError` with the worker's message."""
        results = self._run(op, tensors, params, preferred=None)
        return results[0] if len(results) == 1 else results

    def map(self, op: str, x: torch.Tensor, *args: torch.Tensor, **params: Any) -> Any:
        """``op(x, *args, **params)`` with ``x`` split on axis 0 across live workers by an ALDA
        plan weighted by their capacity; shards run concurrently and reassemble in order."""
        live = [w for w in self._workers if w.alive]
        if not live:
            return self._run_local(op, (x, *args), params)[0]
        schedule = alda.plan(len(x), [w.device for w in live])
        by_device = {w.device.name: w for w in live}
        shards = [s for s in schedule if s.size > 0] or [schedule[0]]
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(live)) as pool:
            futures = [pool.submit(self._run, op, (x[s.start : s.stop], *args), params, by_device[s.device.name]) for s in shards]
            parts = [f.result()[0] for f in futures]
        return torch.cat(parts, dim=0)

    def status(self) -> list[dict[str, Any]]:
        """One entry per worker: rank, device, alive, in flight, answered, failures, last error."""
        return [
            {"rank": w.rank, "device": w.device.name, "weight": w.device.weight, "alive": w.alive, "in_flight": w.in_flight,
             "answered": w.answered, "failures": w.failures, "last_error": w.last_error}
            for w in self._workers
        ] + [{"rank": 0, "device": "local", "answered": self._local_runs}]  # fmt: skip

    def close(self) -> None:
        """Tell live workers to stop, wait for processes this mesh started, leave torch.distributed."""
        if self._closed:
            return
        self._closed = True
        for w in self._workers:
            if w.alive:
                try:
                    with w.lock:
                        _send(_encode(0, SHUTDOWN, ()), (), w.rank, w.group, self.timeout)
                except Exception:
                    w.alive = False
        for p in self._processes:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        if dist.is_initialized():
            dist.destroy_process_group()

    def __enter__(self) -> Mesh:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals

    def _request_id(self) -> int:
        with self._id_lock:
            self._next_id += 1
            return self._next_id

    def _encode_request(self, op: str, tensors: Sequence[torch.Tensor], params: dict[str, Any]) -> tuple[int, list[int]]:
        if op not in _OP_IDS:
            raise ValueError(f"unknown op {op!r}; the mesh serves {sorted(_OP_IDS)}")
        spec = OPS[_OP_IDS[op]]
        values = {**dict(spec.defaults), **params}
        if op == "transform_matrix":
            activation = values.pop("activation", None)
            if activation not in ACTIVATIONS:
                raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
            values["activation"] = ACTIVATIONS.index(activation)
        if set(values) != set(spec.params):
            raise TypeError(f"{op} takes parameters {spec.params}; got {sorted(values)}")
        if not spec.n_tensors[0] <= len(tensors) <= spec.n_tensors[1]:
            raise TypeError(f"{op} takes {spec.n_tensors[0]}..{spec.n_tensors[1]} tensors; got {len(tensors)}")
        return _OP_IDS[op], [int(values[name]) for name in spec.params]

    def _run(self, op: str, tensors: Sequence[Any], params: dict[str, Any], preferred: _Worker | None) -> tuple[Any, ...]:
        tensors = tuple(t for t in tensors if t is not None)
        op_id, values = self._encode_request(op, tensors, params)
        home = tensors[0].device
        order = [w for w in self._workers if w.alive]
        if preferred is not None and preferred in order:
            order.remove(preferred)
            order.insert(0, preferred)
        elif order:  # spread single requests over the workers
            start = self._request_id() % len(order)
            order = order[start:] + order[:start]
        for worker in order:
            if not worker.alive:
                continue
            try:
                return tuple(t.to(home) for t in self._call(worker, op_id, tensors, values))
            except MeshError:
                raise
            except Exception as exc:  # dead, timed out or desynchronised: never use it again
                worker.alive = False
                worker.failures += 1
                worker.last_error = f"{type(exc).__name__}: {exc}"
        if self.fallback == "raise":
            raise MeshError(f"no live worker could run {op}; workers: {self.status()}")
        return self._run_local(op, tensors, params)

    def _run_local(self, op: str, tensors: Sequence[Any], params: dict[str, Any]) -> tuple[Any, ...]:
        op_id, values = self._encode_request(op, tensors, params)
        spec = OPS[op_id]
        self._local_runs += 1
        return tuple(spec.fn(*tensors, **dict(zip(spec.params, values))))

    def _call(self, worker: _Worker, op_id: int, tensors: Sequence[torch.Tensor], values: list[int]) -> list[torch.Tensor]:
        request_id = self._request_id()
        with worker.lock:  # one conversation at a time per worker: callers queue here
            worker.in_flight += 1
            try:
                group, rank = worker.group, worker.rank
                # every send and receive has the deadline: a stalled worker cannot block the edge
                _send(_encode(request_id, op_id, tensors, values), tensors, rank, group, self.timeout)
                header, frame = _recv_frame(rank, group, self.timeout)
                if header[0] != MAGIC or header[2] != request_id:
                    raise ConnectionError(f"reply out of step (request {request_id}, got {header[2]})")
                specs = _decode_specs(header, header[4], DEFAULT_MAX_BYTES * 4)
                results = _recv_payload(header, frame, specs, rank, group, self.timeout)
                worker.answered += 1
                if header[3] != 0:
                    raise MeshError(f"worker {rank}: {bytes(results[0].tolist()).decode(errors='replace')}")
                return results
            finally:
                worker.in_flight -= 1


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def connect(
    workers: int | None = None, *, master_addr: str = "127.0.0.1", master_port: int | None = None, timeout: float = 30.0,
    fallback: str = "local", backend: str = "gloo",
) -> Mesh:  # fmt: skip
    """Join (or start) a mesh as the edge, rank 0.

    ``workers=n`` starts n local worker processes (``clisonix-gpu worker``) on 127.0.0.1. Without
    it, the ranks come from the environment that ``torchrun`` sets (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT``); run ``clisonix-gpu worker`` on the other ranks. ``timeout``
    is the per-request deadline in seconds; ``fallback`` is "local" or "raise".
    """
    processes = []
    if workers is not None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1; got {workers}")
        port = master_port or _free_port()
        env = dict(os.environ, MASTER_ADDR=master_addr, MASTER_PORT=str(port), WORLD_SIZE=str(workers + 1))
        if master_addr == "127.0.0.1":
            env.setdefault("GLOO_SOCKET_IFNAME", "lo")
        for rank in range(1, workers + 1):
            processes.append(subprocess.Popen([sys.executable, "-m", "clisonix_gpu.cli", "worker"], env=dict(env, RANK=str(rank))))
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(port), WORLD_SIZE=str(workers + 1), RANK="0")
        if master_addr == "127.0.0.1":
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if int(os.environ.get("RANK", "0")) != 0:
        raise RuntimeError("connect() is for rank 0 (the edge); other ranks run clisonix-gpu worker")
    try:
        dist.init_process_group(backend, rank=0, world_size=world, timeout=datetime.timedelta(seconds=max(timeout, 60)))
        groups = _groups(world)
        members = []
        for rank, group in groups.items():
            hello, _ = _recv_frame(rank, group, max(timeout, 60))
            kind = "cuda" if hello[8] else "cpu"
            members.append(_Worker(rank, group, alda.Device(kind, rank, max(hello[9] / 1000, 1e-3))))
    except Exception:
        for p in processes:
            p.kill()
        raise
    return Mesh(members, timeout=timeout, fallback=fallback, processes=processes)


def worker_main() -> int:
    """Entry of ``clisonix-gpu worker``: join the mesh from the torchrun-style environment and serve."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if rank == 0:
        raise SystemExit("clisonix-gpu worker runs on ranks >= 1; rank 0 is the edge (mesh.connect)")
    if os.environ.get("MASTER_ADDR", "127.0.0.1") == "127.0.0.1":
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(days=1))
    try:
        serve()
    finally:
        dist.destroy_process_group()
    return 0
