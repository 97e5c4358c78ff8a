"""Live migration of a VM's libvirt domain from one libvirt endpoint to
another, with libvirt's own migration API.

``virDomainMigrate3`` with a connection to each end, *not* peer-to-peer:
czonectl already holds a connection to every host of its fleet, so the
source's libvirtd needs no credentials for the destination (with
``VIR_MIGRATE_PEER2PEER`` it would open that connection itself: root's SSH
keys or a TCP/TLS listener between every pair of hosts).  The job is live,
the domain becomes persistent on the destination and is undefined on the
source.  The destination's XML is given (``VIR_MIGRATE_PARAM_DEST_XML``
and ``..._PERSIST_XML``): the caller's ``libvirt_xml.build_xml`` of the
VM's spec with a run dir and an SSH port of its own (on one machine the
source's forward and log files are still in use during the migration),
plus the source's UUID and our metadata element with the CZone records,
which so travel with the domain.

This module knows domains and URIs, nothing of records; the service layer
(``Service._migrate_libvirt``) decides what a result means for them.
"""

from __future__ import annotations

import contextlib
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from czone.endpoint import is_loopback
from czone.errors import CZoneError
from czone.libvirt_backend import _libvirt, connect, is_ours, lookup, remove_domain
from czone.libvirt_xml import CZONE_NS, domain_name

# How long the source may take to settle after an aborted or failed job.
SETTLE_TIMEOUT = 60.0
# How long the source's QEMU may take to exit after a completed migration.
SOURCE_EXIT_TIMEOUT = 30.0


class LibvirtMigrationError(CZoneError):
    pass


class MigrationUndecided(LibvirtMigrationError):
    """The job's outcome is not known (it outlived its abort, or a host did
    not answer): nothing was cleaned up, and the caller keeps its marker so
    that a later ``reconcile`` settles it."""


@dataclass
class Migrated:
    """A completed migration: the destination's domain UUID (the source's),
    and QEMU's numbers as libvirt reports them."""
    uuid: str
    total_time_ms: int | None
    downtime_ms: int | None
    # ``query-migrate``'s ram keys, from libvirt's job stats.
    ram: dict[str, Any]
    job_stats: dict[str, Any]


# libvirt's job statistics -> the ``ram`` keys of QEMU's query-migrate.
RAM_KEYS = {"memory_processed": "transferred", "memory_total": "total",
            "memory_remaining": "remaining", "memory_constant": "duplicate",
            "memory_normal": "normal", "memory_normal_bytes": "normal-bytes",
            "memory_iteration": "dirty-sync-count", "memory_page_size": "page-size",
            "memory_dirty_rate": "dirty-pages-rate", "memory_bps": "mbps"}


def ram_stats(stats: dict[str, Any]) -> dict[str, Any]:
    """libvirt's job stats in the shape of QEMU's ``query-migrate`` ram
    (``mbps`` stays libvirt's bytes/s)."""
    return {q: stats[k] for k, q in RAM_KEYS.items() if k in stats}


def data_address(src_uri: str, dst_uri: str) -> str | None:
    """Where the source's QEMU sends the migration stream: the host the
    destination's URI names; 127.0.0.1 when both URIs are local (two
    daemons on one machine); else None, libvirt's default (the
    destination's host name, or its ``migration_host``)."""
    host = urlsplit(dst_uri).hostname
    if host:
        return host
    return "127.0.0.1" if not urlsplit(src_uri).hostname else None


def migration_params(src_uri: str, dst_uri: str, xml: str,
                     max_bandwidth: int) -> dict[str, Any]:
    libvirt = _libvirt()
    params: dict[str, Any] = {
        libvirt.VIR_MIGRATE_PARAM_DEST_XML: xml,
        libvirt.VIR_MIGRATE_PARAM_PERSIST_XML: xml,
        # MiB/s, at least 1 (0 would mean libvirt's default, no cap)
        libvirt.VIR_MIGRATE_PARAM_BANDWIDTH: max(1, -(-max_bandwidth // (1 << 20))),
    }
    host = data_address(src_uri, dst_uri)
    if host is not None:
        params[libvirt.VIR_MIGRATE_PARAM_URI] = f"tcp://{host}"
        # libvirt refuses a loopback migration_address in qemu.conf, but asked
        # per migration it listens there: two daemons on one machine.
        if is_loopback(host):
            params[libvirt.VIR_MIGRATE_PARAM_LISTEN_ADDRESS] = host
    return params


def flags() -> int:
    libvirt = _libvirt()
    # UNSAFE: libvirt calls a disk without shared storage or cache=none
    # unsafe to migrate.  Ours are the read-only image disks, at the same
    # paths on every host (the artifacts); nothing writes them, so there
    # is no cache to flush.  PERSIST_DEST/UNDEFINE_SOURCE: the domain moves.
    return (libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PERSIST_DEST
            | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE | libvirt.VIR_MIGRATE_UNSAFE)


def destination_xml(src_dom: Any, xml: str) -> str:
    """``xml`` with the source domain's UUID and its live metadata element of
    ours (the CZone records), in place of the one ``build_xml`` wrote."""
    libvirt = _libvirt()
    root = ET.fromstring(xml)
    uuid = root.find("uuid")
    if uuid is None:
        uuid = ET.Element("uuid")
        root.insert(1, uuid)  # after <name>
    uuid.text = src_dom.UUIDString()
    meta = root.find("metadata")
    if meta is None:
        meta = ET.SubElement(root, "metadata")
    for el in list(meta):
        if el.tag.startswith(f"{{{CZONE_NS}}}"):
            meta.remove(el)
    try:
        ours = src_dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, CZONE_NS)
    except libvirt.libvirtError as e:
        raise LibvirtMigrationError(f"domain {src_dom.name()} has no CZone metadata: "
                                    f"{e.get_error_message()}") from None
    el = ET.fromstring(ours)
    for e in el.iter():  # libvirt returns it without its namespace
        if not e.tag.startswith("{"):
            e.tag = f"{{{CZONE_NS}}}{e.tag}"
    meta.append(el)
    return ET.tostring(root, encoding="unicode")


def preflight(vm: str, dst_uri: str, emulator: str, virttype: str) -> None:
    """The destination answers, can run our QEMU build, and has no domain
    of that name (one line of error otherwise)."""
    libvirt = _libvirt()
    conn = connect(dst_uri)
    try:
        conn.getDomainCapabilities(emulator, "x86_64", "q35", virttype)
    except libvirt.libvirtError as e:
        raise LibvirtMigrationError(f"the destination {dst_uri} cannot run our QEMU build "
                                    f"{emulator}: {e.get_error_message()}") from None
    existing = lookup(dst_uri, vm)
    if existing is not None:
        whose = "ours" if is_ours(existing) else "not ours: no CZone metadata"
        raise LibvirtMigrationError(f"a domain named {existing.name()} already exists at "
                                    f"{dst_uri} ({whose}); not migrating onto it")


def runs(dom: Any) -> bool:
    """Whether ``dom`` runs its guest (not paused, not shut off)."""
    libvirt = _libvirt()
    try:
        return bool(dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING)
    except libvirt.libvirtError:
        return False


def _source(vm: str, src_uri: str) -> Any:
    dom = lookup(src_uri, vm)
    if dom is None or not is_ours(dom):
        raise LibvirtMigrationError(f"no domain {domain_name(vm)} of ours at {src_uri}")
    if not dom.isActive():
        raise LibvirtMigrationError(f"domain {dom.name()} at {src_uri} is not running")
    return dom


def migrate(vm: str, src_uri: str, dst_uri: str, dst_xml: str, timeout: float,
            max_bandwidth: int, emulator: str, virttype: str) -> Migrated:
    """Move VM ``vm``'s running domain from ``src_uri`` to ``dst_uri`` at up
    to ``max_bandwidth`` bytes/s.  A job still running after ``timeout``
    seconds is aborted.  On any failure the source runs the guest and
    nothing of the domain is left at the destination (``rescue``), then
    LibvirtMigrationError says why; but a job that failed after the
    destination took over counts as done (``moved_domain``)."""
    libvirt = _libvirt()
    src = _source(vm, src_uri)
    preflight(vm, dst_uri, emulator, virttype)
    xml = destination_xml(src, dst_xml)
    params = migration_params(src_uri, dst_uri, xml, max_bandwidth)
    dst_conn = connect(dst_uri)
    uuid = src.UUIDString()
    outcome: list[Any] = []

    def job() -> None:
        try:
            outcome.append(src.migrate3(dst_conn, params, flags()))
        except BaseException as e:  # noqa: BLE001 (handed to the caller's thread)
            outcome.append(e)

    worker = threading.Thread(target=job, name=f"migrate-{vm}", daemon=True)
    worker.start()
    try:
        worker.join(timeout)
    except BaseException:
        # Interrupted: the job must not run on without us, but it may have
        # finished meanwhile; the caller's marker lets reconcile decide.
        with contextlib.suppress(libvirt.libvirtError):
            src.abortJob()
        raise
    why = None
    if worker.is_alive():
        why = f"still running after {timeout:.0f}s; aborted"
        with contextlib.suppress(libvirt.libvirtError):
            src.abortJob()
        worker.join(SETTLE_TIMEOUT)
        if worker.is_alive():
            raise MigrationUndecided(f"domain {src.name()}: the migration to {dst_uri} was "
                                     f"{why}, and the job did not end within "
                                     f"{SETTLE_TIMEOUT:.0f}s")
    result = outcome[0] if outcome else None
    if not isinstance(result, BaseException):
        return _completed(result, uuid)  # done, even if it finished as we aborted
    moved = moved_domain(vm, src_uri, dst_uri, uuid)
    if moved is not None:
        # libvirt failed after the destination took over (the source's
        # confirmation): the guest runs there, so the move is finished.
        with contextlib.suppress(CZoneError, libvirt.libvirtError):
            remove_domain(src_uri, vm)
        return _completed(moved, uuid)
    if not isinstance(result, libvirt.libvirtError):
        with contextlib.suppress(CZoneError):
            rescue(vm, src_uri, dst_uri, uuid)
        raise result
    why = why or result.get_error_message()
    done = rescue(vm, src_uri, dst_uri, uuid)
    raise LibvirtMigrationError(f"the migration of {src.name()} to {dst_uri} failed "
                                f"({why})" + (f"; {done}" if done else ""))


def moved_domain(vm: str, src_uri: str, dst_uri: str, uuid: str) -> Any | None:
    """The destination's domain if it runs the guest (an incoming one is
    paused) and the source no longer does; else None."""
    with contextlib.suppress(CZoneError):
        dst = lookup(dst_uri, vm)
        if dst is None or dst.UUIDString() != uuid or not runs(dst):
            return None
        src = lookup(src_uri, vm)
        if src is None or not runs(src):
            return dst
    return None


def _completed(dom: Any, uuid: str) -> Migrated:
    """The destination's account of the job (libvirt hands the source's
    statistics over in its migration cookie)."""
    libvirt = _libvirt()
    try:
        stats = dom.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
    except libvirt.libvirtError:
        stats = {}
    return Migrated(uuid, stats.get("time_elapsed"), stats.get("downtime"),
                    ram_stats(stats), stats)


def _message(e: Exception) -> str:
    get = getattr(e, "get_error_message", None)
    return str(get() if get else e)


def _state(dom: Any, uri: str) -> int:
    libvirt = _libvirt()
    try:
        return int(dom.state()[0])
    except libvirt.libvirtError as e:
        raise MigrationUndecided(f"cannot ask {uri} about {dom.name()}: "
                                 f"{e.get_error_message()}") from None


def rescue(vm: str, src_uri: str, dst_uri: str, uuid: str) -> str:
    """After a failed migration: the destination's domain of that UUID, if
    libvirt left one, goes; the source runs (resumed if it was left paused).
    Says what it had to do ("" if nothing); raises LibvirtMigrationError
    if the source does not run."""
    libvirt = _libvirt()
    said = []
    try:
        src = lookup(src_uri, vm)
        src_runs = src is not None and src.isActive()
    except (CZoneError, libvirt.libvirtError) as e:
        raise MigrationUndecided(f"cannot ask {src_uri} about {domain_name(vm)}: "
                                 f"{_message(e)}") from None
    if not src_runs:
        # Never remove the destination then: it may be all there is of the guest.
        raise LibvirtMigrationError(f"domain {domain_name(vm)} is no longer running at "
                                    f"{src_uri} after the failed migration")
    try:
        dst = lookup(dst_uri, vm)
        if dst is not None and dst.UUIDString() == uuid:
            with contextlib.suppress(libvirt.libvirtError):
                if dst.isActive():
                    dst.destroy()
            dst.undefine()
            said.append("its domain at the destination removed")
    except (CZoneError, libvirt.libvirtError) as e:
        # Resuming the source could run the guest twice: leave it as it is.
        raise MigrationUndecided(f"cannot ask {dst_uri} whether it runs {domain_name(vm)}: "
                                 f"{_message(e)}; the source is left as it is") from None
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while (state := _state(src, src_uri)) != libvirt.VIR_DOMAIN_RUNNING:
        if state == libvirt.VIR_DOMAIN_PAUSED:
            with contextlib.suppress(libvirt.libvirtError):
                src.resume()
                said.append("the source resumed")
        if time.monotonic() > deadline:
            raise LibvirtMigrationError(f"domain {src.name()} at {src_uri} did not run again "
                                        f"after the failed migration (state {state})")
        time.sleep(0.2)
    return "; ".join(said)
