"""/dev/czone from Python: the ioctls of include/uapi/linux/czone.h.

Each struct starts with its own size, so the layouts below are the
``*_SIZE_VER0`` versions; a kernel with larger structs accepts them.
"""

from __future__ import annotations

import fcntl
import os
import struct

_MAGIC = 0xC7
CHUNK_BYTES = 2 << 20

# (ioctl nr, layout after the size and flags words, field names)
_CREATE = (0x01, "QQ", ("cap_bytes", "id"))
_DESTROY = (0x02, "QQQQQ", ("id", "migrated_pages", "duration_ns", "failed_pages",
                            "released_chunks"))
_STAT = (0x04, "QQQQQQQQQQQII", ("id", "cap_bytes", "chunk_bytes", "nr_chunks", "used_pages",
                                 "free_pages", "host_backed_pages", "nr_tasks",
                                 "alloc_failures", "oom_kills", "migrated_pages", "page_size",
                                 "state"))
_RECLAIM = (0x06, "QQQQQ", ("id", "released_chunks", "discarded_pages", "failed_pages",
                            "duration_ns"))


def _ioctl(fd: int, spec: tuple[int, str, tuple[str, ...]], **inp: int) -> dict[str, int]:
    nr, layout, names = spec
    st = struct.Struct("=II" + layout)
    # _IOWR: read|write direction bits, the struct size, the magic, the number.
    request = (3 << 30) | (st.size << 16) | (_MAGIC << 8) | nr
    buf = bytearray(st.pack(st.size, 0, *(inp.get(n, 0) for n in names)))
    fcntl.ioctl(fd, request, buf)
    return dict(zip(names, st.unpack(buf)[2:], strict=True))


class CZoneDev:
    """Opened on first use: on a kernel without CZones (the run-time
    baseline) the agent serves containers in no CZone, and only a request
    for one fails (ENOENT)."""

    def __init__(self, path: str = "/dev/czone"):
        self.path = path
        self._fd: int | None = None

    @property
    def fd(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        return self._fd

    def create(self, cap_bytes: int) -> int:
        return _ioctl(self.fd, _CREATE, cap_bytes=cap_bytes)["id"]

    def destroy(self, czone: int) -> dict[str, int]:
        return _ioctl(self.fd, _DESTROY, id=czone)

    def stat(self, czone: int) -> dict[str, int]:
        return _ioctl(self.fd, _STAT, id=czone)

    def reclaim(self, czone: int) -> dict[str, int]:
        return _ioctl(self.fd, _RECLAIM, id=czone)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def cap_for(memory_mib: int) -> int:
    """A CZone cap in bytes: ``memory_mib`` rounded up to whole chunks."""
    size = memory_mib << 20
    return -(-size // CHUNK_BYTES) * CHUNK_BYTES
