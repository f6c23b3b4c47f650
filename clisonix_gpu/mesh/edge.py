"""The edge (rank 0): sends requests to workers, spreads them, watches the workers' health.

A caller waiting for a reply receives the worker's messages itself while no other caller does
(one reader per worker at a time): a reply for another caller is handed to it, and the reader's
own reply ends its turn, which passes to a caller still waiting. The usual round trip, one
request at a time, so costs no handoff between threads. A worker is in one of three states:

* ``up``: it gets requests. The least busy live worker takes a request (ties rotate).
* ``stalled``: it missed a deadline. A deadline measures the worker: a request's clock starts
  when it is sent or when the worker last answered anything, whichever is later, so time a request
  spends queued behind others (at the edge or at the worker) does not count. The edge ends the
  connection of a stalled worker (which also ends a reader's wait; its late replies never come)
  and offers it the connection's next generation; a worker that was only slow, or stopped, takes
  it, greets the edge anew and is re-admitted.
* ``dead``: its connection ended without the edge's doing, or its process is gone (checked every
  ``HEALTH_INTERVAL`` seconds where the edge can see the process). It is never used again.

A request belongs to the connection it went out on. Requests of a worker that leaves ``up``, or
whose connection ends, go to the next live worker (not to the same worker on its next connection:
nothing there knows them), then run locally (``fallback="local"``, under the same deadline) or
raise :class:`MeshError`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import os
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from .. import alda
from ..ops.utils import cdiv
from . import allowlist, wire
from .transport import REJOIN_ATTEMPT, Inbox, Outbox, end_connection, generation_group, generation_key
from .worker import process_namespace

UP, STALLED, DEAD = "up", "stalled", "dead"
HEALTH_INTERVAL = 0.1  # seconds between checks of the workers' processes and of readers' deadlines
_REPLY_LIMIT = 1 << 40  # replies come from the mesh's own workers; the bound only rejects garbage


class MeshError(RuntimeError):
    """A request failed on a worker (message from the worker), no worker could answer it, or the
    mesh is closed.

    Example:

    >>> from clisonix_gpu import mesh
    >>> codes = torch.full((3, 4), 0b1011, dtype=torch.uint8)
    >>> with mesh.connect(workers=1, timeout=30) as m:
    ...     try:
    ...         m.offload("hamming_topk", codes, codes, k=9)  # k above len(db): the op's own ValueError
    ...     except mesh.MeshError as exc:
    ...         print(exc)  # doctest: +ELLIPSIS
    worker 1: ValueError: ...
    """


MeshError.__module__ = "clisonix_gpu.mesh"  # where users import it from (tracebacks show this)


class _WorkerGone(Exception):
    """A worker left ``up`` while a request waited for it (its state says why)."""


@dataclasses.dataclass(eq=False)
class WorkerLink:
    """The edge's state for one worker. ``lock`` guards every field from ``state`` on; ``cond``
    (over ``lock``) is what callers wait on."""

    rank: int
    group: Any
    device: alda.Device
    host: str
    pid: int
    namespace: str  # the worker's pid space (see worker.process_namespace)
    inbox: Inbox
    outbox: Outbox
    process: subprocess.Popen[bytes] | None = None  # when the edge started it
    send_lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    cond: threading.Condition = dataclasses.field(init=False)  # over ``lock``: hot paths take the lock itself (no Python frames)
    state: str = UP
    in_flight: int = 0  # at most Mesh.max_in_flight: callers beyond wait for a slot (back-pressure)
    peak_in_flight: int = 0
    answered: int = 0
    failures: int = 0  # times it left ``up``
    readmissions: int = 0
    late_replies: int = 0  # replies that came after their request was given up: dropped
    last_error: str = ""
    progress_at: float = 0.0  # when a message from it last arrived
    generation: int = 0  # of its connection: a new one after each deadline the worker missed
    reader: int | None = None  # the request whose caller receives its messages now (see the module's docstring)
    awaited: dict[int, float] = dataclasses.field(default_factory=dict)  # request ids whose callers wait: when each was sent
    replies: dict[int, tuple[int, list[torch.Tensor]]] = dataclasses.field(default_factory=dict)
    assembly: wire.Assembly | None = None  # a reply whose chunks are arriving (its reader only)

    def __post_init__(self) -> None:
        self.cond = threading.Condition(self.lock)

    @property
    def alive(self) -> bool:
        return self.state == UP


class Mesh:
    """The edge's handle on the workers. Use :func:`connect` to make one; close it when done.

    Example:

    >>> from clisonix_gpu import mesh
    >>> m = mesh.connect(workers=1, timeout=30)
    >>> futures = [m.submit("identity", torch.full((3,), float(i))) for i in range(4)]  # pipelined
    >>> [f.result()[0].item() for f in futures]
    [0.0, 1.0, 2.0, 3.0]
    >>> m.offload("transform_matrix", torch.ones(2, 3), torch.ones(4, 5))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    clisonix_gpu.mesh.MeshError: worker 1: ShapeError: ...
    >>> [(s["rank"], s["state"], s["answered"]) for s in m.status()]
    [(1, 'up', 5), (0, 'up', 0)]
    >>> m.close()
    >>> m.offload("identity", torch.ones(2))
    Traceback (most recent call last):
    ...
    clisonix_gpu.mesh.MeshError: the mesh is closed
    """

    def __init__(self, workers: list[WorkerLink], *, timeout: float, fallback: str, max_in_flight: int = 4):
        if fallback not in ("local", "raise"):
            raise ValueError(f"fallback must be 'local' or 'raise'; got {fallback!r}")
        self._workers = workers
        self.timeout = timeout
        self.fallback = fallback
        self.max_in_flight = max_in_flight
        self._processes = [w.process for w in workers if w.process is not None]
        self._ids = itertools.count(2)  # next() on a count is atomic under the GIL: no lock per request
        self._turn = itertools.count()  # rotates ties between equally busy workers
        self._encoded: dict[tuple[Any, ...], tuple[int, list[int]]] = {}
        self._local_lock = threading.Lock()
        self._local_runs = 0
        self._closed = False
        self._namespace = process_namespace()
        self._stop = threading.Event()
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=max(2, max_in_flight * max(len(workers), 1)), thread_name_prefix="mesh")
        now = time.monotonic()
        for w in workers:
            w.progress_at = now
        self._watcher = threading.Thread(target=self._watch, name="mesh-health", daemon=True)
        self._watcher.start()

    # -- public API

    def offload(self, op: str, *tensors: torch.Tensor, **params: Any) -> Any:
        """Run ``op`` (a name from :data:`OPS`) on a live worker; the result comes back on the
        device of the first tensor. Failover: a worker that dies or misses the deadline leaves
        the rotation and the request goes to the next live one, then runs locally
        (``fallback="local"``, with the same deadline) or raises :class:`MeshError` (``"raise"``).
        Errors of the op itself are raised as :class:`MeshError` with the worker's message; a bad
        op name or parameters raise ``ValueError``/``TypeError`` before anything is sent; a closed
        mesh raises :class:`MeshError`."""
        results = self._run(op, tensors, params, preferred=None)
        return results[0] if len(results) == 1 else results

    def submit(self, op: str, *tensors: torch.Tensor, **params: Any) -> concurrent.futures.Future[Any]:
        """:meth:`offload` without waiting: a future of its result. Up to ``max_in_flight``
        requests per worker are on the wire at once; more wait their turn (back-pressure).
        A bad op name or parameters, or a closed mesh, raise here, before anything is queued."""
        self._check_open()
        self._encode_request(op, tuple(t for t in tensors if t is not None), params)
        return self._executor.submit(self.offload, op, *tensors, **params)

    def map(self, op: str, x: torch.Tensor, *args: torch.Tensor, **params: Any) -> Any:
        """``op(x, *args, **params)`` with ``x`` split on axis 0 across live workers by an ALDA
        plan weighted by their capacity; each worker's share goes as up to ``max_in_flight``
        pipelined requests, and the pieces reassemble in order."""
        self._check_open()
        live = [w for w in self._workers if w.state == UP]
        if not live:
            return self._run_local(op, (x, *args), params)[0]
        args = tuple(a for a in args if a is not None)
        self._encode_request(op, (x, *args), params)
        schedule = alda.plan(len(x), [w.device for w in live])
        by_device = {w.device.name: w for w in live}
        pieces = []
        for shard in schedule:
            step = max(1, cdiv(shard.size, self.max_in_flight), 256)
            pieces += [(start, min(start + step, shard.stop), by_device[shard.device.name]) for start in range(shard.start, shard.stop, step)]
        pieces = pieces or [(0, 0, live[0])]
        futures = [self._executor.submit(self._run, op, (x[a:b], *args), params, worker) for a, b, worker in pieces]
        return torch.cat([f.result()[0] for f in futures], dim=0)

    def status(self) -> list[dict[str, Any]]:
        """One entry per worker: rank, host and pid (find the process behind a row), device,
        weight, state (``up``, ``stalled`` or ``dead``), alive (state is up), requests in flight
        now and at most, answered, failures, readmissions, late replies dropped, last error; then
        rank 0 itself, whose ``answered`` counts the requests it ran locally."""
        return [
            {"rank": w.rank, "host": w.host, "pid": w.pid, "device": w.device.name, "weight": w.device.weight, "state": w.state,
             "alive": w.state == UP, "in_flight": w.in_flight, "peak_in_flight": w.peak_in_flight, "answered": w.answered,
             "failures": w.failures, "readmissions": w.readmissions, "late_replies": w.late_replies, "last_error": w.last_error}
            for w in self._workers
        ] + [{"rank": 0, "host": socket.gethostname(), "pid": os.getpid(), "device": "local", "state": UP, "alive": True,
              "answered": self._local_runs}]  # fmt: skip

    def close(self) -> None:
        """Tell workers to stop, wait for processes this mesh started, leave torch.distributed.
        Later calls of :meth:`offload`, :meth:`submit` and :meth:`map` raise :class:`MeshError`."""
        if self._closed:
            return
        self._closed = True
        self._executor.shutdown(wait=True)
        self._stop.set()
        self._watcher.join()
        told = set()
        for w in self._workers:
            if w.state == DEAD:
                continue
            until = time.monotonic() + min(self.timeout, 5.0)
            give_up = lambda: TimeoutError("shutdown not delivered") if time.monotonic() > until else None
            try:
                if w.send_lock.acquire(timeout=max(until - time.monotonic(), 0)):
                    try:
                        w.outbox.send(wire.header(0, wire.SHUTDOWN, ()), wire.Payload([]), give_up)
                        w.outbox.flush(give_up)
                    finally:
                        w.send_lock.release()
                    if w.state == UP:
                        told.add(w.rank)
            except Exception:
                pass
        for w in self._workers:
            if w.process is not None:
                try:
                    w.process.wait(timeout=30 if w.rank in told else 0.1)  # a stalled worker may never read the shutdown
                except subprocess.TimeoutExpired:
                    w.process.kill()
                    w.process.wait()
        for w in self._workers:
            w.outbox.close()
        if dist.is_initialized():
            dist.destroy_process_group()

    def __enter__(self) -> Mesh:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- requests

    def _check_open(self) -> None:
        if self._closed:
            raise MeshError("the mesh is closed")

    def _encode_request(self, op: str, tensors: Sequence[torch.Tensor], params: dict[str, Any]) -> tuple[int, list[int]]:
        """(op id, parameter values) of a request, checked by the allowlist. A service repeats a
        few signatures: those that passed once are looked up."""
        try:
            key = (op, *[(name, type(v), v) for name, v in params.items()], *[(type(t), t.dtype, t.ndim) for t in tensors])
            found = self._encoded.get(key)
        except (AttributeError, TypeError):  # not tensors, or parameters that cannot be a key
            key, found = None, None
        if found is None:
            found = allowlist.encode_request(op, tensors, params)
            if key is not None:
                if len(self._encoded) >= 1024:
                    self._encoded.clear()
                self._encoded[key] = found
        return found

    def _pick(self, preferred: WorkerLink | None, tried: set[int]) -> WorkerLink | None:
        """The worker for the next try: ``preferred`` while it is up, else the least busy live
        worker not tried yet (ties rotate, so single requests spread evenly)."""
        if len(self._workers) == 1:  # no choice to make
            only = self._workers[0]
            return only if only.state == UP and only.rank not in tried else None
        live = [w for w in self._workers if w.state == UP and w.rank not in tried]
        if not live:
            return None
        if preferred is not None and preferred in live:
            return preferred
        turn = next(self._turn) % len(live)
        order = live[turn:] + live[:turn]
        return min(order, key=lambda w: w.in_flight)  # min keeps the first of equals

    def _run(self, op: str, tensors: Sequence[Any], params: dict[str, Any], preferred: WorkerLink | None) -> tuple[Any, ...]:
        self._check_open()
        tensors = tuple(t for t in tensors if t is not None)
        op_id, values = self._encode_request(op, tensors, params)
        on_cpu = tensors[0].is_cpu
        payload = wire.Payload.of(tensors)  # once, before any worker is tried: a failure here is the caller's
        words = wire.header(0, op_id, tensors, values)  # each try sets its own request id
        tried: set[int] = set()
        while (worker := self._pick(preferred, tried)) is not None:
            tried.add(worker.rank)
            generation = worker.generation
            try:
                results = self._call(worker, generation, words, payload)
            except _WorkerGone:  # its state says why; the next worker tries
                continue
            except MeshError:  # the op's own error, from a worker that is fine
                raise
            except Exception as exc:  # the connection failed under a send
                self._connection_lost(worker, generation, exc)
                continue
            return tuple(results) if on_cpu else tuple(t.to(tensors[0].device) for t in results)
        self._check_open()
        if self.fallback == "raise":
            raise MeshError(f"no live worker could run {op}; workers: {self.status()}")
        return self._run_local(op, tensors, params)

    def _run_local(self, op: str, tensors: Sequence[Any], params: dict[str, Any]) -> tuple[Any, ...]:
        """Run the op here, under the mesh's deadline: past it, ``MeshError`` (the computation
        cannot be interrupted and finishes in the background)."""
        op_id, values = self._encode_request(op, tensors, params)
        spec = allowlist.OPS[op_id]
        outcome: dict[str, Any] = {}

        def compute() -> None:
            try:
                outcome["result"] = tuple(spec.fn(*tensors, **dict(zip(spec.param_names, values))))
            except BaseException as exc:  # handed to the caller below
                outcome["error"] = exc

        thread = threading.Thread(target=compute, name="mesh-local", daemon=True)
        thread.start()
        thread.join(self.timeout)
        if thread.is_alive():
            raise MeshError(f"{op} ran locally (no live worker) past the {self.timeout} s deadline")
        if "error" in outcome:
            raise outcome["error"]
        with self._local_lock:
            self._local_runs += 1
        # results of their own, as a worker's reply gives: never an input handed back (identity)
        result: tuple[Any, ...] = tuple(r.clone() if any(r is t for t in tensors) else r for r in outcome["result"])
        return result

    def _call(self, worker: WorkerLink, generation: int, words: list[int], payload: wire.Payload) -> list[torch.Tensor]:
        """The reply to one request on ``worker``'s connection of ``generation``: the request goes
        out on that connection and is answered on it, or not at all (``_WorkerGone`` once it ends,
        even if the worker is back on a later one: nothing there knows the request)."""
        request_id = words[wire.REQUEST_ID_AT] = next(self._ids)
        lock, cond = worker.lock, worker.cond
        with lock:
            while worker.state == UP and worker.generation == generation and worker.in_flight >= self.max_in_flight:
                cond.wait()  # back-pressure: the edge's own queue, not the worker's time (no deadline)
            if worker.state != UP or worker.generation != generation:
                raise _WorkerGone
            outbox = worker.outbox
            worker.in_flight += 1
            worker.peak_in_flight = max(worker.peak_in_flight, worker.in_flight)
            sent_at = time.monotonic()
            worker.awaited[request_id] = sent_at  # before the send: the reply may come at once
        try:
            self._send(worker, generation, outbox, words, payload, sent_at)
            status, results = self._await_reply(worker, generation, request_id, sent_at)
        except BaseException:
            with lock:
                self._free_slot_locked(worker, request_id)
            raise
        if status != wire.STATUS_OK:
            raise MeshError(f"worker {worker.rank}: {bytes(results[0].tolist()).decode(errors='replace')}")
        return results

    def _await_reply(self, worker: WorkerLink, generation: int, request_id: int, sent_at: float) -> tuple[int, list[torch.Tensor]]:
        """(status, tensors) of the reply to ``request_id``, sent at ``sent_at`` on the connection
        of ``generation``; frees its slot. Receives the worker's messages while no other caller
        does (see the module's docstring); ``_WorkerGone`` once the worker leaves ``up`` or that
        connection ends, or the request misses its deadline."""
        lock, cond = worker.lock, worker.cond
        with lock:
            while True:
                if request_id in worker.replies:
                    return self._take_reply_locked(worker, request_id)
                if worker.state != UP or worker.generation != generation:
                    raise _WorkerGone
                left = self._time_left(worker, sent_at)
                if left <= 0:
                    self._stall_locked(worker, f"no reply to request {request_id} within {self.timeout} s of work")
                    raise _WorkerGone
                if worker.reader is None:
                    worker.reader = request_id  # this caller's turn (see the module's docstring)
                    inbox, outbox = worker.inbox, worker.outbox  # of this generation: a later connection is not this turn's
                    break
                cond.wait(left)
        try:
            while True:
                # The inbox is this caller's alone until its turn ends; a message's tensors are
                # copies, and its buffer is posted again at the next receive, off this path. The
                # wait ends at the deadline whatever becomes of the connection: a receive that
                # Gloo neither completes nor fails (seen under load, with a worker killed
                # mid-transfer) cannot hold a caller past it.
                reply = self._receive_one(worker, inbox, self._time_left(worker, sent_at))
                with lock:
                    worker.progress_at = time.monotonic()
                    if reply is None:  # a chunk of a longer reply
                        continue
                    replied, answer = reply
                    if replied in worker.awaited:
                        worker.replies[replied] = answer
                    else:
                        worker.late_replies += 1
                    mine = replied == request_id
                    if mine:
                        worker.reader = None
                        taken = self._take_reply_locked(worker, request_id)  # notifies: a waiting caller reads next
                    else:
                        cond.notify_all()
                outbox.acknowledge(replied)  # the request reached the worker: its send buffer is free
                if mine:
                    return taken
        except Exception as exc:
            with lock:
                if self._time_left(worker, sent_at) <= 0 and worker.generation == generation:  # the wait's own deadline
                    self._stall_locked(worker, f"no reply to request {request_id} within {self.timeout} s of work")
            self._connection_lost(worker, generation, exc)
            raise _WorkerGone from exc
        finally:
            if worker.reader == request_id:  # still this caller's turn (only its holder ends a turn)
                with lock:
                    worker.reader = None
                    cond.notify_all()

    def _time_left(self, worker: WorkerLink, sent_at: float) -> float:
        """Seconds until a request sent at ``sent_at`` misses its deadline: its clock starts when
        it is sent or when the worker last answered anything, whichever is later."""
        return max(worker.progress_at, sent_at) + self.timeout - time.monotonic()

    def _take_reply_locked(self, worker: WorkerLink, request_id: int) -> tuple[int, list[torch.Tensor]]:
        status, results = worker.replies.pop(request_id)
        worker.answered += 1
        self._free_slot_locked(worker, request_id)  # in the same hold of the lock as the reply
        return status, results

    @staticmethod
    def _free_slot_locked(worker: WorkerLink, request_id: int) -> None:
        """Holding ``worker.lock``: request ``request_id`` no longer occupies a slot or waits for a
        reply (a late one is dropped). Idempotent."""
        if worker.awaited.pop(request_id, None) is not None:
            worker.in_flight -= 1
        worker.replies.pop(request_id, None)
        worker.cond.notify_all()

    def _send(self, worker: WorkerLink, generation: int, outbox: Outbox, words: list[int], payload: wire.Payload, sent_at: float) -> None:
        """Send through ``outbox``, of ``worker``'s connection of ``generation``, under the worker's
        deadline: waits for the send lock or a buffer end when the worker leaves ``up``, that
        connection ends, or the worker makes no progress for ``timeout`` seconds."""

        def give_up() -> BaseException | None:
            if worker.state != UP or worker.generation != generation:
                return _WorkerGone()
            if self._time_left(worker, sent_at) < 0:
                with worker.lock:
                    if worker.generation == generation:  # not a later connection, which this send never used
                        self._stall_locked(worker, f"a send to it made no progress within {self.timeout} s")
                return _WorkerGone()
            return None

        while not worker.send_lock.acquire(timeout=0.05):
            reason = give_up()
            if reason is not None:
                raise reason
        try:
            outbox.send(words, payload, give_up)
        finally:
            worker.send_lock.release()

    def _connection_lost(self, worker: WorkerLink, generation: int, exc: Exception) -> None:
        """The connection of ``generation`` failed under a send or a receive: the worker is dead,
        unless the edge ended that connection itself (the worker is then stalled, or back)."""
        with worker.lock:
            if worker.generation == generation and worker.state == UP:
                reason = "the mesh is closed" if self._closed else f"connection lost: {type(exc).__name__}: {exc}"
                self._set_state_locked(worker, DEAD, reason)

    @staticmethod
    def _set_state_locked(worker: WorkerLink, state: str, reason: str) -> None:
        """Move a worker down (``stalled`` or ``dead``; dead is final); callers waiting on it fail over."""
        if worker.state == DEAD or worker.state == state:
            return
        if worker.state == UP:
            worker.failures += 1
        worker.state = state
        worker.last_error = reason
        worker.cond.notify_all()

    def _stall_locked(self, worker: WorkerLink, reason: str) -> None:
        """Holding ``worker.lock``: a worker that is up missed a deadline. It is stalled; its
        connection ends and the next generation is offered to it (:meth:`_reconnect`)."""
        if worker.state != UP:
            return
        self._set_state_locked(worker, STALLED, reason)
        threading.Thread(target=self._reconnect, args=(worker, worker.generation), name=f"mesh-reconnect-{worker.rank}", daemon=True).start()

    def _reconnect(self, worker: WorkerLink, generation: int) -> None:
        """End ``worker``'s connection of ``generation``, then offer it the next ones until it
        takes one and greets (it is ``up`` again), it is dead, or the mesh closes."""
        end_connection(worker.group)
        worker.outbox.close()
        store = dist.distributed_c10d._get_default_store()
        while not self._closed and worker.state != DEAD:
            generation += 1
            try:
                store.set(generation_key(worker.rank), str(generation))
                group = generation_group(store, worker.rank, generation, edge=True, timeout=REJOIN_ATTEMPT)
                inbox = Inbox(worker.rank, group)
                words, _ = inbox.receive()
            except RuntimeError:  # the worker did not come (yet), or the store is gone with the mesh
                time.sleep(0.05)
                continue
            if words[: wire.VERSION_AT + 1] != [wire.MAGIC, wire.VERSION] or words[wire.CODE_AT] != wire.HELLO:
                end_connection(group)
                continue
            outbox = Outbox(worker.rank, group, deadlines=True)
            with worker.lock:
                if self._closed or worker.state == DEAD:
                    break
                worker.group, worker.inbox, worker.outbox = group, inbox, outbox
                worker.generation, worker.assembly = generation, None
                worker.progress_at = time.monotonic()
                worker.state = UP
                worker.readmissions += 1
                worker.cond.notify_all()
            return

    # -- the health watcher

    @staticmethod
    def _receive_one(worker: WorkerLink, inbox: Inbox, timeout: float) -> tuple[int, tuple[int, list[torch.Tensor]]] | None:
        """Read one message of ``worker`` within ``timeout`` seconds: ``(request id, (status,
        tensors))`` when it completes a reply, else None; ``ConnectionError`` when the worker is
        out of step, torch.distributed's error when the connection ends or the time passes."""
        words, body = inbox.receive(timeout)
        if words[wire.MAGIC_AT] != wire.MAGIC or words[wire.VERSION_AT] != wire.VERSION or body is None:
            raise ConnectionError(f"malformed reply from worker {worker.rank}")
        try:
            if words[wire.CHUNK_AT] == 0 and worker.assembly is None:
                specs, total = wire.decode_specs(words, _REPLY_LIMIT)
                if total <= wire.CHUNK_BYTES:  # the usual reply: one message
                    if words[wire.CHUNK_SIZE_AT] != total:
                        raise ValueError(f"reply {words[wire.REQUEST_ID_AT]} has {words[wire.CHUNK_SIZE_AT]} bytes where {total} were due")
                    return words[wire.REQUEST_ID_AT], (words[wire.CODE_AT], wire.unpack(body, specs, copy=True))
                worker.assembly = wire.Assembly(words, specs)
            elif worker.assembly is None or words[wire.REQUEST_ID_AT] != worker.assembly.request_id:
                raise ValueError(f"chunk {words[wire.CHUNK_AT]} of reply {words[wire.REQUEST_ID_AT]} out of order")
            worker.assembly.add(words, body)
        except ValueError as exc:
            raise ConnectionError(f"worker {worker.rank} is out of step: {exc}") from exc
        done = worker.assembly
        if not done.complete:
            return None
        worker.assembly = None
        return done.request_id, (done.first[wire.CODE_AT], done.tensors)

    def _watch(self) -> None:
        """Every HEALTH_INTERVAL: a worker whose process is gone is dead; one whose reader still
        waits past the earliest deadline of the requests awaiting replies is stalled (the reader's
        own wait ends at its own request's deadline)."""
        while not self._stop.wait(HEALTH_INTERVAL):
            for w in self._workers:
                if w.state == DEAD:
                    continue
                gone = self._process_gone(w)
                with w.lock:
                    if gone:
                        self._set_state_locked(w, DEAD, gone)
                    elif w.state == UP and w.reader is not None and w.awaited:
                        if self._time_left(w, min(w.awaited.values())) < 0:
                            self._stall_locked(w, f"no reply within {self.timeout} s of work")

    def _process_gone(self, worker: WorkerLink) -> str | None:
        """Why the worker's process no longer runs, where this process can see it; else None."""
        if worker.process is not None:
            code = worker.process.poll()
            return None if code is None else f"process {worker.pid} exited with code {code}"
        if not worker.namespace or worker.namespace != self._namespace:
            return None  # another host or container: its connection tells
        try:
            with open(f"/proc/{worker.pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return f"process {worker.pid} is gone"
        return f"process {worker.pid} is a zombie" if state == "Z" else None
