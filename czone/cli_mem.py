"""``czonectl vm resize``, ``vm mem`` and ``vm reclaim``: a VM's elastic memory over QMP."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from czone import endpoint, hostmem, libvirt_backend
from czone.errors import CZoneError
from czone.qemu import qmp
from czone.qemu.cmdline import stats_log_path
from czone.qemu.machine import Machine
from czone.service import Service
from czone.state import VmRecord

MiB = hostmem.MiB


def _attach(name: str) -> tuple[VmRecord, Machine]:
    svc = Service()
    rec = svc.db.running(name)
    return rec, svc.machine(rec)  # the record's backend: a QEMU of ours or a domain


def memory_device(vm: Machine) -> dict[str, Any] | None:
    """The VM's virtio-czone or virtio-mem device (query-memory-devices), if any."""
    devices = [d for d in vm.qmp("query-memory-devices")
               if d["type"] in ("virtio-czone", "virtio-mem")]
    if len(devices) > 1:
        raise CZoneError(f"{len(devices)} resizable memory devices; expected one")
    return devices[0] if devices else None


def _has_balloon(vm: Machine) -> bool:
    try:
        vm.qmp("query-balloon")
    except qmp.QmpCommandError:
        return False
    return True


def _stats_with_age(vm: Machine, dev_id: str,
                    stats_log: Path) -> tuple[list[dict[str, int]], str]:
    """The stats and how old they are: a snapshot arriving between the two reads
    would be credited with the age of the one before, so read until they agree."""
    for _ in range(3):
        at = qmp.czone_stats_time(stats_log)
        stats = qmp.czone_stats(vm, dev_id)
        if qmp.czone_stats_time(stats_log) == at:
            break
    if at is None:
        return stats, "no snapshot received yet"
    return stats, f"{max(0.0, time.time() - at):.1f} s ago"


@click.command("resize")
@click.argument("name")
@click.argument("mib", type=click.IntRange(min=0))
@click.option("--timeout", type=click.FloatRange(min=0), default=60.0, show_default=True,
              help="Seconds to wait for the guest to follow (0: do not wait).")
def vm_resize(name: str, mib: int, timeout: float) -> None:
    """Ask the VM's memory device to hold MIB (virtio-czone, virtio-mem or balloon)."""
    rec, vm = _attach(name)
    try:
        dev = memory_device(vm)
        if dev is None and not _has_balloon(vm):
            raise CZoneError(f"VM {name!r} has no resizable memory device")
        if dev is None and mib > rec.memory_mib:
            raise CZoneError(f"the balloon cannot give VM {name!r} more than its "
                             f"{rec.memory_mib} MiB of boot memory")
        if dev is None:
            qmp.balloon_target(vm, mib * MiB)
            if timeout:
                actual = qmp.wait_balloon(vm, mib * MiB, timeout)
                click.echo(f"balloon: target {mib} MiB, guest at {actual // MiB} MiB")
            else:
                click.echo(f"balloon target {mib} MiB")
            return
        dev_id = dev["data"]["id"]
        qmp.set_requested_size(vm, dev_id, mib * MiB)
        if timeout:
            size = hostmem.settle(lambda: qmp.device_size(vm, dev_id), timeout=timeout,
                                  tolerance=0).value
            click.echo(f"{dev_id}: requested {mib} MiB, plugged {size // MiB} MiB")
    finally:
        vm.close()


@click.command("mem")
@click.argument("name")
def vm_mem(name: str) -> None:
    """The host's view of the VM's memory, and the guest's CZones as its device reports them."""
    rec, vm = _attach(name)
    try:
        if rec.backend == "libvirt" and endpoint.is_remote(rec.uri):
            rss = libvirt_backend.domain_rss(rec.uri or "", name)
            click.echo(f"QEMU on {rec.uri}: RSS "
                       + ("?" if rss is None else f"{rss // MiB} MiB") + " (libvirt's figure)")
        else:
            click.echo(f"QEMU pid {rec.pid}: RSS {hostmem.rss_bytes(rec.pid) // MiB} MiB, "
                       f"PSS {hostmem.pss_bytes(rec.pid) // MiB} MiB")
        dev = memory_device(vm)
        if dev is None:
            return
        data = dev["data"]
        click.echo(f"{dev['type']} {data['id']}: plugged {data['size'] // MiB} MiB, requested "
                   f"{data['requested-size'] // MiB} MiB of {data['max-size'] // MiB} MiB")
        if dev["type"] == "virtio-czone":
            stats, age = _stats_with_age(vm, data["id"], stats_log_path(Path(rec.run_dir)))
            click.echo(f"per-CZone stats as the guest last sent them, {age}:")
            click.echo("CZONE  USED_MIB  FREE_MIB  BACKED_MIB  PLUGGED_MIB")
            for s in stats:
                click.echo(f"{s['czone']:<6} {s['used'] // MiB:>9} {s['free'] // MiB:>9} "
                           f"{s['backed'] // MiB:>11} {s['plugged'] // MiB:>12}")
    finally:
        vm.close()


@click.command("reclaim")
@click.argument("name")
@click.option("--czone", type=click.IntRange(min=1, max=2**32 - 1), default=None,
              help="Reclaim this CZone only.")
@click.option("--idle-for", type=click.FloatRange(min=0, max=(2**32 - 1) / 1000), default=0.0,
              show_default=True, help="Without --czone: only CZones that handed out no page "
              "for this many seconds.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=60.0,
              show_default=True, help="Seconds to wait for the guest's report.")
def vm_reclaim(name: str, czone: int | None, idle_for: float, timeout: float) -> None:
    """The host asks the guest, through its virtio-czone device, to give back free memory."""
    if czone is not None and idle_for:
        raise click.UsageError("--czone and --idle-for exclude each other")
    r = Service().vm_reclaim(name, czone or 0, idle_for, timeout)
    drop = r["rss_drop_bytes"]
    click.echo(f"{name}: {r['czones']} CZone(s) reclaimed (request {r['seq']}), the guest gave "
               f"back {r['bytes'] / MiB:.1f} MiB: " + ("the host's side was not measured"
                                                       if drop is None else
                                                       f"{drop / MiB:.1f} MiB back to the host"))
