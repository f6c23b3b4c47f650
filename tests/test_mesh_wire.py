"""The mesh's wire format and allowlist without processes: round trips, fuzzed messages, bounds."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from clisonix_gpu.mesh import allowlist, wire
from clisonix_gpu.mesh.worker import check_request

SMALL_CHUNK = 64  # bytes per chunk in these tests, so that multi-chunk messages stay small


def _decode(messages, chunk_bytes=SMALL_CHUNK, max_bytes=1 << 20):
    """The receiving side: parse each message (through a buffer of the posted size, as a receive
    would), put the chunks together; returns (first header, tensors)."""
    assembly, first = None, None
    for message in messages:
        buffer = np.zeros(wire.message_bytes(chunk_bytes), dtype=np.uint8)
        buffer[: message.size] = message
        words, body = wire.parse(buffer, chunk_bytes)
        assert body is not None
        if assembly is None:
            first = words
            specs, _ = wire.decode_specs(words, max_bytes)
            assembly = wire.Assembly(words, specs, chunk_bytes)
        assembly.add(words, body)
    assert assembly is not None and assembly.complete
    return first, assembly.tensors


def _tensor(draw_dtype, shape, seed):
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=int(np.prod(shape)) * wire.ITEMSIZE[draw_dtype], dtype=np.uint8)
    return wire.tensor_of(raw.view(wire.NUMPY_DTYPE[draw_dtype]).reshape(shape), draw_dtype)


tensor_specs = st.lists(
    st.tuples(st.sampled_from(wire.DTYPES), st.lists(st.integers(0, 9), min_size=0, max_size=wire.MAX_NDIM)),
    min_size=0,
    max_size=wire.MAX_TENSORS,
)


@settings(max_examples=200, deadline=None)
@given(
    specs=tensor_specs,
    request_id=st.integers(0, 2**62),
    code=st.integers(0, 100),
    params=st.lists(st.integers(-(2**63), 2**63 - 1), max_size=wire.MAX_PARAMS),
    seed=st.integers(0, 2**32 - 1),
)
def test_messages_round_trip_bit_for_bit(specs, request_id, code, params, seed):
    assume(sum(math.prod(shape) * wire.ITEMSIZE[dtype] for dtype, shape in specs) <= 1 << 20)  # _decode's limit
    tensors = [_tensor(dtype, tuple(shape), seed + i) for i, (dtype, shape) in enumerate(specs)]
    messages = wire.encode(request_id, code, tensors, params, chunk_bytes=SMALL_CHUNK)
    total = sum(t.numel() * t.element_size() for t in tensors)
    assert len(messages) == max(1, -(-total // SMALL_CHUNK))
    first, back = _decode(messages)
    assert first[wire.MAGIC_AT] == wire.MAGIC and first[wire.VERSION_AT] == wire.VERSION
    assert first[wire.REQUEST_ID_AT] == request_id and first[wire.CODE_AT] == code
    assert first[wire.N_TENSORS_AT] == len(tensors) and first[wire.N_PARAMS_AT] == len(params)
    assert first[wire.PARAMS_AT : wire.PARAMS_AT + len(params)] == list(params)
    assert len(back) == len(tensors)
    for sent, got in zip(tensors, back):
        assert got.dtype == sent.dtype and got.shape == sent.shape
        assert np.array_equal(wire.byte_view(got), wire.byte_view(sent))  # bytes: NaN payloads included


def test_non_contiguous_bf16_and_bool_tensors_round_trip():
    x = torch.arange(40, dtype=torch.float32).reshape(5, 8)
    tensors = [x.t(), x[:, ::3].bfloat16(), x > 7, torch.tensor(3.5, dtype=torch.float64)]
    _, back = _decode(wire.encode(1, 7, tensors, chunk_bytes=SMALL_CHUNK))
    for sent, got in zip(tensors, back):
        assert got.dtype == sent.dtype and torch.equal(got, sent)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.bfloat16])
def test_encoding_leaves_the_callers_tensors_as_they_were(dtype):
    """Bytes are read through the data pointer: the tensor stays resizable (``Tensor.numpy()``
    would mark its storage not resizable for good), unmodified, and its view keeps it alive."""
    t = torch.arange(300).to(dtype)
    before = t.clone()
    view = wire.byte_view(t)
    wire.encode(7, 1, (t, t[::2]))
    assert torch.equal(t, before) and view.nbytes == t.numel() * t.element_size()
    t.resize_(4096)  # raises where the storage was marked not resizable
    again = torch.arange(5).to(dtype)
    kept = wire.byte_view(again)
    del again
    assert bytes(kept) == bytes(wire.byte_view(torch.arange(5).to(dtype)))
    assert wire.byte_view(torch.empty(0, dtype=dtype)).size == 0


def test_header_fields_sit_where_their_names_say():
    t = torch.zeros(2, 3, dtype=torch.int32)
    words = wire.header(42, 5, [t], [7, 8])
    assert len(words) == wire.HEADER_WORDS
    assert words[wire.REQUEST_ID_AT] == 42 and words[wire.CODE_AT] == 5
    assert words[wire.PARAMS_AT : wire.PARAMS_AT + 2] == [7, 8]
    assert words[wire.SPECS_AT : wire.SPECS_AT + 4] == [wire.DTYPE_CODE[torch.int32], 2, 2, 3]
    assert wire.SPECS_AT + wire.MAX_TENSORS * wire.SPEC_WORDS <= wire.HEADER_WORDS


@settings(max_examples=300, deadline=None)
@given(data=st.binary(min_size=0, max_size=wire.HEADER_BYTES + 200), cut=st.integers(0, 300))
def test_parse_of_arbitrary_bytes_never_fails_and_never_trusts_a_short_message(data, cut):
    """Random bytes, or a real message cut short: parse returns a header and either no body or a
    body whose trailer matched; the header and trailer words are zeroed for the next message."""
    buffer = np.zeros(wire.message_bytes(SMALL_CHUNK), dtype=np.uint8)
    real = wire.encode(3, 7, [torch.arange(10, dtype=torch.int64)], chunk_bytes=SMALL_CHUNK)[0]
    if data:
        buffer[: min(len(data), buffer.size)] = np.frombuffer(data, dtype=np.uint8)[: buffer.size]
    else:
        buffer[: min(cut, real.size)] = real[: min(cut, real.size)]
    words, body = wire.parse(buffer, SMALL_CHUNK)
    assert len(words) == wire.HEADER_WORDS
    if body is not None:
        assert body.size == words[wire.CHUNK_SIZE_AT] <= SMALL_CHUNK
    assert not buffer[: wire.HEADER_BYTES].any()
    if not data and cut < real.size:
        assert body is None  # a truncated message is never taken for a whole one


@settings(max_examples=400, deadline=None)
@given(
    words=st.lists(st.integers(-(2**63), 2**63 - 1), min_size=wire.HEADER_WORDS, max_size=wire.HEADER_WORDS),
    op=st.sampled_from(sorted(allowlist.OPS)),
)
def test_fuzzed_request_headers_are_accepted_or_refused_with_a_value_error(words, op):
    words[wire.CODE_AT] = op if words[0] % 2 else words[wire.CODE_AT]
    try:
        spec, (specs, total) = check_request(words, 1 << 31)
    except ValueError as exc:
        assert str(exc)
        return
    assert spec.n_tensors[0] <= len(specs) <= spec.n_tensors[1] and 0 <= total <= 1 << 31
    params = words[wire.PARAMS_AT : wire.PARAMS_AT + len(spec.params)]
    assert all(p.low <= v <= p.high for p, v in zip(spec.params, params))


def test_assembly_refuses_chunks_out_of_order_resized_or_with_a_changed_header():
    t = torch.arange(40, dtype=torch.uint8)
    messages = wire.encode(9, 7, [t], chunk_bytes=16)
    parsed = []
    for m in messages:
        buffer = np.zeros(wire.message_bytes(16), dtype=np.uint8)
        buffer[: m.size] = m
        parsed.append(wire.parse(buffer, 16))
    specs, _ = wire.decode_specs(parsed[0][0], 1 << 20)
    a = wire.Assembly(parsed[0][0], specs, 16)
    with pytest.raises(ValueError, match="chunk 1 of 16 bytes where chunk 0"):
        a.add(*parsed[1])
    a.add(*parsed[0])
    changed = list(parsed[1][0])
    changed[wire.PARAMS_AT] = 1
    with pytest.raises(ValueError, match="changes the header"):
        a.add(changed, parsed[1][1])


@pytest.mark.parametrize(
    ("op", "params", "message"),
    [
        ("svd_compress", {"k": 2, "power_iters": 10**9}, "power_iters=1000000000 outside the mesh's bounds [0, 64]"),
        ("svd_compress", {"k": 2, "oversample": -1}, "oversample=-1 outside"),
        ("svd_compress", {"k": 10**6}, "k=1000000 outside"),
        ("hamming_topk", {"k": 0}, "k=0 outside"),
        ("binary_matmul", {"n": 2**40}, "n=1099511627776 outside"),
    ],
)
def test_op_parameters_out_of_bounds_are_refused_at_the_edge(op, params, message):
    tensors = [torch.zeros(4, 4)] if op == "svd_compress" else [torch.zeros(2, 2, dtype=torch.uint8)] * 2
    with pytest.raises(ValueError, match=re.escape(message)):
        allowlist.encode_request(op, tensors, params)


def test_the_worker_refuses_out_of_bounds_parameters_that_skipped_the_edge():
    op_id = allowlist.OP_IDS["svd_compress"]
    words = wire.header(5, op_id, [torch.zeros(4, 4)], [2, 10, 10**9, 0])
    with pytest.raises(ValueError, match="power_iters"):
        check_request(words, 1 << 31)


def test_the_documented_limits_are_the_allowlists():
    text = (Path(__file__).resolve().parent.parent / "docs" / "mesh.md").read_text()
    assert allowlist.limits_table() in text
