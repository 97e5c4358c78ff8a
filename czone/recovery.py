"""Recovery: repair what a czonectl process that died midway left behind,
against the real QEMU processes and the guest agents' lists.  Every command
of the service layer runs ``reconcile`` first."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from czone import bridge, libvirt_backend, libvirt_migrate, migrate
from czone.endpoint import is_remote
from czone.errors import CZoneError
from czone.libvirt_xml import domain_name
from czone.netplan import staging_tap_name
from czone.placement import MCPV_MODES
from czone.qemu.machine import kill_strays
from czone.state import (
    CtrRecord,
    VmRecord,
    ctrs_in,
    live_process,
    pid_matches,
    status,
    vms_in,
)
from czone.template import guest_id

if TYPE_CHECKING:
    from czone.service import Service


def reconcile(svc: Service) -> list[str]:
    """Repair records left by a czonectl that died midway; says what it did.

    - a container whose VM is dead is *lost*;
    - a VM record still ``starting`` whose owner died: its QEMU (if any)
      is killed and its containers are lost;
    - a container ``starting`` or ``stopping`` whose owner died is settled
      by the agent's list: running there -> running (or killed, if it
      was being stopped); absent -> lost or removed;
    - a dead bridged VM's tap is deleted, and a namespace of ours that no
      live VM uses goes, bridge and all (``reconcile_net``).
    - a migration whose owner died: before the hand-over, the destination
      is killed and the source made to run; after it, the source is killed.
    """
    done: list[str] = []
    for marker in svc.db.migration_markers():
        done += _settle_migration(svc, marker)
    for vm in svc.db.list():
        if vm.state == "starting" and live_process(vm.pid, vm.proc_start) is None:
            if vm.backend == "libvirt" and vm.uri:
                try:
                    what = f"its domain {libvirt_backend.remove_domain(vm.uri, vm.name)}"
                except CZoneError as e:
                    done.append(f"VM {vm.name}: its boot was cut short; {e}")
                    continue
            else:
                what = f"{kill_strays(Path(vm.run_dir))} QEMU process(es) killed"
            svc.db.set_vm(vm.name, state="dead")
            done.append(f"VM {vm.name}: its boot was cut short; {what}")
    done += reconcile_net(svc)
    done += _libvirt_orphans(svc)
    pending: dict[str, list[CtrRecord]] = {}
    # The VMs' states first: asking libvirt (maybe another machine) must not
    # hold the store's write lock.
    seen = {v.name: status(v) for v in svc.db.list()}
    # One snapshot of both tables: a VM and its first container are
    # written together by _place, and must be read together.
    with svc.db.transaction() as conn:
        vms = {v.name: v for v in vms_in(conn)}
        for c in ctrs_in(conn):
            vm = vms.get(c.vm)
            if c.state != "lost" and (vm is None or seen.get(vm.name) == "dead"):
                conn.execute("UPDATE containers SET state='lost' WHERE id=? AND state=?",
                             (c.id, c.state))
                done.append(f"container {c.id}: lost with VM {c.vm}")
            elif c.state in ("starting", "stopping") and not c.owner_alive():
                pending.setdefault(c.vm, []).append(c)
    for vm_name, ctrs in pending.items():
        try:
            listed = {c["id"]: c for c in svc.ask(vm_name, lambda a: a.list())}
        except CZoneError as e:
            done.append(f"VM {vm_name}: cannot reach the agent to reconcile: {e}")
            continue
        for c in ctrs:
            try:
                done.append(_settle(svc, c, vms[vm_name], listed))
            except CZoneError as e:
                done.append(f"container {c.id}: cannot settle it yet: {e}")
    for line in done:
        svc.progress(f"reconcile: {line}")
    return done


def _settle(svc: Service, c: CtrRecord, vm: VmRecord, listed: dict[str, Any]) -> str:
    """One container whose owner died midway, against the agent's list."""
    gid = guest_id(vm.mode or "mcpv", c.id)
    state = listed.get(gid, {}).get("state")
    if c.state == "starting" and state == "running":
        svc.db.set_ctr(c.id, state="running", czone=listed[gid]["czone"])
        return f"container {c.id}: start cut short, found running"
    if vm.mode not in MCPV_MODES:
        svc.vm_down(vm.name, timeout=5)
        svc.db.remove_ctr(c.id)
        return f"container {c.id}: {c.state} cut short; its SCPV VM stopped"
    if gid in listed:
        svc.ask(vm.name, lambda a: svc.kill_in_guest(a, gid))
    if c.state == "stopping":
        svc.db.remove_ctr(c.id)
        return f"container {c.id}: kill cut short; finished it"
    svc.db.set_ctr(c.id, state="lost")
    return f"container {c.id}: start cut short before it ran (lost)"


def _libvirt_orphans(svc: Service) -> list[str]:
    """Ask libvirt which domains exist: at every URI our records use, a
    domain of ours (by its metadata) that no record has is reported, never
    touched (it may be another state store's)."""
    vms = svc.db.list()
    names = {v.name for v in vms}
    done = []
    for uri in sorted({v.uri for v in vms if v.backend == "libvirt" and v.uri}):
        try:
            doms = libvirt_backend.our_domains(uri)
        except CZoneError as e:
            done.append(f"cannot list the domains at {uri}: {e}")
            continue
        for vm, active in sorted(doms.items()):
            if vm not in names:
                done.append(f"domain {domain_name(vm)} at {uri} carries CZone metadata but no "
                            f"record here has it ({'running' if active else 'shut off'}); "
                            "left alone")
    return done


def reconcile_net(svc: Service) -> list[str]:
    """Taps of dead bridged VMs, and our namespaces no live VM uses: what a
    crash of czonectl (or of QEMU) may have left.  The namespaces looked at
    are the records' and this Service's own, which a crash between the last
    record's removal and the namespace's may have left alone."""
    done: list[str] = []
    names = {v.netns for v in svc.db.list() if v.net == "bridge" and v.netns}
    try:
        names.add(svc.netns)
    except CZoneError:
        pass  # an invalid $CZONE_NETNS is reported where a bridge is asked for
    for name in sorted(names):
        ns = bridge.Namespace(name, svc.db.root)
        if not ns.ours():
            continue
        with ns.locked():
            vms = [v for v in svc.db.list() if v.net == "bridge" and v.netns == name]
            for v in vms:
                if status(v) == "dead" and v.tap and ns.delete_tap(v.tap):
                    done.append(f"VM {v.name}: its tap {v.tap} deleted")
                staged = staging_tap_name(v.run_dir)
                if v.backend == "libvirt" and status(v) == "dead" and \
                        bridge.unstage_tap(staged):
                    done.append(f"VM {v.name}: its tap {staged} deleted from the host's "
                                "namespace")
            if all(status(v) == "dead" for v in vms) and ns.remove():
                done.append(f"network namespace {name} removed: no live VM uses it")
    return done


def _settle_migration(svc: Service, marker: Path) -> list[str]:
    """A migration marker (``Service.vm_migrate``) whose owner died midway."""
    name = marker.stem
    try:
        m = json.loads(marker.read_text())
        if pid_matches(m["owner_pid"], m["owner_start"]):
            return []
        src, dst = Path(m["src_run_dir"]), Path(m["dst_run_dir"])
    except FileNotFoundError:
        return []  # its owner finished meanwhile
    except (OSError, ValueError, KeyError, TypeError) as e:
        marker.unlink(missing_ok=True)
        return [f"VM {name}: unreadable migration marker removed ({e})"]
    rec = next((v for v in svc.db.list() if v.name == name), None)
    if m.get("backend") == "libvirt":
        settled, what = _settle_libvirt_migration(svc, name, m, rec)
        if not settled:  # the marker stays: a later command settles it
            return [f"VM {name}: a migration was cut short; {what}"]
        rec = next((v for v in svc.db.list() if v.name == name), None)
        shutil.rmtree(src if rec is not None and Path(rec.run_dir) == dst else dst,
                      ignore_errors=True)
        marker.unlink(missing_ok=True)
        return [f"VM {name}: a migration was cut short; {what}"]
    if rec is not None and Path(rec.run_dir) == dst:
        # Handed over: what is left of the source goes.
        what = f"the source's {kill_strays(src)} QEMU process(es) killed"
        shutil.rmtree(src, ignore_errors=True)
    else:
        what = f"the destination's {kill_strays(dst)} QEMU process(es) killed"
        shutil.rmtree(dst, ignore_errors=True)
        if rec is not None and status(rec) == "running":
            machine = svc.machine(rec)
            try:
                state = migrate.rescue_source(machine)
                what += f"; the VM runs on in its source ({state})"
            except CZoneError as e:
                what += f"; the source did not resume: {e}"
            finally:
                machine.close()
    marker.unlink(missing_ok=True)
    return [f"VM {name}: a migration was cut short; {what}"]


def _settle_libvirt_migration(svc: Service, name: str, m: dict[str, Any],
                              rec: VmRecord | None) -> tuple[bool, str]:
    """A libvirt migration whose czonectl died.  libvirt has cancelled a job
    whose client went away, unless the destination already ran the guest
    (then the source waits, paused): whichever side runs it keeps it.
    Whether it is settled (False: a host did not answer; the marker stays),
    and what was done."""
    src_uri, dst_uri = m["src_uri"], m["dst_uri"]
    if rec is None:
        return True, "the VM's record is gone; nothing done"
    try:
        if rec.uri == dst_uri:
            what = libvirt_backend.remove_domain(src_uri, name)
            return True, f"it had moved to {dst_uri}; the source's domain: {what}"
        uuid = m["uuid"]
        dst = libvirt_migrate.moved_domain(name, src_uri, dst_uri, uuid)
        if dst is not None:
            if is_remote(dst_uri):
                where: dict[str, Any] = {"pid": 0, "proc_start": 0.0}
            else:
                procs = [p for p in libvirt_backend.qemu_processes(uuid)
                         if any(m["dst_run_dir"] in a for a in p.cmdline())]
                where = ({"pid": procs[0].pid, "proc_start": procs[0].create_time()}
                         if len(procs) == 1 else {})
            svc.db.set_vm(name, uri=dst_uri, run_dir=m["dst_run_dir"],
                          ssh_port=m.get("dst_ssh_port"), **where)
            what = libvirt_backend.remove_domain(src_uri, name)
            return True, f"the guest runs at {dst_uri}, the record follows it; the " \
                         f"source's domain: {what}"
        done = libvirt_migrate.rescue(name, src_uri, dst_uri, uuid)
        return True, f"the guest runs on at {src_uri}" + (f"; {done}" if done else "")
    except CZoneError as e:
        return False, f"cannot settle it yet (the marker stays): {e}"
