"""Whether a buffer in this process's memory was written since a point in time, without reading it.

The kernel keeps the record: the buffer's pages are registered with a userfaultfd in asynchronous
write-protect mode (Linux 6.7 and newer), which write-protects them; the first write to a page,
from any thread, from the kernel on the process's behalf (``read`` into the buffer) or from another
process through ``process_vm_writev`` or ``/proc/PID/mem``, makes the kernel lift the protection
and so marks the page written, without stopping the writer. The ``PAGEMAP_SCAN`` ioctl of
``/proc/self/pagemap`` reads those marks for a range in microseconds: about 30 us for 64 MB in
huge pages and 200 us in 4 KiB pages, against 2-5 ms to hash 64 MB. A page whose memory was
dropped (``madvise(MADV_DONTNEED)``) shows as written, and one no longer registered as not
protected, which counts as written too.

What it cannot see, so it is used only where that cannot happen:

- writes through another mapping of the same memory (a file mapping, shared memory): only private
  anonymous memory is watched (``/proc/self/maps`` says which memory is), and a page that turns
  out to belong to a file or to shared memory counts as written;
- a device writing into pinned host memory by DMA (``cudaHostRegister`` on a NumPy array's
  memory), which bypasses page tables: call ``release_packed_weights()`` after such a copy;
- a forked child inherits the parent's descriptors, which read the parent's memory, so a watch
  made in another process always reports written.

The bytes before the first and after the last whole page of the buffer share their pages with
other data, whose writes would mark those pages: they are compared byte for byte instead.

Registering splits the memory's mapping (at most two more entries in ``/proc/self/maps`` per
watch), and while a watch lasts no other userfaultfd can register that memory (the weight's cache
entry ends it: ``release_packed_weights()``); :meth:`PageWatch.close` undoes both. Anything the kernel refuses (older kernels,
``vm.unprivileged_userfaultfd`` rules, seccomp, other architectures) makes :func:`watch` return
None, and the caller falls back to hashing.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import sys
import threading
from typing import NamedTuple

__all__ = ["PageWatch", "watch"]

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_MIN_PAGES = 256  # a smaller buffer (under 1 MiB in 4 KiB pages) is hashed instead: that costs under 0.1 ms
_USERFAULTFD_SYSCALL = {"x86_64": 323, "aarch64": 282}

# <linux/userfaultfd.h>
_UFFD_USER_MODE_ONLY = 1
_UFFD_API = 0xAA
_UFFD_FEATURE_WP_UNPOPULATED = 1 << 13
_UFFD_FEATURE_WP_ASYNC = 1 << 15
_UFFDIO_API = 0xC018AA3F
_UFFDIO_REGISTER = 0xC020AA00
_UFFDIO_UNREGISTER = 0x8010AA01
_UFFDIO_WRITEPROTECT = 0xC018AA06
_UFFDIO_REGISTER_MODE_WP = 1 << 1
_UFFDIO_WRITEPROTECT_MODE_WP = 1 << 0
# <linux/fs.h>
_PAGEMAP_SCAN = 0xC0606610
_PAGE_IS_WPALLOWED, _PAGE_IS_WRITTEN, _PAGE_IS_FILE = 1 << 0, 1 << 1, 1 << 2


class _UffdioApi(ctypes.Structure):
    _fields_ = [("api", ctypes.c_uint64), ("features", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class _UffdioRange(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _UffdioRegister(ctypes.Structure):
    _fields_ = [("range", _UffdioRange), ("mode", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class _UffdioWriteprotect(ctypes.Structure):
    _fields_ = [("range", _UffdioRange), ("mode", ctypes.c_uint64)]


class _PageRegion(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("end", ctypes.c_uint64), ("categories", ctypes.c_uint64)]


class _PmScanArg(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_uint64)
        for name in (
            "size", "flags", "start", "end", "walk_end", "vec", "vec_len", "max_pages",
            "category_inverted", "category_mask", "category_anyof_mask", "return_mask",
        )
    ]  # fmt: skip


class _Kernel(NamedTuple):
    """This process's userfaultfd and ``/proc/self/pagemap`` descriptors."""

    libc: ctypes.CDLL
    uffd: int
    pagemap: int


@functools.cache
def _kernel(pid: int) -> _Kernel | None:
    """The descriptors for process ``pid`` (the caller), opened on first use; None where the kernel
    or the platform lacks asynchronous write-protect tracking."""
    number = _USERFAULTFD_SYSCALL.get(platform.machine())
    if not sys.platform.startswith("linux") or number is None:
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
    # user-mode faults only: the mode unprivileged processes may use; asynchronous write-protect
    # faults never reach a handler, so writes from the kernel are tracked all the same
    uffd = int(libc.syscall(number, os.O_CLOEXEC | os.O_NONBLOCK | _UFFD_USER_MODE_ONLY))
    if uffd < 0:
        return None
    api = _UffdioApi(_UFFD_API, _UFFD_FEATURE_WP_ASYNC | _UFFD_FEATURE_WP_UNPOPULATED, 0)
    try:
        if libc.ioctl(uffd, _UFFDIO_API, ctypes.byref(api)) != 0:
            raise OSError(ctypes.get_errno(), "UFFDIO_API")
        pagemap = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        os.close(uffd)
        return None
    return _Kernel(libc, uffd, pagemap)


_lock = threading.Lock()  # for making watches: a new one must not overlap another
_watched: dict[int, tuple[int, int]] = {}  # id(PageWatch) -> its page range: watches never overlap


class PageWatch:
    """The record of writes to one buffer since :func:`watch` (see the module docstring)."""

    def __init__(self, kernel: _Kernel, address: int, nbytes: int, first: int, last: int) -> None:
        self._kernel, self._pid = kernel, os.getpid()
        self._first, self._last = first, last  # the whole pages watched: [first, last)
        self._address, self._nbytes = address, nbytes
        self._edges_then = self._edges()
        self._scan = _PmScanArg(
            size=ctypes.sizeof(_PmScanArg), start=first, end=last, vec_len=1, max_pages=1,
            category_inverted=_PAGE_IS_WPALLOWED,
            category_anyof_mask=_PAGE_IS_WRITTEN | _PAGE_IS_FILE | _PAGE_IS_WPALLOWED,
            return_mask=_PAGE_IS_WRITTEN | _PAGE_IS_FILE | _PAGE_IS_WPALLOWED,
        )  # fmt: skip
        self._found = _PageRegion()
        self._scan.vec = ctypes.addressof(self._found)
        self._scanning = threading.Lock()  # the kernel writes into the scan's arguments
        self._open = True

    def written(self) -> bool:
        """Whether any byte of the buffer may have been written since the watch began: a page
        written, of a file or shared memory, or no longer protected; another process asking; the
        bytes on shared pages changed; or the watch closed."""
        if not self._open or os.getpid() != self._pid:
            return True
        scan = self._scan
        with self._scanning:
            scan.walk_end = 0
            found = self._kernel.libc.ioctl(self._kernel.pagemap, _PAGEMAP_SCAN, ctypes.byref(scan))
            if found != 0 or scan.walk_end != self._last:
                return True
        return self._edges() != self._edges_then

    def _edges(self) -> tuple[bytes, bytes]:
        """The buffer's bytes before its first and after its last whole page (pages it shares)."""
        address, last = self._address, self._last
        return ctypes.string_at(address, self._first - address), ctypes.string_at(last, address + self._nbytes - last)

    def close(self) -> None:
        """Stop watching: the pages' registration is removed (only by the process that made it).
        Takes no lock: it runs under the packed-weight cache's lock (an entry leaving it), and a
        watch being made may be what triggered that (a weight dying in a garbage collection);
        closing twice at once only unregisters twice."""
        if not self._open:
            return
        self._open = False
        _watched.pop(id(self), None)
        if os.getpid() == self._pid:
            span = _UffdioRange(self._first, self._last - self._first)
            self._kernel.libc.ioctl(self._kernel.uffd, _UFFDIO_UNREGISTER, ctypes.byref(span))  # the memory may be gone: any result will do

    def __del__(self) -> None:  # a watch that never reached the cache (its pack failed)
        if getattr(self, "_open", False):
            self.close()


def _private_anonymous(first: int, last: int) -> bool:
    """Whether ``/proc/self/maps`` shows [first, last) as private anonymous memory throughout: no
    file behind it (its inode is 0: not a file, ``/dev/zero`` shared mapping or memfd) and no other
    process sharing it."""
    covered = first
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            start, _, end = fields[0].partition("-")
            lo, hi = int(start, 16), int(end, 16)
            if hi <= covered or lo >= last:
                continue
            if lo > covered or fields[1][3] != "p" or fields[4] != "0":
                return False
            covered = hi
            if covered >= last:
                return True
    return False


def watch(address: int, nbytes: int) -> PageWatch | None:
    """Start recording writes to the ``nbytes`` bytes at ``address`` (memory that stays mapped
    while the watch is used), or None where this cannot be done: a buffer under 256 pages, a kernel
    or platform without asynchronous write-protect tracking, memory other than private anonymous
    memory, memory another watch or another userfaultfd covers."""
    first = -(-address // _PAGE) * _PAGE
    last = (address + nbytes) // _PAGE * _PAGE
    if last - first < _MIN_PAGES * _PAGE:
        return None
    kernel = _kernel(os.getpid())
    if kernel is None or not _private_anonymous(first, last):
        return None
    with _lock:
        if any(first < end and start < last for start, end in _watched.values()):
            return None
        span = _UffdioRange(first, last - first)
        register = _UffdioRegister(span, _UFFDIO_REGISTER_MODE_WP, 0)
        if kernel.libc.ioctl(kernel.uffd, _UFFDIO_REGISTER, ctypes.byref(register)) != 0:
            return None
        protect = _UffdioWriteprotect(span, _UFFDIO_WRITEPROTECT_MODE_WP)
        if kernel.libc.ioctl(kernel.uffd, _UFFDIO_WRITEPROTECT, ctypes.byref(protect)) != 0:
            kernel.libc.ioctl(kernel.uffd, _UFFDIO_UNREGISTER, ctypes.byref(span))
            return None
        page_watch = PageWatch(kernel, address, nbytes, first, last)
        _watched[id(page_watch)] = (first, last)
    if page_watch.written():  # file or shared pages, or a write already: not watchable
        page_watch.close()
        return None
    return page_watch
