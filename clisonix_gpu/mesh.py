"""Neural Mesh: offload tensors from this process (the edge, rank 0) to workers (ranks >= 1) over
torch.distributed point-to-point messages, with failover; nothing is lost or answered twice.

Wire format, no pickle: a request or reply is one or more self-describing messages. Each message
is a fixed int64 header of ``HEADER_WORDS`` words (magic, protocol version, request id, op id from
an allowlist or a reply status, parameters, dtype codes and shapes, chunk index and size), up to
``CHUNK_BYTES`` of the tensors' raw bytes, and a trailer that repeats the request id, chunk index
and size. A request up to ``CHUNK_BYTES`` is one message each way. Every peer keeps receives posted
ahead of time into buffers that fit any message, so a sender never waits for the receiver to post,
and a message shorter than its header says is caught by its trailer; a request whose chunks stop
early is answered with an error when the next request starts. A worker checks every header field
against its limits; a malformed request gets one error reply and the worker keeps serving. Each
worker talks to the edge through a process group of its own, so one worker's failure cannot poison
the others; the edge may have several requests in flight per worker (bounded: back-pressure).

Security: torch.distributed has no authentication or encryption. The mesh binds 127.0.0.1 unless
told otherwise; across hosts, run it inside a private network or an SSH/WireGuard tunnel. A peer
that sends a message longer than a posted receive makes Gloo abort the receiving process: only
the mesh's own ranks belong on its network.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import itertools
import math
import os
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from . import alda
from .ops.activations import ACTIVATIONS
from .ops.binary import binary_matmul, hamming_distance, hamming_topk, pack_bits
from .ops.svd_compress import svd_compress
from .ops.transform_matrix import transform_matrix

__all__ = ["Mesh", "MeshError", "OPS", "connect", "serve"]

MAGIC = 0x434C5358  # "CLSX"
VERSION = 2
HEADER_WORDS = 64
MAX_TENSORS = 4
MAX_PARAMS = 4
MAX_NDIM = 6
MAX_DIM = 2**31 - 1
DEFAULT_MAX_BYTES = 1 << 31  # per request, all tensors together
SHUTDOWN, HELLO = 0, 1
STATUS_OK, STATUS_BAD_REQUEST, STATUS_OP_FAILED = 0, 1, 2

# dtype codes on the wire
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.uint8, torch.int32, torch.int64, torch.bool]
_CODE = {d: i for i, d in enumerate(DTYPES)}
_ITEMSIZE = {d: torch.empty(0, dtype=d).element_size() for d in DTYPES}
# NumPy dtypes of the same bytes (bfloat16, which NumPy lacks, as int16)
_NUMPY_DTYPE = {d: np.dtype(np.int16) if d == torch.bfloat16 else torch.empty(0, dtype=d).numpy().dtype for d in DTYPES}


class MeshError(RuntimeError):
    """A request failed on a worker (message from the worker) or no worker could answer it.

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
# message = header (HEADER_BYTES) | chunk of the payload (padded to 8 bytes) | trailer (TRAILER_BYTES)
# header words: [MAGIC, VERSION, request_id, op id (request) | status (reply), n_tensors, n_params,
#                chunk index, chunk bytes, params x MAX_PARAMS, (dtype, ndim, shape x MAX_NDIM) x MAX_TENSORS]
# trailer words: [TRAILER_MAGIC, request_id, chunk index, chunk bytes]
# The payload is the tensors' raw bytes back to back, cut into chunks of CHUNK_BYTES; every chunk
# repeats the header. A reply with a nonzero status carries one uint8 tensor: the error message.
_PARAMS_AT = 8
_SPECS_AT = _PARAMS_AT + MAX_PARAMS
_SPEC_WORDS = 2 + MAX_NDIM
HEADER_BYTES = HEADER_WORDS * 8
TRAILER_MAGIC = 0x434C5354  # "CLST"
TRAILER_BYTES = 32
# A request up to 4 MiB (a 1024^2 float32 image) is one message each way. Posted buffers stay
# virtual memory until messages fill them, so small messages touch only their first pages.
CHUNK_BYTES = 4 << 20
MESSAGE_BYTES = HEADER_BYTES + CHUNK_BYTES + TRAILER_BYTES  # every posted receive fits any message
POSTED_RECEIVES = 2  # per peer, kept posted ahead of the messages they will hold
_REPLY_LIMIT = 1 << 40  # replies come from the mesh's own workers; the bound only rejects garbage


def _header(request_id: int, code: int, tensors: Sequence[torch.Tensor], params: Sequence[int] = ()) -> list[int]:
    """The header words of a request (code = op id) or a reply (code = status); chunk fields zero."""
    words = [0] * HEADER_WORDS
    words[:6] = [MAGIC, VERSION, request_id, code, len(tensors), len(params)]
    words[_PARAMS_AT : _PARAMS_AT + len(params)] = [int(p) for p in params]
    for i, t in enumerate(tensors):
        base = _SPECS_AT + i * _SPEC_WORDS
        words[base : base + 2 + t.ndim] = [_CODE[t.dtype], t.ndim, *t.shape]
    return words


_TensorSpec = tuple[torch.dtype, tuple[int, ...]]


_Specs = tuple[list[_TensorSpec], int]  # tensor specs and their bytes in all
_SPECS_SEEN: dict[tuple[int, ...], _Specs] = {}  # decoded specs by their header words


def _decode_specs(header: Sequence[int], count: int, max_bytes: int) -> _Specs:
    """Tensor (dtype, shape) pairs from a header (as a list), and their total bytes;
    ``ValueError`` naming the first field out of range.

    Requests and replies of a service repeat a few shapes: specs that passed once are looked up.
    """
    key = (max_bytes, count, *header[_SPECS_AT : _SPECS_AT + MAX_TENSORS * _SPEC_WORDS])
    found = _SPECS_SEEN.get(key)
    if found is None:
        found = _check_specs(header, count, max_bytes)
        if len(_SPECS_SEEN) >= 1024:
            _SPECS_SEEN.clear()
        _SPECS_SEEN[key] = found
    return found


def _check_specs(header: Sequence[int], count: int, max_bytes: int) -> _Specs:
    if not 0 <= count <= MAX_TENSORS:
        raise ValueError(f"tensor count {count} outside [0, {MAX_TENSORS}]")
    specs: list[_TensorSpec] = []
    total = 0
    for i in range(count):
        base = _SPECS_AT + i * _SPEC_WORDS
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
    return specs, total


def _byte_view(t: torch.Tensor) -> np.ndarray:
    """A tensor's bytes as a flat uint8 NumPy array; a view unless ``t`` is off the CPU or not contiguous."""
    if t.is_cpu and t.dtype != torch.bfloat16 and not t.requires_grad and t.is_contiguous():
        return t.numpy().reshape(-1).view(np.uint8)  # the usual case, in the fewest calls
    t = t.detach()
    if not t.is_cpu:
        t = t.cpu()
    if t.dtype == torch.bfloat16:  # NumPy has no bfloat16; its bytes are those of an int16
        t = t.contiguous().view(torch.int16)
    return np.ascontiguousarray(t.numpy()).reshape(-1).view(np.uint8)


class _Bytes:
    """The raw bytes of some tensors as one address space, without copies of CPU tensors:
    requests and replies are cut into chunks from it (``read``) and put back into it (``write``).
    Byte work goes through NumPy views: per call, they cost a fraction of torch ops."""

    def __init__(self, parts: Sequence[np.ndarray]):
        self.parts = parts
        self.starts = [0]
        for part in self.parts:
            self.starts.append(self.starts[-1] + part.size)
        self.total = self.starts[-1]

    @classmethod
    def of(cls, tensors: Sequence[torch.Tensor]) -> _Bytes:
        return cls([_byte_view(t) for t in tensors])

    def _spans(self, offset: int, n: int) -> Iterator[tuple[np.ndarray, int]]:
        """(piece of a part, its start in the range) covering bytes [offset, offset + n)."""
        for part, start in zip(self.parts, self.starts):
            lo, hi = max(offset, start), min(offset + n, start + part.size)
            if lo < hi:
                yield part[lo - start : hi - start], lo - offset

    def read(self, offset: int, out: np.ndarray) -> None:
        if len(self.parts) == 1:  # the common case, without the span walk
            out[:] = self.parts[0][offset : offset + out.size]
            return
        for piece, at in self._spans(offset, out.size):
            out[at : at + piece.size] = piece

    def write(self, offset: int, data: np.ndarray) -> None:
        if len(self.parts) == 1:
            self.parts[0][offset : offset + data.size] = data
            return
        for piece, at in self._spans(offset, data.size):
            piece[:] = data[at : at + piece.size]


def _pad8(n: int) -> int:
    return -(-n // 8) * 8


def _n_chunks(total: int) -> int:
    return max(1, -(-total // CHUNK_BYTES))


def _fill(buffer: np.ndarray, header: Sequence[int], chunk: int, payload: _Bytes) -> int:
    """Write message ``chunk`` of a request or reply into ``buffer`` (MESSAGE_BYTES, 8-byte
    aligned); returns its length in bytes."""
    size = min(CHUNK_BYTES, payload.total - chunk * CHUNK_BYTES)
    words = buffer.view(np.int64)
    words[:HEADER_WORDS] = header
    words[6], words[7] = chunk, size
    payload.read(chunk * CHUNK_BYTES, buffer[HEADER_BYTES : HEADER_BYTES + size])
    end = HEADER_BYTES + _pad8(size)
    if end > HEADER_BYTES + size:
        buffer[HEADER_BYTES + size : end] = 0
    words[end // 8 : end // 8 + 4] = (TRAILER_MAGIC, header[2], chunk, size)
    return end + TRAILER_BYTES


def _unpack(body: np.ndarray, specs: list[_TensorSpec], copy: bool) -> list[torch.Tensor]:
    """The tensors of ``specs`` laid back to back in one message's ``body``: views of it where
    ``copy`` is False and a tensor's offset suits its dtype, else copies."""
    tensors, offset = [], 0
    for dtype, shape in specs:
        size = math.prod(shape) * _ITEMSIZE[dtype]
        part = body[offset : offset + size]
        if copy or offset % _ITEMSIZE[dtype]:
            part = part.copy()
        tensors.append(_tensor_of(part.view(_NUMPY_DTYPE[dtype]).reshape(shape), dtype))
        offset += size
    return tensors


def _tensor_of(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """``array`` (of ``_NUMPY_DTYPE[dtype]``) as a tensor of ``dtype``, sharing its memory."""
    t = torch.from_numpy(array)
    return t.view(dtype) if dtype == torch.bfloat16 else t


def _peer_of(group: Any, rank: int) -> int:
    """``rank``'s rank inside ``group``: messages go through the process group's own send/recv,
    which skips a per-call layer of checks in torch.distributed that costs as much as the
    transfer of a small message."""
    return dist.get_group_rank(group, rank)


def _wait(work: Any, timeout: float | None) -> None:
    if timeout is None:
        work.wait()
    else:
        work.wait(timeout=datetime.timedelta(seconds=max(timeout, 1e-3)))


class _Outbox:
    """Messages to one peer, built in ``POSTED_RECEIVES`` reusable buffers. ``send`` returns once
    the last message is on its way; a buffer is waited for (with the deadline) only when it is
    needed again, so a request or reply costs no wait of its own."""

    def __init__(self, dst: int, group: Any):
        self._group, self._peer = group, _peer_of(group, dst)
        self._buffers = [np.empty(MESSAGE_BYTES, dtype=np.uint8) for _ in range(POSTED_RECEIVES)]
        self._tensors = [torch.from_numpy(b) for b in self._buffers]  # the same memory, made once
        self._free = deque(range(POSTED_RECEIVES))
        self._sending: deque[tuple[int, Any]] = deque()
        self._spans: dict[tuple[int, int], torch.Tensor] = {}  # message tensors by (buffer, length)

    def _take(self, timeout: float | None) -> int:
        if not self._free and self._sending[0][1].is_completed():  # the usual case: no wait needed
            self._free.append(self._sending.popleft()[0])
        return self._free.popleft() if self._free else self._take_sent(timeout)

    def send(self, header: list[int], payload: _Bytes, timeout: float | None) -> None:
        for chunk in range(_n_chunks(payload.total)):
            index = self._take(timeout)
            length = _fill(self._buffers[index], header, chunk, payload)
            span = self._spans.get((index, length))
            if span is None:  # a service repeats a few message lengths: their views are kept
                if len(self._spans) >= 256:
                    self._spans.clear()
                span = self._spans[index, length] = self._tensors[index][:length]
            self._sending.append((index, self._group.send([span], self._peer, 0)))

    def flush(self, timeout: float | None) -> None:
        while self._sending:
            self._free.append(self._take_sent(timeout))

    def _take_sent(self, timeout: float | None) -> int:
        index, work = self._sending.popleft()
        _wait(work, timeout)
        return index


class _Inbox:
    """Messages from one peer, through ``POSTED_RECEIVES`` receives posted ahead of time.

    ``receive`` returns ``(header words, chunk bytes)``; the bytes are a view into a buffer that
    stays valid until the next call, and ``None`` when the trailer does not match the header (the
    message was shorter than its header says).
    """

    def __init__(self, src: int, group: Any):
        self._group, self._peer = group, _peer_of(group, src)
        self._buffers = [np.empty(MESSAGE_BYTES, dtype=np.uint8) for _ in range(POSTED_RECEIVES + 1)]
        self._words = [b.view(np.int64) for b in self._buffers]
        self._tensors = [torch.from_numpy(b) for b in self._buffers]
        self._free = deque(range(POSTED_RECEIVES + 1))
        self._posted: deque[tuple[int, Any]] = deque()
        self._held: int | None = None
        while len(self._posted) < POSTED_RECEIVES:
            self._post()

    def _post(self) -> None:
        index = self._free.popleft()
        self._posted.append((index, self._group.recv([self._tensors[index]], self._peer, 0)))

    def receive(self, timeout: float | None) -> tuple[list[int], np.ndarray | None]:
        # Buffers are posted again here, not right after a message arrives: one receive stays
        # posted meanwhile, and posting is then off the path from a message to its answer.
        if self._held is not None:
            self._free.append(self._held)
            self._held = None
        while len(self._posted) < POSTED_RECEIVES:
            self._post()
        index, work = self._posted[0]
        _wait(work, timeout)
        self._posted.popleft()
        self._held = index
        buffer, words = self._buffers[index], self._words[index]
        header: list[int] = words[:HEADER_WORDS].tolist()
        words[:HEADER_WORDS] = 0  # a later message that ends inside the header must not show these words
        size = header[7]
        if not 0 <= size <= CHUNK_BYTES:
            return header, None
        at = (HEADER_BYTES + _pad8(size)) // 8
        intact = words[at : at + 4].tolist() == [TRAILER_MAGIC, header[2], header[6], size]
        words[at : at + 4] = 0  # a later, shorter message must not find this trailer still in place
        return header, buffer[HEADER_BYTES : HEADER_BYTES + size] if intact else None


class _Assembly:
    """A request or reply put together from its chunks, in order, into tensors of its specs."""

    def __init__(self, header: list[int], specs: list[_TensorSpec]):
        self.first = header
        arrays = [np.empty(shape, dtype=_NUMPY_DTYPE[dtype]) for dtype, shape in specs]
        self.tensors = [_tensor_of(a, dtype) for a, (dtype, _) in zip(arrays, specs)]
        self._bytes = _Bytes([a.reshape(-1).view(np.uint8) for a in arrays])
        self.total = self._bytes.total
        self.n_chunks = _n_chunks(self.total)
        self.next_chunk = 0

    @property
    def request_id(self) -> int:
        return self.first[2]

    @property
    def complete(self) -> bool:
        return self.next_chunk == self.n_chunks

    def add(self, header: list[int], body: np.ndarray) -> None:
        """Append the next chunk; ``ValueError`` if it is out of order, the wrong size or its header changed."""
        chunk, size = header[6], header[7]
        expected = min(CHUNK_BYTES, self.total - self.next_chunk * CHUNK_BYTES)
        if chunk != self.next_chunk or size != expected:
            raise ValueError(f"chunk {chunk} of {size} bytes where chunk {self.next_chunk} of {expected} bytes was due")
        if chunk and (header[:6] != self.first[:6] or header[_PARAMS_AT:] != self.first[_PARAMS_AT:]):
            raise ValueError(f"chunk {chunk} changes the header of request {self.request_id}")
        self._bytes.write(chunk * CHUNK_BYTES, body)
        self.next_chunk += 1


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


def _check_request(header: list[int], max_bytes: int) -> tuple[_Op, _Specs]:
    """The op, tensor specs and payload bytes of a request's first chunk; ``ValueError`` naming
    what is wrong."""
    op = OPS.get(header[3])
    if op is None:
        raise ValueError(f"op id {header[3]} is not in the allowlist {sorted(OPS)}")
    count, n_params = header[4], header[5]
    if not op.n_tensors[0] <= count <= op.n_tensors[1] or n_params != len(op.params):
        raise ValueError(f"{op.name} takes {op.n_tensors} tensors and {len(op.params)} parameters; got {count} and {n_params}")
    return op, _decode_specs(header, count, max_bytes)


def serve(*, max_bytes: int = DEFAULT_MAX_BYTES, capacity: float | None = None) -> int:
    """Serve requests from rank 0 until it sends shutdown; returns the number of requests answered.

    Call in every rank >= 1 after ``torch.distributed`` is initialised; ``clisonix-gpu worker``
    does both. ``max_bytes`` bounds one request's tensors; ``capacity`` overrides the relative
    speed this worker announces (default: SM count on CUDA, else CPU cores).

    Example, as the program of every rank >= 1 under ``torchrun`` (what ``clisonix-gpu worker`` runs)::

        import torch.distributed as dist
        from clisonix_gpu import mesh

        dist.init_process_group("gloo")
        mesh.serve()
        dist.destroy_process_group()
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    group = _groups(world)[rank]
    inbox, outbox = _Inbox(0, group), _Outbox(0, group)  # receives posted before the hello
    kind, cap = _capacity()
    outbox.send(_header(0, HELLO, (), (kind, int(1000 * (capacity or cap)))), _Bytes([]), None)
    device = "cuda" if kind else "cpu"
    answered = 0
    current: _Assembly | None = None  # the request whose chunks are arriving, and its op
    current_op: _Op | None = None
    rejected = None  # a request already answered with an error: its later chunks are dropped

    def reject(request_id: int, message: str) -> None:
        nonlocal rejected
        rejected = request_id
        _reply_error(outbox, request_id, STATUS_BAD_REQUEST, message)

    while True:
        header, body = inbox.receive(None)
        request_id, chunk = header[2], header[6]
        if current is not None and (request_id != current.request_id or chunk != current.next_chunk or body is None):
            reject(current.request_id, f"truncated payload: {current.next_chunk} of {current.n_chunks} chunks arrived")
            current = None
        if header[0] != MAGIC or header[1] != VERSION:
            reject(request_id, f"bad magic/version {header[0]:#x}/{header[1]}, expected {MAGIC:#x}/{VERSION}")
            continue
        if header[3] == SHUTDOWN and chunk == 0:
            break
        if body is None:
            reject(request_id, f"truncated message: chunk {chunk} is shorter than its {header[7]} bytes")
            continue
        if current is None:
            if chunk != 0:
                if request_id != rejected:
                    reject(request_id, f"chunk {chunk} without the start of its request")
                continue
            try:
                current_op, (specs, total) = _check_request(header, max_bytes)
            except ValueError as exc:
                reject(request_id, str(exc))
                continue
            if total <= CHUNK_BYTES:  # one message: the op reads its tensors in the receive buffer
                if header[7] != total:
                    reject(request_id, f"chunk 0 of {header[7]} bytes where chunk 0 of {total} bytes was due")
                    continue
                answered += _answer(outbox, current_op, header, _unpack(body, specs, copy=False), device)
                continue
            current = _Assembly(header, specs)
        try:
            current.add(header, body)
        except ValueError as exc:
            reject(request_id, str(exc))
            current = None
            continue
        if current.complete and current_op is not None:
            answered += _answer(outbox, current_op, current.first, current.tensors, device)
            current = None
    outbox.flush(None)
    return answered


def _answer(outbox: _Outbox, op: _Op, header: list[int], tensors: list[torch.Tensor], device: str) -> int:
    """Run ``op`` on a complete request (its first header and tensors) and send the reply before
    the next receive reuses the buffers; 1 when it succeeded, 0 when the reply is the op's error."""
    if device != "cpu":
        tensors = [t.to(device) for t in tensors]
    params = {name: header[_PARAMS_AT + i] for i, name in enumerate(op.params)}
    try:
        results = op.fn(*tensors, **params)
    except Exception as exc:  # the op's own typed errors, sent back by name and message
        _reply_error(outbox, header[2], STATUS_OP_FAILED, f"{type(exc).__name__}: {exc}")
        return 0
    outbox.send(_header(header[2], STATUS_OK, results), _Bytes.of(results), None)
    return 1


def _reply_error(outbox: _Outbox, request_id: int, status: int, message: str) -> None:
    data = torch.tensor(list(message.encode()[:4096]), dtype=torch.uint8)
    outbox.send(_header(request_id, status, (data,)), _Bytes.of((data,)), None)


# ----------------------------------------------------------------------------- edge


@dataclasses.dataclass
class _Worker:
    """The edge's state for one worker. ``cond`` guards everything below it."""

    rank: int
    group: Any
    device: alda.Device
    inbox: _Inbox
    outbox: _Outbox
    send_lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    cond: threading.Condition = dataclasses.field(default_factory=lambda: threading.Condition(threading.Lock()))
    alive: bool = True
    in_flight: int = 0  # at most Mesh.max_in_flight: callers beyond wait for a slot (back-pressure)
    peak_in_flight: int = 0
    answered: int = 0
    failures: int = 0
    last_error: str = ""
    receiving: bool = False  # one caller at a time reads the inbox and files replies for all
    awaited: set[int] = dataclasses.field(default_factory=set)  # request ids whose callers wait
    replies: dict[int, tuple[int, list[torch.Tensor]]] = dataclasses.field(default_factory=dict)
    assembly: _Assembly | None = None


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
    >>> [(s["rank"], s["alive"], s["answered"]) for s in m.status()]
    [(1, True, 5), (0, True, 0)]
    >>> m.close()
    """

    def __init__(
        self, workers: list[_Worker], *, timeout: float, fallback: str, processes: Sequence[subprocess.Popen[bytes]] = (), max_in_flight: int = 4
    ):
        if fallback not in ("local", "raise"):
            raise ValueError(f"fallback must be 'local' or 'raise'; got {fallback!r}")
        self._workers = workers
        self.timeout = timeout
        self.fallback = fallback
        self.max_in_flight = max_in_flight
        self._processes = list(processes)
        self._ids = itertools.count(2)  # next() on a count is atomic under the GIL: no lock per request
        self._encoded: dict[tuple[Any, ...], tuple[int, list[int]]] = {}
        self._local_lock = threading.Lock()
        self._local_runs = 0
        self._closed = False
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=max(2, max_in_flight * max(len(workers), 1)), thread_name_prefix="mesh")

    # -- public API

    def offload(self, op: str, *tensors: torch.Tensor, **params: Any) -> Any:
        """Run ``op`` (a name from :data:`OPS`) on a live worker; the result comes back on the
        device of the first tensor. Failover: a worker that dies or misses the deadline is marked
        down and the request goes to the next live one, then runs locally (``fallback="local"``)
        or raises :class:`MeshError` (``"raise"``). Errors of the op itself are raised as
        :class:`MeshError` with the worker's message; a bad op name or parameters raise
        ``ValueError``/``TypeError`` before anything is sent."""
        results = self._run(op, tensors, params, preferred=None)
        return results[0] if len(results) == 1 else results

    def submit(self, op: str, *tensors: torch.Tensor, **params: Any) -> concurrent.futures.Future[Any]:
        """:meth:`offload` without waiting: a future of its result. Up to ``max_in_flight``
        requests per worker are on the wire at once; more wait their turn (back-pressure).
        A bad op name or parameters raise here, before anything is queued."""
        self._encode_request(op, tuple(t for t in tensors if t is not None), params)
        return self._executor.submit(self.offload, op, *tensors, **params)

    def map(self, op: str, x: torch.Tensor, *args: torch.Tensor, **params: Any) -> Any:
        """``op(x, *args, **params)`` with ``x`` split on axis 0 across live workers by an ALDA
        plan weighted by their capacity; each worker's share goes as up to ``max_in_flight``
        pipelined requests, and the pieces reassemble in order."""
        live = [w for w in self._workers if w.alive]
        if not live:
            return self._run_local(op, (x, *args), params)[0]
        args = tuple(a for a in args if a is not None)
        self._encode_request(op, (x, *args), params)
        schedule = alda.plan(len(x), [w.device for w in live])
        by_device = {w.device.name: w for w in live}
        pieces = []
        for shard in schedule:
            step = max(1, -(-shard.size // self.max_in_flight), 256)
            pieces += [(start, min(start + step, shard.stop), by_device[shard.device.name]) for start in range(shard.start, shard.stop, step)]
        pieces = pieces or [(0, 0, live[0])]
        futures = [self._executor.submit(self._run, op, (x[a:b], *args), params, worker) for a, b, worker in pieces]
        return torch.cat([f.result()[0] for f in futures], dim=0)

    def status(self) -> list[dict[str, Any]]:
        """One entry per worker (rank, device, weight, alive, requests in flight now and at most,
        answered, failures, last error), then rank 0 itself: the requests it ran locally."""
        return [
            {"rank": w.rank, "device": w.device.name, "weight": w.device.weight, "alive": w.alive, "in_flight": w.in_flight,
             "peak_in_flight": w.peak_in_flight, "answered": w.answered, "failures": w.failures, "last_error": w.last_error}
            for w in self._workers
        ] + [{"rank": 0, "device": "local", "alive": True, "answered": self._local_runs}]  # fmt: skip

    def close(self) -> None:
        """Tell live workers to stop, wait for processes this mesh started, leave torch.distributed."""
        if self._closed:
            return
        self._closed = True
        self._executor.shutdown(wait=True)
        for w in self._workers:
            if w.alive:
                try:
                    with w.send_lock:
                        w.outbox.send(_header(0, SHUTDOWN, ()), _Bytes([]), self.timeout)
                        w.outbox.flush(self.timeout)
                except Exception:
                    w.alive = False
        alive = {w.rank for w in self._workers if w.alive}
        for rank, p in enumerate(self._processes, start=1):  # connect(workers=n) started rank i as process i - 1
            try:
                p.wait(timeout=30 if rank in alive else 0.1)  # a worker marked down never got the shutdown
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if dist.is_initialized():
            dist.destroy_process_group()

    def __enter__(self) -> Mesh:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals

    def _request_id(self) -> int:
        return next(self._ids)

    def _encode_request(self, op: str, tensors: Sequence[torch.Tensor], params: dict[str, Any]) -> tuple[int, list[int]]:
        """(op id, parameter values) of a request; ``ValueError``/``TypeError`` for what the mesh
        cannot carry. A service repeats a few signatures: those that passed once are looked up."""
        try:
            key = (op, *[(name, type(v), v) for name, v in params.items()], *[(type(t), t.dtype, t.ndim) for t in tensors])
            found = self._encoded.get(key)
        except (AttributeError, TypeError):  # not tensors, or parameters that cannot be a key
            key, found = None, None
        if found is None:
            found = self._check_signature(op, tensors, params)
            if key is not None:
                if len(self._encoded) >= 1024:
                    self._encoded.clear()
                self._encoded[key] = found
        return found

    @staticmethod
    def _check_signature(op: str, tensors: Sequence[torch.Tensor], params: dict[str, Any]) -> tuple[int, list[int]]:
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
        for i, t in enumerate(tensors):
            if not isinstance(t, torch.Tensor) or t.dtype not in _CODE:
                raise TypeError(f"tensor {i} of {op}: the mesh carries torch tensors of {DTYPES}; got {getattr(t, 'dtype', type(t))}")
            if t.ndim > MAX_NDIM:
                raise ValueError(f"tensor {i} of {op}: at most {MAX_NDIM} dimensions; got shape {tuple(t.shape)}")
        for name in spec.params:
            if isinstance(values[name], bool) or not isinstance(values[name], (int, np.integer)):
                raise TypeError(f"{op}: parameter {name} must be an int; got {values[name]!r}")
        return _OP_IDS[op], [int(values[name]) for name in spec.params]

    def _run(self, op: str, tensors: Sequence[Any], params: dict[str, Any], preferred: _Worker | None) -> tuple[Any, ...]:
        tensors = tuple(t for t in tensors if t is not None)
        op_id, values = self._encode_request(op, tensors, params)
        home = tensors[0].device
        payload = _Bytes.of(tensors)  # once, before any worker is tried: a failure here is the caller's
        order = [w for w in self._workers if w.alive]
        if preferred is not None and preferred in order:
            order.remove(preferred)
            order.insert(0, preferred)
        elif len(order) > 1:  # spread single requests over the workers
            start = self._request_id() % len(order)
            order = order[start:] + order[:start]
        for worker in order:
            if not worker.alive:
                continue
            try:
                results = self._call(worker, op_id, tensors, values, payload)
                return tuple(results) if home.type == "cpu" else tuple(t.to(home) for t in results)
            except MeshError:
                raise
            except Exception as exc:  # dead, timed out or out of step: never use it again
                self._mark_down(worker, f"{type(exc).__name__}: {exc}")
        if self.fallback == "raise":
            raise MeshError(f"no live worker could run {op}; workers: {self.status()}")
        return self._run_local(op, tensors, params)

    def _run_local(self, op: str, tensors: Sequence[Any], params: dict[str, Any]) -> tuple[Any, ...]:
        op_id, values = self._encode_request(op, tensors, params)
        spec = OPS[op_id]
        with self._local_lock:
            self._local_runs += 1
        return tuple(spec.fn(*tensors, **dict(zip(spec.params, values))))

    @staticmethod
    def _mark_down(worker: _Worker, reason: str) -> None:
        with worker.cond:
            if worker.alive:
                worker.alive = False
                worker.failures += 1
                worker.last_error = reason
            worker.cond.notify_all()  # callers waiting for replies from it fail over now

    def _call(self, worker: _Worker, op_id: int, tensors: Sequence[torch.Tensor], values: list[int], payload: _Bytes) -> list[torch.Tensor]:
        deadline = time.monotonic() + self.timeout
        request_id = self._request_id()
        cond = worker.cond
        with cond:
            while worker.in_flight >= self.max_in_flight:  # back-pressure: wait for a free slot
                if not cond.wait(deadline - time.monotonic()):
                    raise TimeoutError(f"worker {worker.rank} kept {self.max_in_flight} requests in flight past the deadline")
            worker.in_flight += 1
            if worker.in_flight > worker.peak_in_flight:
                worker.peak_in_flight = worker.in_flight
            worker.awaited.add(request_id)  # before the send: another caller may read the reply
        try:
            with worker.send_lock:  # every send has the deadline: a stalled worker cannot block the edge
                if not worker.alive:
                    raise ConnectionError(f"worker {worker.rank} is down")
                worker.outbox.send(_header(request_id, op_id, tensors, values), payload, deadline - time.monotonic())
            status, results = self._await_reply(worker, request_id, deadline)
        finally:
            with cond:
                worker.in_flight -= 1
                worker.awaited.discard(request_id)
                worker.replies.pop(request_id, None)
                cond.notify_all()
        if status != STATUS_OK:
            raise MeshError(f"worker {worker.rank}: {bytes(results[0].tolist()).decode(errors='replace')}")
        return results

    def _await_reply(self, worker: _Worker, request_id: int, deadline: float) -> tuple[int, list[torch.Tensor]]:
        """Wait for the reply to ``request_id``. Whichever waiting caller is free reads the inbox and
        files every reply it finds (for awaited requests only), so replies may come back in any order
        across callers."""
        cond = worker.cond
        with cond:
            worker.awaited.add(request_id)
            while True:
                if request_id in worker.replies:
                    worker.answered += 1
                    worker.awaited.discard(request_id)
                    return worker.replies.pop(request_id)
                if not worker.alive:
                    raise ConnectionError(f"worker {worker.rank} went down: {worker.last_error}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no reply to request {request_id} from worker {worker.rank} within {self.timeout} s")
                if not worker.receiving:
                    worker.receiving = True
                    reply = None
                    cond.release()  # read the inbox outside the lock; the others wait or file
                    try:
                        reply = self._receive_one(worker, deadline)
                    finally:
                        cond.acquire()
                        worker.receiving = False
                        if reply is not None and reply[0] in worker.awaited:  # a reply nobody waits for is dropped
                            worker.replies[reply[0]] = reply[1]
                        cond.notify_all()
                else:
                    cond.wait(left)

    @staticmethod
    def _receive_one(worker: _Worker, deadline: float) -> tuple[int, tuple[int, list[torch.Tensor]]] | None:
        """Read one message of ``worker``: ``(request id, (status, tensors))`` when it completes a
        reply, else None; ``ConnectionError`` when the worker is out of step (it is then never
        used again)."""
        header, body = worker.inbox.receive(deadline - time.monotonic())
        if header[0] != MAGIC or header[1] != VERSION or body is None:
            raise ConnectionError(f"malformed reply from worker {worker.rank}")
        try:
            if header[6] == 0 and worker.assembly is None:
                specs, total = _decode_specs(header, header[4], _REPLY_LIMIT)
                if total <= CHUNK_BYTES:  # the usual reply: one message
                    if header[7] != total:
                        raise ValueError(f"reply {header[2]} has {header[7]} bytes where {total} were due")
                    return header[2], (header[3], _unpack(body, specs, copy=True))
                worker.assembly = _Assembly(header, specs)
            elif worker.assembly is None or header[2] != worker.assembly.request_id:
                raise ValueError(f"chunk {header[6]} of reply {header[2]} out of order")
            worker.assembly.add(header, body)
        except ValueError as exc:
            raise ConnectionError(f"worker {worker.rank} is out of step: {exc}") from exc
        done = worker.assembly
        if not done.complete:
            return None
        worker.assembly = None
        return done.request_id, (done.first[3], done.tensors)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def connect(
    workers: int | None = None, *, master_addr: str = "127.0.0.1", master_port: int | None = None, timeout: float = 30.0,
    fallback: str = "local", backend: str = "gloo", max_in_flight: int = 4,
) -> Mesh:  # fmt: skip
    """Join (or start) a mesh as the edge, rank 0.

    ``workers=n`` starts n local worker processes (``clisonix-gpu worker``) on 127.0.0.1. Without
    it, the ranks come from the environment that ``torchrun`` sets (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT``); run ``clisonix-gpu worker`` on the other ranks. ``timeout``
    is the per-request deadline in seconds; ``fallback`` is "local" or "raise";
    ``max_in_flight`` bounds the requests on the wire per worker. Raises ``ValueError`` for
    ``workers`` < 1, a bad ``fallback`` or ``max_in_flight`` < 1.

    Example:

    >>> from clisonix_gpu import mesh
    >>> x, w = torch.randn(300, 16), torch.randn(4, 16)
    >>> with mesh.connect(workers=2, timeout=30) as m:  # two local worker processes
    ...     y = m.offload("transform_matrix", x, w, activation="relu")
    ...     z = m.map("transform_matrix", x, w, activation="relu")  # rows split across both
    ...     alive = [s["alive"] for s in m.status()]
    >>> bool(torch.equal(y, cg.transform_matrix(x, w, activation="relu"))), bool(torch.equal(z, y)), alive
    (True, True, [True, True, True])
    """
    if fallback not in ("local", "raise"):
        raise ValueError(f"fallback must be 'local' or 'raise'; got {fallback!r}")
    if max_in_flight < 1:
        raise ValueError(f"max_in_flight must be >= 1; got {max_in_flight}")
    processes = []
    if workers is not None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1; got {workers}")
        port = master_port or _free_port()
        env = dict(os.environ, MASTER_ADDR=master_addr, MASTER_PORT=str(port), WORLD_SIZE=str(workers + 1))
        if master_addr == "127.0.0.1":
            env.setdefault("GLOO_SOCKET_IFNAME", "lo")
        # Local workers share the edge's cores. OpenMP threads that spin after each op of a worker
        # starve the transport threads of every process (measured: 256 KiB round trip p50 3.4 ms
        # with spinning, 1.0 ms without); sleeping at once costs the ops nothing measurable.
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
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
            inbox = _Inbox(rank, group)
            hello, _ = inbox.receive(max(timeout, 60))
            if hello[:2] != [MAGIC, VERSION] or hello[3] != HELLO:
                raise MeshError(f"rank {rank} did not greet as a worker of protocol version {VERSION}")
            kind = "cuda" if hello[_PARAMS_AT] else "cpu"
            device = alda.Device(kind, rank, max(hello[_PARAMS_AT + 1] / 1000, 1e-3))
            members.append(_Worker(rank, group, device, inbox, _Outbox(rank, group)))
    except Exception:
        for p in processes:
            p.kill()
        raise
    return Mesh(members, timeout=timeout, fallback=fallback, processes=processes, max_in_flight=max_in_flight)


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
