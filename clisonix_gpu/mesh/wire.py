"""The mesh's wire format: how requests and replies become messages and back. No pickle, no
process, no torch.distributed here: every function works on NumPy buffers and is tested alone.

A request or reply is one or more messages. A message is a fixed header of ``HEADER_WORDS`` int64
words, up to ``CHUNK_BYTES`` of the tensors' raw bytes (padded to 8 bytes) and a trailer of 4
int64 words that repeats the request id, chunk index and chunk size. The payload is the tensors'
bytes back to back, cut into chunks; every chunk repeats the header. A message shorter than its
header says is caught by its trailer. A reply with a nonzero status carries one uint8 tensor: the
error message.

Header words, by name (the ``*_AT`` constants are their positions):

========================  ===================================================================
``MAGIC_AT``              ``MAGIC`` ("CLSX")
``VERSION_AT``            ``VERSION`` of the protocol
``REQUEST_ID_AT``         the request's id, chosen by the edge; a reply repeats it
``CODE_AT``               op id from the allowlist (request), status (reply), or a control code
``N_TENSORS_AT``          number of tensors, at most ``MAX_TENSORS``
``N_PARAMS_AT``           number of integer parameters, at most ``MAX_PARAMS``
``CHUNK_AT``              index of this message's chunk of the payload
``CHUNK_SIZE_AT``         bytes of payload in this message
``PARAMS_AT``             ``MAX_PARAMS`` words: the op's integer parameters
``SPECS_AT``              ``MAX_TENSORS`` specs of ``SPEC_WORDS`` words: dtype code, ndim, shape
========================  ===================================================================
"""

from __future__ import annotations

import ctypes
import math
import struct
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from ..ops.utils import cdiv

MAGIC = 0x434C5358  # "CLSX"
VERSION = 3
HEADER_WORDS = 64
MAX_TENSORS = 4
MAX_PARAMS = 4
MAX_NDIM = 6
MAX_DIM = 2**31 - 1

# header word positions
MAGIC_AT, VERSION_AT, REQUEST_ID_AT, CODE_AT, N_TENSORS_AT, N_PARAMS_AT, CHUNK_AT, CHUNK_SIZE_AT = range(8)
PARAMS_AT = 8
SPECS_AT = PARAMS_AT + MAX_PARAMS
SPEC_WORDS = 2 + MAX_NDIM  # dtype code, ndim, shape padded with zeros

# control codes of requests (edge to worker) and of the worker's greeting; op ids start above them
SHUTDOWN, HELLO = 0, 1
STATUS_OK, STATUS_BAD_REQUEST, STATUS_OP_FAILED = 0, 1, 2

HEADER_BYTES = HEADER_WORDS * 8
TRAILER_MAGIC = 0x434C5354  # "CLST"
TRAILER_WORDS = 4
TRAILER_BYTES = TRAILER_WORDS * 8
# header and trailer words in native byte order, as NumPy's int64 views of the same buffer hold
# them; struct packs a few dozen integers into a buffer in a fraction of NumPy's per-call cost
HEADER_STRUCT = struct.Struct(f"={HEADER_WORDS}q")
TRAILER_STRUCT = struct.Struct(f"={TRAILER_WORDS}q")
_ZERO_HEADER, _ZERO_TRAILER, _ZERO_PAD = bytes(HEADER_BYTES), bytes(TRAILER_BYTES), bytes(8)
# A request up to 4 MiB (a 1024^2 float32 image) is one message each way. Posted buffers stay
# virtual memory until messages fill them, so small messages touch only their first pages.
CHUNK_BYTES = 4 << 20

# dtype codes on the wire: a dtype's position in this list
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.uint8, torch.int32, torch.int64, torch.bool]
DTYPE_CODE = {d: i for i, d in enumerate(DTYPES)}
ITEMSIZE = {d: torch.empty(0, dtype=d).element_size() for d in DTYPES}
# NumPy dtypes of the same bytes (bfloat16, which NumPy lacks, as int16)
NUMPY_DTYPE = {d: np.dtype(np.int16) if d == torch.bfloat16 else torch.empty(0, dtype=d).numpy().dtype for d in DTYPES}

TensorSpec = tuple[torch.dtype, tuple[int, ...]]
Specs = tuple[list[TensorSpec], int]  # tensor specs and their bytes in all


def message_bytes(chunk_bytes: int = CHUNK_BYTES) -> int:
    """Bytes of the longest message: every posted receive has this size."""
    return HEADER_BYTES + chunk_bytes + TRAILER_BYTES


_HEADER_START = [MAGIC, VERSION] + [0] * (HEADER_WORDS - 2)


def header(request_id: int, code: int, tensors: Sequence[torch.Tensor], params: Sequence[int] = ()) -> list[int]:
    """The header words of a request (code = op id) or a reply (code = status); chunk fields zero."""
    words = _HEADER_START.copy()
    words[REQUEST_ID_AT] = request_id
    words[CODE_AT] = code
    words[N_TENSORS_AT] = len(tensors)
    if params:
        words[N_PARAMS_AT] = len(params)
        words[PARAMS_AT : PARAMS_AT + len(params)] = [int(p) for p in params]
    base = SPECS_AT
    for t in tensors:
        shape = t.shape
        words[base : base + 2 + len(shape)] = [DTYPE_CODE[t.dtype], len(shape), *shape]
        base += SPEC_WORDS
    return words


_SPECS_SEEN: dict[tuple[int, ...], Specs] = {}  # decoded specs by their header words


def decode_specs(words: Sequence[int], max_bytes: int) -> Specs:
    """Tensor (dtype, shape) pairs of a header and their total bytes; ``ValueError`` naming the
    first field out of range. Services repeat a few shapes: specs that passed once are looked up."""
    count = words[N_TENSORS_AT]
    key = (max_bytes, count, *words[SPECS_AT : SPECS_AT + MAX_TENSORS * SPEC_WORDS])
    found = _SPECS_SEEN.get(key)
    if found is None:
        found = _check_specs(words, count, max_bytes)
        if len(_SPECS_SEEN) >= 1024:
            _SPECS_SEEN.clear()
        _SPECS_SEEN[key] = found
    return found


def _check_specs(words: Sequence[int], count: int, max_bytes: int) -> Specs:
    if not 0 <= count <= MAX_TENSORS:
        raise ValueError(f"tensor count {count} outside [0, {MAX_TENSORS}]")
    specs: list[TensorSpec] = []
    total = 0
    for i in range(count):
        base = SPECS_AT + i * SPEC_WORDS
        code, ndim = words[base], words[base + 1]
        if not 0 <= code < len(DTYPES):
            raise ValueError(f"tensor {i}: dtype code {code} unknown")
        if not 0 <= ndim <= MAX_NDIM:
            raise ValueError(f"tensor {i}: ndim {ndim} outside [0, {MAX_NDIM}]")
        shape = tuple(words[base + 2 : base + 2 + ndim])
        if any(not 0 <= d <= MAX_DIM for d in shape):
            raise ValueError(f"tensor {i}: shape {shape} has a dimension outside [0, {MAX_DIM}]")
        total += math.prod(shape) * ITEMSIZE[DTYPES[code]]
        if total > max_bytes:
            raise ValueError(f"tensors exceed the {max_bytes}-byte request limit")
        specs.append((DTYPES[code], shape))
    return specs, total


def byte_view(t: torch.Tensor) -> np.ndarray:
    """A tensor's bytes as a flat uint8 NumPy array: a view unless ``t`` is off the CPU or not
    contiguous (then a copy's). Read through the data pointer, which also costs less than
    ``Tensor.numpy()``: that marks the storage not resizable for good, a change to the caller's
    tensor. The array holds the tensor alive."""
    t = _readable(t)
    nbytes = t.numel() * t.element_size()
    if nbytes == 0:
        return np.empty(0, dtype=np.uint8)
    memory = (ctypes.c_char * nbytes).from_address(t.data_ptr())
    memory.keep = t  # type: ignore[attr-defined]  # the NumPy array holds ``memory``, which holds the tensor
    return np.frombuffer(memoryview(memory).cast("B"), dtype=np.uint8)


def _readable(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself where its bytes can be read in place (a contiguous CPU tensor), else a copy that can."""
    if not t.is_cpu:
        t = t.detach().cpu()
    if not t.is_contiguous():
        t = t.detach().contiguous()
    return t


class MessageBuffer:
    """A buffer that messages are built in or received into, with what each message's work needs
    made once: its bytes as a memoryview (``struct`` packs and unpacks through it), its address
    (payload bytes move by ``memmove``) and a tensor of the same memory (what Gloo sends or fills)."""

    __slots__ = ("array", "view", "address", "tensor")

    def __init__(self, array: np.ndarray):
        self.array = array  # flat uint8, 8-byte aligned
        self.view = array.data
        self.address = array.ctypes.data
        self.tensor = torch.from_numpy(array)


class Payload:
    """The raw bytes of some tensors or arrays as one address space, without copies of contiguous
    CPU tensors: requests and replies are cut into chunks from it (``read``) and put back into it
    (``write``). Bytes move by ``memmove`` between addresses taken once per part: no NumPy view
    of a tensor is made per request. A payload holds its parts alive."""

    __slots__ = ("addresses", "sizes", "total", "_keep")

    def __init__(self, parts: Sequence[np.ndarray | torch.Tensor]):
        """``parts``: C-contiguous arrays or contiguous CPU tensors, their bytes in order."""
        self._keep = parts
        self.addresses = [part.ctypes.data if isinstance(part, np.ndarray) else part.data_ptr() for part in parts]
        self.sizes = [part.nbytes for part in parts]
        self.total = sum(self.sizes)

    @classmethod
    def of(cls, tensors: Sequence[torch.Tensor]) -> Payload:
        return cls([_readable(t) for t in tensors])

    def _spans(self, offset: int, n: int) -> Iterator[tuple[int, int, int]]:
        """(address in a part, its start in the range, bytes) covering bytes [offset, offset + n)."""
        start = 0
        for address, size in zip(self.addresses, self.sizes):
            lo, hi = max(offset, start), min(offset + n, start + size)
            if lo < hi:
                yield address + lo - start, lo - offset, hi - lo
            start += size

    def read(self, offset: int, address: int, n: int) -> None:
        """Copy bytes [offset, offset + n) to ``address``."""
        if len(self.sizes) == 1:  # the common case, without the span walk
            if n:
                ctypes.memmove(address, self.addresses[0] + offset, n)
            return
        for source, at, size in self._spans(offset, n):
            ctypes.memmove(address + at, source, size)

    def write(self, offset: int, address: int, n: int) -> None:
        """Copy ``n`` bytes from ``address`` to bytes [offset, offset + n)."""
        if len(self.sizes) == 1:
            if n:
                ctypes.memmove(self.addresses[0] + offset, address, n)
            return
        for target, at, size in self._spans(offset, n):
            ctypes.memmove(target, address + at, size)


def n_chunks(total: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Messages a payload of ``total`` bytes takes (an empty payload still takes one)."""
    return max(1, cdiv(total, chunk_bytes))


def fill(buffer: MessageBuffer | np.ndarray, words: list[int], chunk: int, payload: Payload, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Write message ``chunk`` of a request or reply into ``buffer`` (at least
    ``message_bytes(chunk_bytes)``, 8-byte aligned); returns the message's length in bytes.
    Sets the chunk fields of ``words``."""
    if not isinstance(buffer, MessageBuffer):
        buffer = MessageBuffer(buffer)
    size = min(chunk_bytes, payload.total - chunk * chunk_bytes)
    words[CHUNK_AT], words[CHUNK_SIZE_AT] = chunk, size
    HEADER_STRUCT.pack_into(buffer.view, 0, *words)
    payload.read(chunk * chunk_bytes, buffer.address + HEADER_BYTES, size)
    end = HEADER_BYTES + ((size + 7) & -8)  # the payload padded to 8 bytes
    if end > HEADER_BYTES + size:
        buffer.view[HEADER_BYTES + size : end] = _ZERO_PAD[: end - HEADER_BYTES - size]
    TRAILER_STRUCT.pack_into(buffer.view, end, TRAILER_MAGIC, words[REQUEST_ID_AT], chunk, size)
    return end + TRAILER_BYTES


def encode(
    request_id: int, code: int, tensors: Sequence[torch.Tensor], params: Sequence[int] = (), chunk_bytes: int = CHUNK_BYTES
) -> list[np.ndarray]:
    """Every message of a request or reply, each a fresh uint8 array (the transport fills reused
    buffers with :func:`fill` instead)."""
    words, payload = header(request_id, code, tensors, params), Payload.of(tensors)
    messages = []
    for chunk in range(n_chunks(payload.total, chunk_bytes)):
        buffer = np.empty(message_bytes(chunk_bytes), dtype=np.uint8)
        messages.append(buffer[: fill(buffer, words, chunk, payload, chunk_bytes)])
    return messages


def parse(buffer: MessageBuffer | np.ndarray, chunk_bytes: int = CHUNK_BYTES) -> tuple[list[int], np.ndarray | None]:
    """``(header words, chunk bytes)`` of the message at the start of ``buffer`` (8-byte aligned,
    at least a header long); the bytes are a view of ``buffer``, and ``None`` when the trailer does
    not match the header (the message is shorter than its header says). The header and trailer
    words are zeroed afterwards, so that a later, shorter message in the same buffer cannot show
    them as its own."""
    if not isinstance(buffer, MessageBuffer):
        buffer = MessageBuffer(buffer)
    view = buffer.view
    words = list(HEADER_STRUCT.unpack_from(view, 0))
    view[:HEADER_BYTES] = _ZERO_HEADER
    size = words[CHUNK_SIZE_AT]
    if not 0 <= size <= chunk_bytes:
        return words, None
    at = HEADER_BYTES + ((size + 7) & -8)  # the payload padded to 8 bytes
    if at + TRAILER_BYTES > len(view):
        return words, None
    intact = TRAILER_STRUCT.unpack_from(view, at) == (TRAILER_MAGIC, words[REQUEST_ID_AT], words[CHUNK_AT], size)
    view[at : at + TRAILER_BYTES] = _ZERO_TRAILER
    return words, buffer.array[HEADER_BYTES : HEADER_BYTES + size] if intact else None


def tensor_of(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """``array`` (of ``NUMPY_DTYPE[dtype]``) as a tensor of ``dtype``, sharing its memory."""
    t = torch.from_numpy(array)
    return t.view(dtype) if dtype == torch.bfloat16 else t


def unpack(body: np.ndarray, specs: list[TensorSpec], copy: bool) -> list[torch.Tensor]:
    """The tensors of ``specs`` laid back to back in one message's ``body``: views of it where
    ``copy`` is False and a tensor's offset suits its dtype (:func:`_in_place`), else copies."""
    tensors, offset = [], 0
    for dtype, shape in specs:
        size = math.prod(shape) * ITEMSIZE[dtype]
        part = body[offset : offset + size]
        if copy or not _in_place(offset, dtype):
            part = part.copy()
        tensors.append(tensor_of(part.view(NUMPY_DTYPE[dtype]).reshape(shape), dtype))
        offset += size
    return tensors


def _in_place(offset: int, dtype: torch.dtype) -> bool:
    """Can a tensor of ``dtype`` at ``offset`` in a body be a view of it (the body is 8-byte aligned)?"""
    return offset % ITEMSIZE[dtype] == 0


def unpacks_in_place(specs: list[TensorSpec]) -> bool:
    """Does :func:`unpack` without ``copy`` give views for every tensor of ``specs``?"""
    offset = 0
    for dtype, shape in specs:
        if not _in_place(offset, dtype):
            return False
        offset += math.prod(shape) * ITEMSIZE[dtype]
    return True


class Assembly:
    """A request or reply put together from its chunks, in order, into tensors of its specs."""

    def __init__(self, first: list[int], specs: list[TensorSpec], chunk_bytes: int = CHUNK_BYTES):
        self.first = first
        self.chunk_bytes = chunk_bytes
        arrays = [np.empty(shape, dtype=NUMPY_DTYPE[dtype]) for dtype, shape in specs]
        self.tensors = [tensor_of(a, dtype) for a, (dtype, _) in zip(arrays, specs)]
        self._bytes = Payload(arrays)
        self.total = self._bytes.total
        self.n_chunks = n_chunks(self.total, chunk_bytes)
        self.next_chunk = 0

    @property
    def request_id(self) -> int:
        return self.first[REQUEST_ID_AT]

    @property
    def complete(self) -> bool:
        return self.next_chunk == self.n_chunks

    def add(self, words: list[int], body: np.ndarray) -> None:
        """Append the next chunk; ``ValueError`` if it is out of order, the wrong size or its header changed."""
        chunk, size = words[CHUNK_AT], words[CHUNK_SIZE_AT]
        expected = min(self.chunk_bytes, self.total - self.next_chunk * self.chunk_bytes)
        if chunk != self.next_chunk or size != expected:
            raise ValueError(f"chunk {chunk} of {size} bytes where chunk {self.next_chunk} of {expected} bytes was due")
        if chunk and (words[:CHUNK_AT] != self.first[:CHUNK_AT] or words[PARAMS_AT:] != self.first[PARAMS_AT:]):
            raise ValueError(f"chunk {chunk} changes the header of request {self.request_id}")
        self._bytes.write(chunk * self.chunk_bytes, body.ctypes.data, size)
        self.next_chunk += 1
