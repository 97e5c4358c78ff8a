"""Case 5, the physical limit: a plain host process discards the same number of bytes.

memfd + fallocate(PUNCH_HOLE) is what QEMU does for a memfd-backed device
when a block is unplugged; anonymous memory + MADV_DONTNEED is what it does
for ordinary guest RAM (the balloon).  Latency has the VM cases' definition:
from the call until the process's RSS and its memfds' allocation stopped
moving (``hostmem.RssWatch``); the bare call's duration is kept beside it as
``call_s``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import time
from collections.abc import Callable

from czone.bench.reclaim_stats import Sample
from czone.errors import CZoneError
from czone.hostmem import PAGE, RssWatch

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]


def touch(m: mmap.mmap, nbytes: int) -> None:
    for off in range(0, nbytes, PAGE):
        m[off] = 1


def punch_hole(fd: int, offset: int, nbytes: int) -> None:
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, nbytes):
        err = ctypes.get_errno()
        raise CZoneError(f"fallocate(PUNCH_HOLE, {offset}, {nbytes}) failed: "
                         f"{os.strerror(err)}")


def punch_pieces(fd: int, nbytes: int, piece: int) -> None:
    for off in range(0, nbytes, piece):
        punch_hole(fd, off, min(piece, nbytes - off))


def timed(nbytes: int, discard: Callable[[], object], m: mmap.mmap) -> Sample:
    # 4 KiB pages, like the guest's containers (spawned nothp) and QEMU's memfd.
    m.madvise(mmap.MADV_NOHUGEPAGE)
    touch(m, nbytes)
    with RssWatch(os.getpid()) as w:
        t0 = time.monotonic()
        discard()
        call = time.monotonic() - t0
        before, after, latency = w.finish(t0)
    return Sample(latency, before, after, nbytes, {"call_s": call})


def memfd_punch(size_mib: int, piece_mib: int | None = None) -> Sample:
    """One hole for the whole range, or one per ``piece_mib`` (QEMU punches one per
    unplugged block)."""
    nbytes = size_mib << 20
    piece = (piece_mib << 20) if piece_mib else nbytes
    if piece <= 0:
        raise ValueError(f"piece_mib must be positive, not {piece_mib}")
    fd = os.memfd_create("czone-bench-reclaim", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, nbytes)
        with mmap.mmap(fd, nbytes) as m:
            return timed(nbytes, lambda: punch_pieces(fd, nbytes, piece), m)
    finally:
        os.close(fd)


def anon_dontneed(size_mib: int) -> Sample:
    nbytes = size_mib << 20
    with mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS) as m:
        return timed(nbytes, lambda: m.madvise(mmap.MADV_DONTNEED), m)
