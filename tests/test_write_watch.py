"""The kernel's record of writes to a weight's pages, which replaces the per-call hash of NumPy and
other untracked weights of 1 MiB or more: every way of writing the memory must show, and memory
it cannot vouch for must fall back to the hash."""

from __future__ import annotations

import ctypes
import gc
import mmap
import os
import threading

import numpy as np
import pytest
import torch
from packed_helpers import empty_cache, fresh, run_at_once, same  # noqa: F401 (empty_cache: an autouse fixture)

import clisonix_gpu as cg
from clisonix_gpu.ops import _packed_gemm, _write_watch

pytestmark = pytest.mark.skipif(_packed_gemm._mkl_ops() is None, reason="this torch build has no MKL packed GEMM")

PAGE = mmap.PAGESIZE
N, K = 513, 1031  # 2.1 MB of float32: watched; odd sizes, so rows and pages never line up


def _supported() -> bool:
    buffer = np.zeros(2 << 20, np.uint8)
    page_watch = _write_watch.watch(buffer.ctypes.data, buffer.nbytes)
    if page_watch is None:
        return False
    page_watch.close()
    return True


needs_watch = pytest.mark.skipif(not _supported(), reason="no asynchronous write-protect tracking (Linux 6.7+, userfaultfd) here")


def _proofs():
    return [type(entry.proof).__name__ for entry in _packed_gemm._cache.values()]


def _read_into(view: np.ndarray) -> None:
    """The kernel writes the bytes (``read`` from a pipe), not this process's code."""
    data = np.random.default_rng(1).standard_normal(view.size, dtype=np.float32).tobytes()
    reader, writer = os.pipe()
    try:
        threading.Thread(target=os.write, args=(writer, data)).start()
        got = 0
        target = memoryview(view).cast("B")
        while got < len(data):
            got += os.readv(reader, [target[got:]])
    finally:
        os.close(reader)
        os.close(writer)


def _process_vm_write(view: np.ndarray) -> None:
    """Another process's way in (here our own pid): ``process_vm_writev``."""
    libc = ctypes.CDLL(None, use_errno=True)

    class IoVec(ctypes.Structure):
        _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]

    data = np.full(view.size, 7.0, np.float32)
    local, remote = IoVec(data.ctypes.data, data.nbytes), IoVec(view.ctypes.data, data.nbytes)
    libc.process_vm_writev.restype = ctypes.c_ssize_t
    assert libc.process_vm_writev(os.getpid(), ctypes.byref(local), 1, ctypes.byref(remote), 1, 0) == data.nbytes


def _proc_mem_write(view: np.ndarray) -> None:
    """A debugger's way in: ``/proc/self/mem``."""
    fd = os.open("/proc/self/mem", os.O_RDWR)
    try:
        os.pwrite(fd, np.full(view.size, 5.0, np.float32).tobytes(), view.ctypes.data)
    finally:
        os.close(fd)


WRITES = {
    "one-element": lambda w: w.__setitem__((N // 2, K // 3), w[N // 2, K // 3] + 1),
    "first-element": lambda w: w.__setitem__((0, 0), -w[0, 0]),  # on the page shared with other data
    "last-element": lambda w: w.__setitem__((N - 1, K - 1), 7.0),
    "earlier-view": None,  # a view made before the pack (below)
    "other-thread": lambda w: _in_thread(lambda: w[100].__imul__(2)),
    "memmove": lambda w: ctypes.memmove(w[200:].ctypes.data, np.full(K, 3.0, np.float32).ctypes.data, 4 * K),
    "kernel-read": lambda w: _read_into(w[300]),
    "process-vm-writev": lambda w: _process_vm_write(w[400, 10:20]),
    "proc-self-mem": lambda w: _proc_mem_write(w[450, 3:9]),
    "same-values": lambda w: np.copyto(w, w.copy()),
}


def _in_thread(fn):
    thread = threading.Thread(target=fn)
    thread.start()
    thread.join()


@needs_watch
@pytest.mark.parametrize("how", list(WRITES))
@pytest.mark.parametrize("kind", ["numpy", "from_numpy"])
def test_every_write_to_a_watched_weight_is_seen(rng, how, kind):
    x = rng.standard_normal((3, K), dtype=np.float32)
    array = rng.standard_normal((N, K), dtype=np.float32)
    earlier = array[5:9, 10:20]
    w = array if kind == "numpy" else torch.from_numpy(array)
    x_in = x if kind == "numpy" else torch.from_numpy(x)
    before = cg.transform_matrix(x_in, w, None, "silu")
    assert _proofs() == ["PageWatch"] and _packed_gemm.cache_info()["watched"] == 1
    assert same(cg.transform_matrix(x_in, w, None, "silu"), before)  # unchanged: the pack serves
    if how == "earlier-view":
        earlier += 1.0
    else:
        WRITES[how](array)
    after = cg.transform_matrix(x_in, w, None, "silu")
    assert same(after, fresh(x_in, w))
    if how != "same-values":
        assert not same(after, before)


@needs_watch
def test_an_unaligned_weight_watches_whole_pages_and_compares_the_rest(rng):
    """A weight that starts and ends inside pages: writes to the neighbours on those pages are not
    writes to it, writes to its own bytes there are."""
    base = rng.standard_normal(N * K + 2 * PAGE, dtype=np.float32)
    start = (-base.ctypes.data // 4) % (PAGE // 4) + 3  # three floats into a page
    w = base[start : start + N * K].reshape(N, K)
    x = rng.standard_normal((2, K), dtype=np.float32)
    first = cg.transform_matrix(x, w)
    base[start - 1] = 9.0  # a neighbour on the first page
    base[start + N * K] = 9.0  # a neighbour on the last page
    calls = []
    real_pack = _packed_gemm._pack
    _packed_gemm._pack = lambda *args: calls.append(args) or real_pack(*args)
    try:
        assert same(cg.transform_matrix(x, w), first) and calls == []
        w[0, 0] += 1.0
        w[-1, -1] += 1.0
        again = cg.transform_matrix(x, w)
        assert len(calls) == 1
    finally:
        _packed_gemm._pack = real_pack
    assert same(again, fresh(x, w, activation=None))


@needs_watch
def test_dropped_pages_count_as_written():
    """``madvise(MADV_DONTNEED)`` turns private pages to zeros without a write."""
    buffer = mmap.mmap(-1, 64 * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    array = np.frombuffer(buffer, np.uint8)
    array[:] = 1
    page_watch = _write_watch.watch(array.ctypes.data, array.nbytes)
    try:
        if page_watch is None:  # under 256 pages: check the mechanism directly
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(_write_watch, "_MIN_PAGES", 16)
                page_watch = _write_watch.watch(array.ctypes.data, array.nbytes)
        assert page_watch is not None and not page_watch.written()
        buffer.madvise(mmap.MADV_DONTNEED, 10 * PAGE, PAGE)
        assert array[10 * PAGE] == 0 and page_watch.written()
    finally:
        page_watch.close()
        del array
        buffer.close()


def test_memory_it_cannot_vouch_for_is_hashed(rng, tmp_path):
    """Shared memory and file mappings can be written through other mappings: no watch, the hash
    instead, and writes through the other mapping are still seen."""
    shared = mmap.mmap(-1, N * K * 4)  # MAP_SHARED anonymous memory
    other = np.frombuffer(shared, np.float32).reshape(N, K)
    other[:] = rng.standard_normal((N, K), dtype=np.float32)
    w = np.frombuffer(shared, np.float32).reshape(N, K)  # a second array over the same memory
    assert _write_watch.watch(w.ctypes.data, w.nbytes) is None
    path = tmp_path / "w.bin"
    rng.standard_normal((N, K), dtype=np.float32).tofile(path)
    mapped = np.memmap(path, np.float32, "r+", shape=(N, K))
    assert _write_watch.watch(mapped.ctypes.data, mapped.nbytes) is None
    x = rng.standard_normal((2, K), dtype=np.float32)
    for weight, writer in ((w, other), (mapped, np.memmap(path, np.float32, "r+", shape=(N, K)))):
        before = cg.transform_matrix(x, weight)
        assert _packed_gemm.cache_info()["watched"] == 0
        writer[7, 7] += 1.0
        after = cg.transform_matrix(x, weight)
        assert same(after, fresh(x, weight, activation=None)) and not same(after, before)
    del w, other, weight, writer, mapped
    gc.collect()
    shared.close()


@needs_watch
def test_two_weights_over_the_same_memory_do_not_share_a_watch(rng):
    """A watch is reset when its weight is packed again, which would hide a write from a second
    watch over the same pages: the second weight is hashed instead."""
    array = rng.standard_normal((N, K), dtype=np.float32)
    alias = array.view()
    x = rng.standard_normal((2, K), dtype=np.float32)
    cg.transform_matrix(x, array)
    cg.transform_matrix(x, alias)
    assert sorted(_proofs()) == ["PageWatch", "tuple"]
    array[1, 1] += 1.0
    assert same(cg.transform_matrix(x, array), fresh(x, array, activation=None))  # repacks and re-arms
    assert same(cg.transform_matrix(x, alias), fresh(x, alias, activation=None))


@needs_watch
def test_watches_end_with_their_weights(rng):
    x = rng.standard_normal((2, K), dtype=np.float32)
    w = rng.standard_normal((N, K), dtype=np.float32)
    cg.transform_matrix(x, w)
    assert len(_write_watch._watched) == 1
    del w
    gc.collect()
    assert _write_watch._watched == {} and _packed_gemm.cache_info()["weights"] == 0
    w = rng.standard_normal((N, K), dtype=np.float32)
    cg.transform_matrix(x, w)
    cg.release_packed_weights()
    assert _write_watch._watched == {}


@needs_watch
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_never_trusts_its_parents_watch():
    """A child's inherited descriptors read its parent's pages: to the child, the watch reports
    written whatever happened; the child's writes (to its copy) leave the parent's watch clean."""
    buffer = np.ones(1 << 20, np.float32)
    page_watch = _write_watch.watch(buffer.ctypes.data, buffer.nbytes)
    assert page_watch is not None
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no pytest, no MKL, only the watch and a byte to the parent
        try:
            before = page_watch.written()
            buffer[12345] = 2.0
            os.write(writer, bytes([before, page_watch.written()]))
        finally:
            os._exit(0)
    os.close(writer)
    try:
        answer = os.read(reader, 2)
    finally:
        os.close(reader)
        os.waitpid(pid, 0)
    assert answer == bytes([True, True])
    assert not page_watch.written() and buffer[12345] == 1.0
    page_watch.close()
    assert page_watch.written()  # closed: nothing is vouched for any more


def test_small_buffers_and_unsupported_kernels_decline(monkeypatch):
    small = np.zeros(255 * PAGE // 4 + 1, np.float32)
    assert _write_watch.watch(small.ctypes.data, small.nbytes) is None
    big = np.zeros((N, K), np.float32)
    monkeypatch.setattr(_write_watch, "_kernel", lambda pid: None)
    assert _write_watch.watch(big.ctypes.data, big.nbytes) is None


@needs_watch
def test_threads_reading_one_watch_never_force_a_repack(rng, monkeypatch):
    """Calls from several threads share the weight's watch: none of them sees a write that did
    not happen (which would pack the weight again), and all get the same bits."""
    x = rng.standard_normal((4, K), dtype=np.float32)
    w = rng.standard_normal((N, K), dtype=np.float32)
    expected = cg.transform_matrix(x, w, None, "gelu")
    packs = []
    real_pack = _packed_gemm._pack
    monkeypatch.setattr(_packed_gemm, "_pack", lambda *args: packs.append(args) or real_pack(*args))
    results = []

    def serve():
        for _ in range(30):
            results.append(cg.transform_matrix(x, w, None, "gelu"))

    run_at_once(lambda _: serve(), range(4))
    assert packs == [] and len(results) == 120 and all(same(r, expected) for r in results)
