"""The host's view of a VM's memory: the QEMU process's RSS and PSS.

Memory assertions and benchmarks read these, never the guest's own counters.
RSS comes from /proc/PID/statm (cheap enough to sample every few ms), PSS
from /proc/PID/smaps_rollup.  Values settle over time after the guest gives
memory back, so callers sample until the value is stable instead of sleeping.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from czone.errors import CZoneError

MiB = 1 << 20
PAGE = os.sysconf("SC_PAGE_SIZE")


class NotStable(CZoneError, TimeoutError):
    pass


def _read_proc(pid: int, name: str) -> str:
    path = f"/proc/{pid}/{name}"
    try:
        with open(path) as f:
            return f.read()
    except PermissionError:
        raise CZoneError(f"cannot read {path}: permission denied; the process belongs to "
                         "another user, run as that user or as root") from None
    except OSError as e:
        raise CZoneError(f"cannot read {path}: {e.strerror} (has the process exited?)") from None


def rss_bytes(pid: int) -> int:
    return int(_read_proc(pid, "statm").split()[1]) * PAGE


def pss_bytes(pid: int) -> int:
    for line in _read_proc(pid, "smaps_rollup").splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    raise CZoneError(f"no Pss line in /proc/{pid}/smaps_rollup")


def peak_rss_bytes(pid: int) -> int:
    """The process's RSS high-water mark (VmHWM) since start or reset_peak_rss()."""
    for line in _read_proc(pid, "status").splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise CZoneError(f"no VmHWM line in /proc/{pid}/status")


def reset_peak_rss(pid: int) -> None:
    """Reset VmHWM to the current RSS (proc(5), clear_refs value 5)."""
    path = f"/proc/{pid}/clear_refs"
    try:
        with open(path, "w") as f:
            f.write("5")
    except OSError as e:
        raise CZoneError(f"cannot write {path}: {e.strerror}") from None


@dataclass(frozen=True)
class Settled:
    value: int
    at: float          # time.monotonic() of the last move beyond the tolerance
    samples: int


def settle(read: Callable[[], int], timeout: float = 60.0, quiet: float = 1.0,
           tolerance: int = 2 * MiB, interval: float = 0.02) -> Settled:
    """Sample ``read()`` until it stays within ``tolerance`` for ``quiet`` seconds."""
    start = time.monotonic()
    ref, moved, n = read(), start, 1
    recent = [ref]
    while True:
        time.sleep(interval)
        value, now = read(), time.monotonic()
        n += 1
        recent = (recent + [value])[-10:]
        if abs(value - ref) > tolerance:
            ref, moved = value, now
        elif now - moved >= quiet:
            return Settled(value, moved, n)
        if now - start > timeout:
            raise NotStable(f"value still moving after {timeout:.0f}s: last samples "
                            f"{[v // MiB for v in recent]} MiB")


def stable_rss(pid: int, timeout: float = 120.0) -> int:
    return settle(lambda: rss_bytes(pid), timeout=timeout).value


def stable_pss(pid: int, timeout: float = 120.0) -> int:
    return settle(lambda: pss_bytes(pid), timeout=timeout).value


def memfd_paths(pid: int) -> list[str]:
    """/proc paths of the memfds ``pid`` holds open (QEMU's memory backends)."""
    fds = f"/proc/{pid}/fd"
    paths = []
    try:
        names = os.listdir(fds)
    except OSError as e:
        raise CZoneError(f"cannot list {fds}: {e.strerror}") from None
    for name in names:
        try:
            if os.readlink(f"{fds}/{name}").startswith("/memfd:"):
                paths.append(f"{fds}/{name}")
        except OSError:
            continue
    return paths


def allocated_bytes(paths: list[str]) -> int:
    """Bytes allocated to these files.  shmem lowers a file's block count as a
    hole punch frees the pages (recalculated on stat), not when it unmaps them,
    which is what RSS shows."""
    total = 0
    for path in paths:
        try:
            total += os.stat(path).st_blocks * 512
        except OSError:
            continue
    return total


class RssWatch:
    """Sample a process's memory in a thread while something happens; find when
    the host had it back.

    Two views are sampled: RSS, and the bytes allocated to the memfds the
    process holds (QEMU's memory backends).  RSS falls when pages are unmapped;
    a memfd's allocation falls when a punch has freed them.  The memory is back
    when both stopped moving.

    ``with RssWatch(pid) as w: t0 = time.monotonic(); do()`` then
    ``w.finish(t0)`` returns (RSS before, RSS after, seconds from t0 until both
    views last moved by more than the tolerance).
    """

    def __init__(self, pid: int, interval: float = 0.002, tolerance: int = MiB):
        self.pid, self.interval, self.tolerance = pid, interval, tolerance
        self.samples: list[tuple[float, int]] = []
        self.files: list[tuple[float, int]] = []
        self._memfds: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            value, files = rss_bytes(self.pid), allocated_bytes(self._memfds)
            # stamped after the read: a sample stamped before t0 was read before t0
            now = time.monotonic()
            self.samples.append((now, value))
            self.files.append((now, files))
            time.sleep(self.interval)

    def __enter__(self) -> RssWatch:
        self._memfds = memfd_paths(self.pid)
        self.before = stable_rss(self.pid)
        self.files_before = allocated_bytes(self._memfds)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def finish(self, t0: float, quiet: float = 1.0,
               timeout: float = 120.0) -> tuple[int, int, float]:
        """Wait until both views are stable, stop sampling, and analyse the samples."""
        settle(lambda: rss_bytes(self.pid) + allocated_bytes(self._memfds),
               timeout=timeout, quiet=quiet, tolerance=self.tolerance)
        self._stop.set()
        self._thread.join()
        after, rss_s = self._settled(self.samples, self.before, t0, quiet)
        _, files_s = self._settled(self.files, self.files_before, t0, quiet)
        return self.before, after, max(rss_s, files_s)

    def _settled(self, samples: list[tuple[float, int]], before: int, t0: float,
                 quiet: float) -> tuple[int, float]:
        # the value at t0 is the last one seen before it: a change that ends before
        # the sampler's next tick still counts up to that tick, not as instantaneous
        at_t0 = [v for t, v in samples if t < t0][-1:] or [before]
        return settled_after(sorted([*samples, (t0, at_t0[0])]), t0, quiet, self.tolerance)


def settled_after(samples: list[tuple[float, int]], t0: float, quiet: float,
                  tolerance: int) -> tuple[int, float]:
    """(final value, seconds from ``t0`` until the samples last strayed from it).

    The final value is the median of the last ``quiet / 2`` seconds; a sample
    taken at or after ``t0`` that differs from it by more than ``tolerance``
    moves the settling time to the next sample.
    """
    tail = [v for t, v in samples if t >= samples[-1][0] - quiet / 2]
    after = int(statistics.median(tail))
    settled_at = t0
    for (t, v), (t_next, _) in zip(samples, samples[1:], strict=False):
        if t >= t0 and abs(v - after) > tolerance:
            settled_at = t_next
    return after, max(0.0, settled_at - t0)


def smaps_total(pid: int, field: str, match: Callable[[str, str], bool]) -> int:
    """Bytes of ``field`` (``Rss``, ``Pss``, ...) summed over the mappings of
    ``pid`` for which ``match(perms, path)`` holds (path "" if anonymous)."""
    total, on = 0, False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split(maxsplit=5)
            if "-" in head[0] and len(head) >= 5:
                on = match(head[1], head[5].strip() if len(head) == 6 else "")
            elif on and head[0] == f"{field}:":
                total += int(head[1]) * 1024
    return total


def mapping_rss(pid: int, name: str) -> int:
    """RSS of the mappings of ``pid`` whose path contains ``name``, e.g. the
    memfd behind a memory device (``memfd:memory-backend-memfd``): the guest memory
    the host backs, without QEMU's own allocations or TCG's code cache."""
    return smaps_total(pid, "Rss", lambda _perms, path: name in path)


def stable_mapping_rss(pid: int, name: str, timeout: float = 120.0) -> int:
    return settle(lambda: mapping_rss(pid, name), timeout=timeout).value
