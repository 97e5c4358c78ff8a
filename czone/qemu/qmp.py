"""QMP on top of ``qemu.qmp``: the library's synchronous client, and the
memory-device operations (czone-virtio, virtio-mem, balloon).

The operations take any ``Monitor`` (in practice a ``Machine``), so this
module does not depend on ``machine.py``.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from qemu.qmp import QMPError
from qemu.qmp.legacy import QEMUMonitorProtocol

from czone.errors import CZoneError

# The library logs every failed connection as an error; ours raise instead.
logging.getLogger("qemu.qmp").addHandler(logging.NullHandler())

STATS_TRACE = re.compile(r"\d+@(\d+\.\d+):virtio_czone_stats ")


class QmpTimeout(CZoneError):
    pass


class QmpCommandError(CZoneError):
    pass


class QmpClient(QEMUMonitorProtocol):
    """The library's synchronous client, plus the timeout its ``connect`` lacks:
    a hung QEMU still accepts the connection but never sends its greeting."""

    def connect(self, negotiate: bool = True,
                timeout: float | None = None) -> dict[str, Any] | None:
        self._qmp.await_greeting = negotiate
        self._qmp.negotiate = negotiate
        self._sync(self._qmp.connect(self._address), timeout)
        return self._get_greeting()


class Monitor(Protocol):
    def qmp(self, cmd: str, /, **args: Any) -> Any: ...

    def wait_event(self, name: str, timeout: float, **match: Any) -> dict[str, Any]: ...


def peripheral(dev_id: str) -> str:
    return f"/machine/peripheral/{dev_id}"


def set_requested_size(vm: Monitor, dev_id: str, nbytes: int) -> None:
    """Ask a czone-virtio or virtio-mem device to grow or shrink to ``nbytes``."""
    vm.qmp("qom-set", path=peripheral(dev_id), property="requested-size", value=nbytes)


def requested_size(vm: Monitor, dev_id: str) -> int:
    """Bytes the host currently lets the guest plug."""
    return int(vm.qmp("qom-get", path=peripheral(dev_id), property="requested-size"))


def device_size(vm: Monitor, dev_id: str) -> int:
    """Bytes the guest has plugged."""
    return int(vm.qmp("qom-get", path=peripheral(dev_id), property="size"))


def czone_stats(vm: Monitor, dev_id: str = "czdev0") -> list[dict[str, int]]:
    """The guest's last per-CZone usage report."""
    return list(vm.qmp("qom-get", path=peripheral(dev_id), property="stats"))


def czone_stats_time(stats_log: Path) -> float | None:
    """Wall-clock time of the last stats snapshot, from QEMU's trace of its arrival
    (``pid@seconds.micros:virtio_czone_stats nr_czones=N``); None before the first."""
    try:
        with open(stats_log, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            lines = f.read().decode(errors="replace").splitlines()
    except FileNotFoundError:
        return None
    for line in reversed(lines):
        if m := STATS_TRACE.match(line):
            return float(m.group(1))
    return None


def _wait_until(vm: Monitor, read: Callable[[], int], done: Callable[[int], bool],
                event: str, match: dict[str, Any], timeout: float, poll: float | None,
                what: str, want: int) -> int:
    """Read until ``done``; each ``event`` (or ``poll`` seconds without one) reads again.

    QEMU rate-limits MEMORY_DEVICE_SIZE_CHANGE and BALLOON_CHANGE to one a
    second and sends the last value late, so a caller that times the change
    passes a short ``poll``.
    """
    deadline = time.monotonic() + timeout
    while not done(value := read()):
        left = deadline - time.monotonic()
        if left <= 0:
            raise QmpTimeout(f"{what} stayed at {value}, wanted {want} after {timeout:g}s")
        try:
            vm.wait_event(event, min(left, poll or left), **match)
        except QmpTimeout:
            pass
    return value


def wait_size(vm: Monitor, dev_id: str, nbytes: int, timeout: float,
              poll: float | None = 0.1) -> int:
    """Wait until the plugged size is ``nbytes``."""
    return _wait_until(vm, lambda: device_size(vm, dev_id), lambda s: s == nbytes,
                       "MEMORY_DEVICE_SIZE_CHANGE", {"id": dev_id}, timeout, poll,
                       f"{dev_id}: size", nbytes)


def balloon_target(vm: Monitor, nbytes: int) -> None:
    vm.qmp("balloon", value=nbytes)


def balloon_actual(vm: Monitor) -> int:
    return int(vm.qmp("query-balloon")["actual"])


def wait_balloon(vm: Monitor, nbytes: int, timeout: float, poll: float | None = None) -> int:
    """Wait until the balloon has moved the guest to ``nbytes``: down to it or
    below when shrinking, up to it or above when growing."""
    shrink = balloon_actual(vm) > nbytes
    return _wait_until(vm, lambda: balloon_actual(vm),
                       lambda a: a <= nbytes if shrink else a >= nbytes,
                       "BALLOON_CHANGE", {}, timeout, poll,
                       "balloon: guest", nbytes)


__all__ = ["Monitor", "QmpClient", "QmpCommandError", "QmpTimeout", "QMPError",
           "balloon_actual", "balloon_target", "czone_stats", "device_size", "peripheral",
           "requested_size", "set_requested_size", "wait_balloon", "wait_size"]


def reclaim(vm: Monitor, dev_id: str, timeout: float, czone: int = 0,
            idle_ms: int = 0) -> dict[str, int]:
    """Ask the guest driver of a czone-virtio device to reclaim CZone ``czone``,
    or with 0 every CZone that handed out no page for ``idle_ms``, and wait for
    its report: ``{"seq", "czones", "bytes"}`` (the guest's own numbers).

    The config space holds one request, so a request replaced before the
    guest read it is answered by the report of the one that replaced it; and
    the seq read back may already be another client's.  Either way the first
    report with a seq at least ours covers our request."""
    path = peripheral(dev_id)
    vm.qmp("qom-set", path=path, property="reclaim", value={"czone": czone, "idle-ms": idle_ms})
    seq = int(vm.qmp("qom-get", path=path, property="reclaim")["seq"])
    deadline = time.monotonic() + timeout
    while True:
        data = vm.wait_event("CZONE_RECLAIMED", max(0.0, deadline - time.monotonic()),
                             id=dev_id)["data"]
        if int(data["seq"]) >= seq:
            return {"seq": int(data["seq"]), "czones": int(data["czones"]),
                    "bytes": int(data["bytes"])}
