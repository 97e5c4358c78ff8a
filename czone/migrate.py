"""Live migration between two QEMU processes on this host, over QMP.

The destination runs the source's spec with ``-incoming defer``
(``cmdline.migration_destination``) and listens on a Unix socket in its own
run dir.  Both sides get the ``return-path`` capability: the destination
tells the source whether it loaded the state, so a destination that dies or
refuses the state (the device's sanity checks) fails the migration on the
source, which then runs on by itself.  ``events`` makes QEMU send the
MIGRATION events this module waits on.

This module knows two ``Machine`` objects and nothing of records; the
service layer (``Service.vm_migrate``) decides what a result means for them.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from czone.errors import CZoneError
from czone.qemu.cmdline import migration_socket_path
from czone.qemu.machine import MAX_SOCKET_PATH, Machine
from czone.qemu.qmp import QmpTimeout

CAPABILITIES = ("events", "return-path")
# Local migration over a Unix socket: QEMU 7.2's default cap of 32 MiB/s
# would make a VM with a few hundred MiB in use take half a minute.
MAX_BANDWIDTH = 4 << 30
DONE = ("completed", "failed", "cancelled")
# How long the source may take to settle after a failed or cancelled migration.
SETTLE_TIMEOUT = 30.0
RESUME_WAIT = 5.0


class MigrationError(CZoneError):
    pass


def _capabilities(vm: Machine) -> None:
    vm.qmp("migrate-set-capabilities",
           capabilities=[{"capability": c, "state": True} for c in CAPABILITIES])


def wait_done(vm: Machine, timeout: float) -> dict[str, Any]:
    """``query-migrate`` once the migration on ``vm`` has ended (completed,
    failed or cancelled); MIGRATION events wake us, the status decides."""
    deadline = time.monotonic() + timeout
    while True:
        info = vm.qmp("query-migrate")
        if info.get("status") in DONE:
            return info
        left = deadline - time.monotonic()
        if left <= 0:
            raise QmpTimeout(f"migration still {info.get('status')} after {timeout:.0f}s")
        with contextlib.suppress(QmpTimeout):
            vm.wait_event("MIGRATION", left)


def start_incoming(dst: Machine) -> str:
    """Let the launched destination listen; returns the URI to migrate to."""
    sock = migration_socket_path(dst.run_dir)
    if len(str(sock)) > MAX_SOCKET_PATH:
        raise MigrationError(f"migration socket path too long for AF_UNIX: {sock}")
    sock.unlink(missing_ok=True)
    _capabilities(dst)
    uri = f"unix:{sock}"
    dst.qmp("migrate-incoming", uri=uri)
    return uri


def run(src: Machine, dst: Machine, uri: str, timeout: float,
        max_bandwidth: int = MAX_BANDWIDTH) -> dict[str, Any]:
    """Migrate ``src`` into the listening ``dst`` at up to ``max_bandwidth``
    bytes/s; returns the source's ``query-migrate`` at completion.  Raises
    MigrationError unless the destination has loaded the state and runs
    the guest."""
    _capabilities(src)
    src.qmp("migrate-set-parameters", **{"max-bandwidth": max_bandwidth})
    src.qmp("migrate", uri=uri)
    info = wait_done(src, timeout)
    if info["status"] != "completed":
        raise MigrationError(f"migration {info['status']}"
                             + (f": {info['error-desc']}" if info.get("error-desc") else ""))
    dst.check_alive()
    incoming = dst.qmp("query-migrate").get("status")
    running = dst.qmp("query-status")
    if incoming != "completed" or running.get("status") != "running":
        raise MigrationError(f"the destination is {running.get('status')} after the "
                             f"migration (incoming status {incoming})")
    return info


def rescue_source(src: Machine) -> str:
    """After a failed migration: cancel it if it still runs and make sure the
    source runs the guest again.  Returns the source's run state."""
    info = src.qmp("query-migrate")
    if info.get("status") not in (*DONE, "none", None):
        src.qmp("migrate_cancel")
        wait_done(src, SETTLE_TIMEOUT)
    state = src.qmp("query-status").get("status")
    if state != "running":
        # QEMU restarts a source whose migration failed, just after the event.
        with contextlib.suppress(QmpTimeout):
            src.wait_event("RESUME", RESUME_WAIT)
        state = src.qmp("query-status").get("status")
    # One whose migration completed (the destination failed afterwards)
    # waits in "postmigrate" until told to go on.
    if state in ("postmigrate", "paused"):
        src.qmp("cont")
        state = src.qmp("query-status").get("status")
    if state != "running":
        raise MigrationError(f"the source did not resume after the failed migration "
                             f"(state {state})")
    return state
