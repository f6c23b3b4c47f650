"""The edge's outbox without processes: a Gloo group stand-in whose sends complete only when the
test says so, to check when the outbox reuses a buffer and that it never waits for a send twice
or past a deadline. Every wait here is bounded."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from clisonix_gpu.mesh import transport, wire


class FakeSend:
    """A send that completes when ``deliver()`` is called; a wait for it blocks until then."""

    def __init__(self, message: np.ndarray):
        self.message = message
        self.delivered = threading.Event()
        self.waits = 0

    def deliver(self) -> None:
        self.delivered.set()

    def wait(self) -> bool:
        self.waits += 1
        if not self.delivered.wait(10):
            raise TimeoutError("a wait for an undelivered send did not end")
        return True


class FakeGroup:
    def __init__(self) -> None:
        self.sends: list[FakeSend] = []

    def send(self, tensors: list[torch.Tensor], peer: int, tag: int) -> FakeSend:
        work = FakeSend(tensors[0].numpy().copy())
        self.sends.append(work)
        return work


@pytest.fixture
def outbox(monkeypatch):
    monkeypatch.setattr(transport, "_peer_of", lambda group, rank: 1)
    group = FakeGroup()
    box = transport.Outbox(1, group, deadlines=True)
    yield box, group
    for work in group.sends:
        work.deliver()  # lets the outbox's thread end
    box.close()


def _request(box: transport.Outbox, request_id: int, give_up=None) -> None:
    x = torch.full((5,), float(request_id))
    box.send(wire.header(request_id, 7, (x,)), wire.Payload.of((x,)), give_up)


def _never_wait():
    raise AssertionError("the sender had to wait for a buffer")


def test_a_reply_frees_its_request_buffer_without_waiting_for_a_later_send(outbox):
    box, group = outbox
    _request(box, 10)
    _request(box, 11)  # both buffers now hold sends
    group.sends[0].deliver()  # Gloo wrote request 10 before the worker could answer it
    box.acknowledge(10)
    _request(box, 12, give_up=_never_wait)  # reuses request 10's buffer at once
    assert [work.waits for work in group.sends] == [1, 0, 0]  # no wait for request 11's send
    words, _ = wire.parse(group.sends[2].message.copy())
    assert words[wire.REQUEST_ID_AT] == 12
    box.acknowledge(999)  # an id it never sent (a late or foreign reply) changes nothing
    assert [work.waits for work in group.sends] == [1, 0, 0]


def test_a_sender_without_a_proven_buffer_waits_under_its_deadline(outbox):
    box, group = outbox
    _request(box, 10)
    _request(box, 11)
    until = time.monotonic() + 0.3
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        _request(box, 12, give_up=lambda: TimeoutError("deadline") if time.monotonic() > until else None)
    assert time.monotonic() - start < 2.0
    group.sends[0].deliver()  # the outbox's thread was waiting for the oldest send: it frees that buffer
    _request(box, 13, give_up=lambda: TimeoutError("no buffer freed") if time.monotonic() > until + 5 else None)
    assert [work.waits for work in group.sends] == [1, 0, 0]  # each send waited for at most once


def test_a_freed_buffer_goes_to_the_waiting_sender_without_a_wait_for_the_next_send(outbox):
    box, group = outbox
    _request(box, 10)
    _request(box, 11)
    until = time.monotonic() + 5
    waiting = threading.Thread(target=_request, args=(box, 12, lambda: TimeoutError("no buffer") if time.monotonic() > until else None))
    waiting.start()
    time.sleep(0.2)  # request 12 now waits for a buffer, and the outbox's thread for request 10's send
    group.sends[0].deliver()
    waiting.join(6)
    assert not waiting.is_alive() and len(group.sends) == 3
    time.sleep(0.1)  # room for the outbox's thread to take request 11's send, which nobody needs
    assert [work.waits for work in group.sends] == [1, 0, 0]


def test_flush_waits_for_every_send_and_gives_up_on_time(outbox):
    box, group = outbox
    _request(box, 10)
    _request(box, 11)
    until = time.monotonic() + 0.2
    with pytest.raises(TimeoutError):
        box.flush(lambda: TimeoutError("flush") if time.monotonic() > until else None)
    for work in group.sends:
        work.deliver()
    box.flush(lambda: TimeoutError("flush after delivery") if time.monotonic() > until + 5 else None)
    assert all(work.waits == 1 for work in group.sends)


class FakeReceives:
    """Receives that complete at once with the next of ``messages``, copied into the posted buffer."""

    def __init__(self, messages: list[np.ndarray]):
        self.messages = list(messages)

    def recv(self, tensors: list[torch.Tensor], peer: int, tag: int) -> FakeReceives:
        target, message = tensors[0].numpy(), self.messages.pop(0) if self.messages else np.zeros(0, np.uint8)
        target[: message.size] = message
        return self

    def wait(self) -> bool:
        return True


def test_inbox_views_read_each_message_in_place_and_never_serve_a_copy_twice(monkeypatch):
    """A worker's one-message request: the op reads views of the receive buffer, made once per
    buffer and specs. Tensors whose offsets do not suit their dtype are copies, made anew for
    every message (a kept copy would show an earlier message's values)."""
    monkeypatch.setattr(transport, "_peer_of", lambda group, rank: 1)
    rng = np.random.default_rng(11)
    aligned = [torch.from_numpy(rng.standard_normal(7, dtype=np.float32)) for _ in range(8)]
    # a 3-byte uint8 tensor first puts the float64 tensor after it at an odd offset: a copy
    misaligned = [(torch.arange(3, dtype=torch.uint8) + i, torch.full((2,), float(i), dtype=torch.float64)) for i in range(8)]
    messages = [wire.encode(i, 7, (t,))[0] for i, t in enumerate(aligned)] + [wire.encode(i, 7, pair)[0] for i, pair in enumerate(misaligned)]
    inbox = transport.Inbox(0, FakeReceives(messages))
    seen: dict[int, list[torch.Tensor]] = {}
    for expected in [(t,) for t in aligned] + misaligned:
        words, body = inbox.receive()
        specs, _ = wire.decode_specs(words, 1 << 20)
        got = inbox.views(body, specs)
        assert len(got) == len(expected)
        for g, e in zip(got, expected):
            assert g.dtype == e.dtype and torch.equal(g, e)
        if len(expected) == 1:  # in place: the same view objects for the same buffer
            again = seen.setdefault(got[0].data_ptr(), got)
            assert again is got
        else:
            assert got[1].data_ptr() not in {t.data_ptr() for views in seen.values() for t in views}
    assert len(seen) == transport.POSTED_RECEIVES + 1  # one entry per buffer the messages went through
