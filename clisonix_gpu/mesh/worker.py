"""The worker: ranks >= 1 answer requests from the edge (rank 0), one at a time, in order.

A worker checks every header field against its limits and every parameter against the
allowlist's bounds; a malformed request gets one error reply and the worker keeps serving.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
from typing import Any

import torch
import torch.distributed as dist

from . import allowlist, wire
from .transport import REJOIN_ATTEMPT, Inbox, Outbox, generation_group, generation_key, groups

DEFAULT_MAX_BYTES = 1 << 31  # per request, all tensors together


def device_and_capacity() -> tuple[int, float]:
    """(1 if CUDA else 0, relative capacity) that this worker announces."""
    if torch.cuda.is_available():
        return 1, float(torch.cuda.get_device_properties(0).multi_processor_count)
    return 0, float(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def process_namespace() -> str:
    """Which pid space this process lives in (boot id and pid namespace): the edge looks a worker's
    pid up itself only where its own key is the same."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return f"{boot}/{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return ""


def identity_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """This process's host name and pid namespace as uint8 tensors: the payload of its greeting."""
    return tuple(torch.tensor(list(text.encode()[:255]), dtype=torch.uint8) for text in (socket.gethostname(), process_namespace()))  # type: ignore[return-value]


_REQUESTS_SEEN: dict[tuple[int, ...], tuple[allowlist.Op, wire.Specs]] = {}  # checked requests by header fields


def check_request(words: list[int], max_bytes: int) -> tuple[allowlist.Op, wire.Specs]:
    """The op, tensor specs and payload bytes of a request's first chunk; ``ValueError`` naming
    what is wrong. A service repeats a few signatures: those that passed once are looked up."""
    key = (max_bytes, *words[wire.CODE_AT : wire.CHUNK_AT], *words[wire.PARAMS_AT :])
    found = _REQUESTS_SEEN.get(key)
    if found is None:
        found = _check_request(words, max_bytes)
        if len(_REQUESTS_SEEN) >= 1024:
            _REQUESTS_SEEN.clear()
        _REQUESTS_SEEN[key] = found
    return found


def _check_request(words: list[int], max_bytes: int) -> tuple[allowlist.Op, wire.Specs]:
    op = allowlist.OPS.get(words[wire.CODE_AT])
    if op is None:
        raise ValueError(f"op id {words[wire.CODE_AT]} is not in the allowlist {sorted(allowlist.OPS)}")
    count, n_params = words[wire.N_TENSORS_AT], words[wire.N_PARAMS_AT]
    if not op.n_tensors[0] <= count <= op.n_tensors[1] or n_params != len(op.params):
        raise ValueError(f"{op.name} takes {op.n_tensors} tensors and {len(op.params)} parameters; got {count} and {n_params}")
    op.check_params(words[wire.PARAMS_AT : wire.PARAMS_AT + n_params])
    return op, wire.decode_specs(words, max_bytes)


def serve(*, max_bytes: int = DEFAULT_MAX_BYTES, capacity: float | None = None) -> int:
    """Serve requests from rank 0 until it sends shutdown; returns the number of requests answered.

    Call in every rank >= 1 after ``torch.distributed`` is initialised; ``clisonix-gpu worker``
    does both. ``max_bytes`` bounds one request's tensors; ``capacity`` overrides the relative
    speed this worker announces (default: SM count on CUDA, else CPU cores). When the edge ends
    the connection (a reply missed its deadline), the worker meets it again in a fresh group and
    greets it anew: a worker that was only slow, or stopped, comes back. Raises
    torch.distributed's ``RuntimeError`` when the edge is gone (its connection ends and it takes
    no new one within ``CLISONIX_MESH_CONNECT_TIMEOUT`` seconds, default 600).

    Example, as the program of every rank >= 1 (what ``clisonix-gpu worker`` runs)::

        import torch.distributed as dist
        from clisonix_gpu import mesh

        dist.init_process_group("gloo")
        mesh.serve()
        dist.destroy_process_group()
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    group, generation = groups(world)[rank], 0
    kind, own = device_and_capacity()
    greeting = (kind, int(1000 * (capacity or own)), os.getpid())
    device = "cuda" if kind else "cpu"
    answered = [0]
    while True:
        inbox, outbox = Inbox(0, group), Outbox(0, group)  # receives posted before the hello
        identity = identity_tensors()
        try:
            outbox.send(wire.header(0, wire.HELLO, identity, greeting), wire.Payload.of(identity))
            _serve_connection(inbox, outbox, max_bytes, device, answered)
            break
        except RuntimeError as lost:  # the connection ended: the edge's doing (a missed deadline) or the edge is gone
            group, generation = _meet_again(rank, generation, lost)
    outbox.flush()
    return answered[0]


def _meet_again(rank: int, generation: int, lost: RuntimeError) -> tuple[Any, int]:
    """The group of the next generation of this worker's connection, once the edge offers one;
    ``lost`` raised again when the edge is gone (its store with it) or offers none within
    ``CLISONIX_MESH_CONNECT_TIMEOUT`` seconds."""
    store = dist.distributed_c10d._get_default_store()
    until = time.monotonic() + float(os.environ.get("CLISONIX_MESH_CONNECT_TIMEOUT") or 600)
    key = generation_key(rank)
    while time.monotonic() < until:
        try:
            offered = int(store.get(key)) if store.check([key]) else 0
        except RuntimeError:  # the store went with the edge
            break
        if offered > generation:
            try:
                timeout = datetime.timedelta(seconds=max(until - time.monotonic(), 1.0))
                return generation_group(store, rank, offered, edge=False, timeout=min(timeout, REJOIN_ATTEMPT)), offered
            except RuntimeError:  # the edge gave that generation up meanwhile: it offers the next
                pass
        time.sleep(0.05)
    raise lost


def _serve_connection(inbox: Inbox, outbox: Outbox, max_bytes: int, device: str, answered: list[int]) -> None:
    """Answer the requests of one connection until shutdown (returns) or its end (torch.distributed's
    ``RuntimeError``); adds each answered request to ``answered[0]``."""
    current: wire.Assembly | None = None  # the request whose chunks are arriving, and its op
    current_op: allowlist.Op | None = None
    rejected = None  # a request already answered with an error: its later chunks are dropped

    def reject(request_id: int, message: str) -> None:
        nonlocal rejected
        rejected = request_id
        _reply_error(outbox, request_id, wire.STATUS_BAD_REQUEST, message)

    while True:
        words, body = inbox.receive()
        request_id, chunk = words[wire.REQUEST_ID_AT], words[wire.CHUNK_AT]
        if current is not None and (request_id != current.request_id or chunk != current.next_chunk or body is None):
            reject(current.request_id, f"truncated payload: {current.next_chunk} of {current.n_chunks} chunks arrived")
            current = None
        if words[wire.MAGIC_AT] != wire.MAGIC or words[wire.VERSION_AT] != wire.VERSION:
            reject(request_id, f"bad magic/version {words[wire.MAGIC_AT]:#x}/{words[wire.VERSION_AT]}, expected {wire.MAGIC:#x}/{wire.VERSION}")
            continue
        code = words[wire.CODE_AT]
        if code == wire.SHUTDOWN and chunk == 0:
            return
        if body is None:
            reject(request_id, f"truncated message: chunk {chunk} is shorter than its {words[wire.CHUNK_SIZE_AT]} bytes")
            continue
        if current is None:
            if chunk != 0:
                if request_id != rejected:
                    reject(request_id, f"chunk {chunk} without the start of its request")
                continue
            try:
                current_op, (specs, total) = check_request(words, max_bytes)
            except ValueError as exc:
                reject(request_id, str(exc))
                continue
            if total <= wire.CHUNK_BYTES:  # one message: the op reads its tensors in the receive buffer
                if words[wire.CHUNK_SIZE_AT] != total:
                    reject(request_id, f"chunk 0 of {words[wire.CHUNK_SIZE_AT]} bytes where chunk 0 of {total} bytes was due")
                    continue
                answered[0] += _answer(outbox, current_op, words, inbox.views(body, specs), device)
                continue
            current = wire.Assembly(words, specs)
        try:
            current.add(words, body)
        except ValueError as exc:
            reject(request_id, str(exc))
            current = None
            continue
        if current.complete and current_op is not None:
            answered[0] += _answer(outbox, current_op, current.first, current.tensors, device)
            current = None


def _answer(outbox: Outbox, op: allowlist.Op, words: list[int], tensors: list[torch.Tensor], device: str) -> int:
    """Run ``op`` on a complete request (its first header and tensors) and send the reply before
    the next receive reuses the buffers; 1 when it succeeded, 0 when the reply is the op's error."""
    if device != "cpu":
        tensors = [t.to(device) for t in tensors]
    try:
        if op.params:
            results = op.fn(*tensors, **{name: words[wire.PARAMS_AT + i] for i, name in enumerate(op.param_names)})
        else:
            results = op.fn(*tensors)
    except Exception as exc:  # the op's own typed errors, sent back by name and message
        _reply_error(outbox, words[wire.REQUEST_ID_AT], wire.STATUS_OP_FAILED, f"{type(exc).__name__}: {exc}")
        return 0
    outbox.send(wire.header(words[wire.REQUEST_ID_AT], wire.STATUS_OK, results), wire.Payload.of(results))
    return 1


def _reply_error(outbox: Outbox, request_id: int, status: int, message: str) -> None:
    data = torch.tensor(list(message.encode()[:4096]), dtype=torch.uint8)
    outbox.send(wire.header(request_id, status, (data,)), wire.Payload.of((data,)))
