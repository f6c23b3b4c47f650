"""Moving messages between two ranks with torch.distributed point-to-point calls.

Each worker talks to the edge through a process group of its own, so one worker's failure cannot
poison the others. Every peer keeps receives posted ahead of time into buffers that fit any
message, so a sender never waits for the receiver to post.

A Gloo send or receive shows as complete only to a wait (``is_completed`` stays False until
then), and a Gloo wait that times out closes the group's connection for good. So no wait here
has a timeout of its own: receives block until a message or the connection's end, the edge's
sends are waited for by a thread of their own while a sender that needs a buffer waits on a
condition with its deadline, and the edge enforces a reply's deadline by ending the connection
on purpose (:func:`end_connection`). Both sides then meet again in a fresh group, the connection's
next generation (:func:`generation_group`).
"""

from __future__ import annotations

import datetime
import os
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from . import wire

POSTED_RECEIVES = 2  # per peer, kept posted ahead of the messages they will hold
# Completed sends and receives kept referenced, the oldest dropped as each completes. Gloo wakes
# a waiter before its own thread lets go of the operation's buffer, and a buffer destroyed before
# then spins on sched_yield until it is let go: dropping each operation right after its wait put
# about a third of the edge's and the worker's CPU time of a 4 KiB round trip into that spin.
RETIRED_WORKS = 4
MESSAGE_BYTES = wire.message_bytes()
# A worker may wait long for its next request, and an edge's reader for a reply: receives block
# under this timeout, which no live mesh reaches (deadlines are the edge's, see edge.py).
GROUP_TIMEOUT = datetime.timedelta(days=7)

GiveUp = Callable[[], "BaseException | None"]  # an exception to raise when a wait should end, else None


REJOIN_ATTEMPT = datetime.timedelta(seconds=60)  # one try of either side to meet in a new generation
# A receive on this tag never completes (no message uses it): its short wait ends a connection.
_END_TAG = 2**31 - 1


def groups(world_size: int) -> dict[int, Any]:
    """One process group per worker: {worker rank: group of (0, worker)}; every rank calls this.
    In every group of the mesh the edge is rank 0 and the worker rank 1 (see :func:`_peer_of`)."""
    return {w: dist.new_group([0, w], timeout=GROUP_TIMEOUT) for w in range(1, world_size)}


def generation_key(worker_rank: int) -> str:
    """The store key holding the generation of ``worker_rank``'s connection that the edge awaits."""
    return f"clisonix-mesh/{worker_rank}/generation"


def generation_group(store: Any, worker_rank: int, generation: int, *, edge: bool, timeout: datetime.timedelta) -> Any:
    """A fresh Gloo group of two, the edge and ``worker_rank``, for ``generation`` (>= 1) of their
    connection: both call this with the same arguments but ``edge``; it returns once both are
    connected, or raises torch.distributed's error after ``timeout``."""
    options = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]
    options._timeout = timeout
    interface = os.environ.get("GLOO_SOCKET_IFNAME")
    device = dist.ProcessGroupGloo.create_device(interface=interface) if interface else dist.ProcessGroupGloo.create_default_device()
    options._devices = [device]
    prefixed = dist.PrefixStore(f"clisonix-mesh/{worker_rank}/{generation}/", store)  # type: ignore[attr-defined]
    return dist.ProcessGroupGloo(prefixed, 0 if edge else 1, 2, options)


def end_connection(group: Any) -> None:
    """End the edge's connection to the worker of ``group`` now: every wait on it, here and at the
    worker, ends with torch.distributed's error. A Gloo wait that times out does this (the only
    way Gloo offers), so this times out a receive that no message will ever complete."""
    try:
        _endpoint(group).recv([torch.empty(1, dtype=torch.uint8)], 1, _END_TAG).wait(datetime.timedelta(milliseconds=1))
    except RuntimeError:
        pass


def _endpoint(group: Any) -> Any:
    """What sends and receives for ``group``: its Gloo backend where torch exposes it, which
    skips the operator dispatcher that the process group's own calls go through (a few
    microseconds per message, on every request's path); else the group itself."""
    get_backend = getattr(group, "_get_backend", None)
    if get_backend is not None:
        try:
            backend = get_backend(torch.device("cpu"))
        except (RuntimeError, ValueError):
            return group
        if callable(getattr(backend, "send", None)) and callable(getattr(backend, "recv", None)):
            return backend
    return group


def _complete(work: Any, retired: deque[Any], timeout: float | None = None) -> None:
    """Wait for a send or receive, at most ``timeout`` seconds (past it, torch.distributed's error,
    and the connection ends); it then stays referenced a while (see ``RETIRED_WORKS``)."""
    if timeout is None:
        work.wait()
    else:
        work.wait(datetime.timedelta(seconds=max(timeout, 0.001)))
    retired.append(work)


def _peer_of(group: Any, rank: int) -> int:
    """``rank``'s rank inside ``group``, a group of the mesh (the edge is 0, the worker 1):
    messages go through the group's own send/recv (see :func:`_endpoint`), not ``dist.send``,
    whose per-call checks cost as much as the transfer of a small message."""
    return 0 if rank == 0 else 1


class Outbox:
    """Messages to one peer, built in ``POSTED_RECEIVES`` reusable buffers. ``send`` returns once
    the last message is on its way; a buffer is waited for only when it is needed again, so a
    request or reply costs no wait of its own.

    With ``deadlines=True`` (the edge), nothing here waits without a deadline. A Gloo send is
    known complete only to a wait, and a wait cannot end early, so a buffer is reused without one
    only when the peer has proven the send delivered: a reply to a request proves that the
    request's first message, and every message before it, reached the worker
    (:meth:`acknowledge`; messages arrive in order). Otherwise, a sender that needs a buffer asks
    the outbox's thread to wait for the oldest send and waits itself for a buffer with
    ``give_up`` in charge. The thread sleeps while no sender waits, so the usual round trip (one
    request at a time, or a few pipelined ones) wakes it never. Without ``deadlines`` (a worker)
    the sender itself waits, without a deadline.
    """

    def __init__(self, dst: int, group: Any, *, deadlines: bool = False):
        self._group, self._peer = _endpoint(group), _peer_of(group, dst)
        self._buffers = [wire.MessageBuffer(np.empty(MESSAGE_BYTES, dtype=np.uint8)) for _ in range(POSTED_RECEIVES)]
        self._free = deque(range(POSTED_RECEIVES))
        # sends not known to be complete, oldest first: (buffer, message number, request id, chunk, work)
        self._sending: deque[tuple[int, int, int, int, Any]] = deque()
        self._numbered = 0  # messages sent so far: a message's number is its position
        self._delivered = 0  # messages numbered up to this one are known to have reached the peer
        self._spans: dict[tuple[int, int], torch.Tensor] = {}  # message tensors by (buffer, length)
        self._lock = threading.Lock()
        self._cond: threading.Condition | None = None  # deadline mode, over ``_lock`` (taken itself on the send path)
        self._waiting = 0  # senders waiting for a buffer (deadline mode)
        self._flushing = 0  # callers of ``flush`` waiting (deadline mode)
        self._completing = False  # the thread is waiting for a send it took off ``_sending``
        self._retired: deque[Any] = deque(maxlen=RETIRED_WORKS)
        self._error: BaseException | None = None
        self._closed = False
        if deadlines:
            self._cond = threading.Condition(self._lock)
            threading.Thread(target=self._complete_sends, name=f"mesh-sends-{dst}", daemon=True).start()

    def _take(self, give_up: GiveUp | None) -> int:
        if self._cond is None:
            if self._free:
                return self._free.popleft()
            index, *_, work = self._sending.popleft()
            _complete(work, self._retired)
            return index
        with self._lock:
            self._reclaim_locked()
            if not self._free:
                self._waiting += 1
                self._cond.notify_all()
                try:
                    self._wait_locked(lambda: bool(self._free), give_up)
                finally:
                    self._waiting -= 1
            return self._free.popleft()

    def send(self, words: list[int], payload: wire.Payload, give_up: GiveUp | None = None) -> None:
        """Send a request or reply. With ``give_up``, a wait for a buffer ends with the exception
        it returns; chunks already sent stay sent (the receiver then sees a request cut short)."""
        for chunk in range(wire.n_chunks(payload.total)):
            index = self._take(give_up)
            length = wire.fill(self._buffers[index], words, chunk, payload)
            span = self._spans.get((index, length))
            if span is None:  # a service repeats a few message lengths: their views are kept
                if len(self._spans) >= 256:
                    self._spans.clear()
                span = self._spans[index, length] = self._buffers[index].tensor[:length]
            work = self._group.send([span], self._peer, 0)
            self._numbered += 1
            entry = (index, self._numbered, words[wire.REQUEST_ID_AT], chunk, work)
            if self._cond is None:
                self._sending.append(entry)
                if not self._free and len(self._sending) > 1:  # done now, after the message left, not before the next
                    index, *_, work = self._sending.popleft()
                    _complete(work, self._retired)
                    self._free.append(index)
            else:
                with self._lock:
                    self._sending.append(entry)

    def acknowledge(self, request_id: int) -> None:
        """Deadline mode: the peer answered ``request_id``, so it read the request's first message
        and all before it; their buffers are freed now (by the edge's reader, off the sender's
        path), without a wait that could block."""
        assert self._cond is not None
        with self._lock:
            for _, number, sent_id, chunk, _ in self._sending:
                if sent_id == request_id and chunk == 0:
                    self._delivered = max(self._delivered, number)
                    self._reclaim_locked()
                    if self._waiting or self._flushing:
                        self._cond.notify_all()
                    return

    def _reclaim_locked(self) -> None:
        """Deadline mode, holding ``_lock``: free the buffers of sends proven delivered (their
        wait returns at once: Gloo finished writing them before the peer could read them)."""
        while self._sending and self._sending[0][1] <= self._delivered:
            index, *_, work = self._sending.popleft()
            _complete(work, self._retired)
            self._free.append(index)

    def _complete_sends(self) -> None:
        """The deadline mode's thread: while more senders wait for a buffer than there are free
        buffers (or a flush waits, or the outbox closes), wait for the oldest send (Gloo sends
        complete only through a wait) and free its buffer; a failed send fails every later wait
        for a buffer. Counting the free buffers keeps it from taking a second send while the
        sender it freed a buffer for has not yet woken to claim it."""
        assert self._cond is not None
        while True:
            with self._lock:
                while not (self._sending and (self._waiting > len(self._free) or self._flushing or self._closed)):
                    if self._closed and not self._sending:
                        return
                    self._cond.wait()
                index, *_, work = self._sending.popleft()
                self._completing = True
            try:
                work.wait()
            except Exception as exc:
                with self._lock:
                    self._error = exc
                    self._completing = False
                    self._cond.notify_all()
                return
            with self._lock:
                self._retired.append(work)
                self._free.append(index)
                self._completing = False
                self._cond.notify_all()

    def flush(self, give_up: GiveUp | None = None) -> None:
        """Wait until every message sent is delivered."""
        if self._cond is None:
            while self._sending:
                index, *_, work = self._sending.popleft()
                _complete(work, self._retired)
                self._free.append(index)
            return
        with self._lock:
            self._reclaim_locked()
            self._flushing += 1
            self._cond.notify_all()
            try:
                self._wait_locked(lambda: not self._sending and not self._completing, give_up)
            finally:
                self._flushing -= 1

    def _wait_locked(self, done: Callable[[], bool], give_up: GiveUp | None) -> None:
        """Deadline mode, holding ``_lock``: wait until ``done()``; a failed send or
        ``give_up`` ends the wait with its exception."""
        assert self._cond is not None
        while not done():
            if self._error is not None:
                raise self._error
            reason = give_up() if give_up is not None else None
            if reason is not None:
                raise reason
            self._cond.wait(0.05)
            self._reclaim_locked()

    def close(self) -> None:
        """End the deadline mode's thread once its sends are complete."""
        if self._cond is not None:
            with self._lock:
                self._closed = True
                self._cond.notify_all()


class Inbox:
    """Messages from one peer, through ``POSTED_RECEIVES`` receives posted ahead of time.

    ``receive`` blocks until a message arrives (or the connection ends: then torch.distributed's
    error) and returns ``(header words, chunk bytes)``; the bytes are a view into a buffer that
    stays valid until the next call, and ``None`` when the message was shorter than its header says.
    """

    def __init__(self, src: int, group: Any):
        self._group, self._peer = _endpoint(group), _peer_of(group, src)
        self._buffers = [wire.MessageBuffer(np.empty(MESSAGE_BYTES, dtype=np.uint8)) for _ in range(POSTED_RECEIVES + 1)]
        self._free = deque(range(POSTED_RECEIVES + 1))
        self._posted: deque[tuple[int, Any]] = deque()
        self._held: int | None = None
        self._retired: deque[Any] = deque(maxlen=RETIRED_WORKS)
        # per buffer: views of its bytes by the specs they were made for (see ``views``)
        self._views: list[dict[int, tuple[list[wire.TensorSpec], list[torch.Tensor]]]] = [{} for _ in self._buffers]
        while len(self._posted) < POSTED_RECEIVES:
            self._post()

    def _post(self) -> None:
        index = self._free.popleft()
        self._posted.append((index, self._group.recv([self._buffers[index].tensor], self._peer, 0)))

    def receive(self, timeout: float | None = None) -> tuple[list[int], np.ndarray | None]:
        """The next message; with ``timeout``, torch.distributed's error once that many seconds
        pass without one (the connection then ends, as :func:`end_connection` ends it)."""
        # Buffers are posted again here, not right after a message arrives: one receive stays
        # posted meanwhile, and posting is then off the path from a message to its answer
        # (a worker has replied by now; the edge's reader has sent its next request).
        self.release()
        index, work = self._posted[0]
        _complete(work, self._retired, timeout)
        self._posted.popleft()
        self._held = index
        return wire.parse(self._buffers[index])

    def views(self, body: np.ndarray, specs: list[wire.TensorSpec]) -> list[torch.Tensor]:
        """:func:`wire.unpack` of the last message's ``body`` without copies. A service repeats a
        few signatures, and messages land in a few buffers: the views of a buffer for ``specs``
        (an object :func:`wire.decode_specs` keeps) are made once and handed out again; they are
        read before the buffer takes its next message, and an op never writes its inputs."""
        assert self._held is not None
        cache = self._views[self._held]
        found = cache.get(id(specs))
        if found is not None and found[0] is specs:  # the same object: an entry holds it, so its id is never reused
            return found[1]
        tensors = wire.unpack(body, specs, copy=False)
        if wire.unpacks_in_place(specs):
            if len(cache) >= 64:
                cache.clear()
            cache[id(specs)] = (specs, tensors)
        return tensors

    def release(self) -> None:
        """Done with the last message's bytes: its buffer is posted again."""
        if self._held is not None:
            self._free.append(self._held)
            self._held = None
        while len(self._posted) < POSTED_RECEIVES:
            self._post()
