"""QMP on top of ``qemu.qmp``: a synchronous session, events with timeouts,
and the memory-device operations (czone-virtio, virtio-mem, balloon)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qemu.qmp import QMPClient, QMPError

from czone.errors import CZoneError

if TYPE_CHECKING:
    from czone.qemu.machine import Machine


class QmpTimeout(CZoneError):
    pass


class QmpSession:
    """Synchronous wrapper around ``qemu.qmp.QMPClient`` with its own event loop."""

    def __init__(self, socket_path: Path, name: str = "czone"):
        self.socket_path = socket_path
        self._loop = asyncio.new_event_loop()
        self._client = QMPClient(name)

    def _run(self, coro: Any, timeout: float | None) -> Any:
        return self._loop.run_until_complete(asyncio.wait_for(coro, timeout))

    def connect(self, timeout: float = 5.0) -> None:
        self._run(self._client.connect(str(self.socket_path)), timeout)

    def execute(self, cmd: str, args: dict[str, Any] | None = None,
                timeout: float | None = 30.0) -> Any:
        return self._run(self._client.execute(cmd, args or None), timeout)

    def wait_event(self, name: str, timeout: float,
                   match: dict[str, Any] | None = None) -> dict[str, Any]:
        async def next_match() -> dict[str, Any]:
            while True:
                event = await self._client.events.get()
                data = event.get("data", {})
                if event["event"] == name and all(data.get(k) == v
                                                  for k, v in (match or {}).items()):
                    return dict(event)
        try:
            return self._run(next_match(), timeout)
        except TimeoutError:
            raise QmpTimeout(f"no QMP event {name} {match or ''} within {timeout:.0f}s") from None

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            self._run(self._client.disconnect(), 5.0)
        except (TimeoutError, QMPError, OSError, EOFError):
            pass
        finally:
            self._loop.close()


def peripheral(dev_id: str) -> str:
    return f"/machine/peripheral/{dev_id}"


def set_requested_size(vm: Machine, dev_id: str, nbytes: int) -> None:
    """Ask a czone-virtio or virtio-mem device to grow or shrink to ``nbytes``."""
    vm.qmp("qom-set", path=peripheral(dev_id), property="requested-size", value=nbytes)


def requested_size(vm: Machine, dev_id: str) -> int:
    """Bytes the host currently lets the guest plug."""
    return int(vm.qmp("qom-get", path=peripheral(dev_id), property="requested-size"))


def device_size(vm: Machine, dev_id: str) -> int:
    """Bytes the guest has plugged."""
    return int(vm.qmp("qom-get", path=peripheral(dev_id), property="size"))


def czone_stats(vm: Machine, dev_id: str = "czdev0") -> list[dict[str, int]]:
    """The guest's last per-CZone usage report."""
    return list(vm.qmp("qom-get", path=peripheral(dev_id), property="stats"))


def wait_size(vm: Machine, dev_id: str, nbytes: int, timeout: float,
              poll: float = 0.1) -> int:
    """Wait until the plugged size is ``nbytes``.

    MEMORY_DEVICE_SIZE_CHANGE is rate-limited to one per second, so it is
    only a hint to look again; the size itself is read with qom-get at
    least every ``poll`` seconds.
    """
    deadline = time.monotonic() + timeout
    while (size := device_size(vm, dev_id)) != nbytes:
        left = deadline - time.monotonic()
        if left <= 0:
            raise QmpTimeout(f"{dev_id}: size stayed {size}, wanted {nbytes} "
                             f"after {timeout:.0f}s")
        try:
            vm.wait_event("MEMORY_DEVICE_SIZE_CHANGE", min(left, poll), id=dev_id)
        except QmpTimeout:
            pass
    return size


def balloon_target(vm: Machine, nbytes: int) -> None:
    vm.qmp("balloon", value=nbytes)


def balloon_actual(vm: Machine) -> int:
    return int(vm.qmp("query-balloon")["actual"])


def wait_balloon(vm: Machine, nbytes: int, timeout: float, poll: float = 0.05) -> int:
    """Wait until the balloon has shrunk the guest to ``nbytes`` or less."""
    deadline = time.monotonic() + timeout
    while (actual := balloon_actual(vm)) > nbytes:
        if time.monotonic() > deadline:
            raise QmpTimeout(f"balloon: guest stayed at {actual}, wanted {nbytes} "
                             f"after {timeout:.0f}s")
        time.sleep(poll)
    return actual


__all__ = ["QmpSession", "QmpTimeout", "QMPError", "balloon_actual", "balloon_target",
           "czone_stats", "device_size", "peripheral", "requested_size", "set_requested_size",
           "wait_balloon", "wait_size"]
