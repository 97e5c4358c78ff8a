"""Live migration of a libvirt MCPV VM between two libvirt endpoints (issue
11 §3, the libvirt half), through the service layer.

Two private libvirtds on this machine are two hosts: A reached through its
Unix socket, B through a remote URI (``qemu+tcp://127.0.0.1:PORT/system``).
The containers and their checks are test_migrate.py's: data written into
their CZones, one CZone full of holes after deletes and a reclaim.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import libvirt
import psutil
import pytest

from czone import hostmem, libvirt_backend
from czone.libvirt_xml import CZONE_NS
from czone.service import Service, ServiceError
from czone.state import StateDB
from tests.vm.conftest import REPO, node_failed, save_state_evidence
from tests.vm.test_migrate import (
    EXPECTED,
    FN,
    assert_sent_is_memory_in_use,
    device_state,
    guest_stats,
    three_containers_one_with_holes,
    verify_data,
    with_data,
)

pytestmark = pytest.mark.vm

MiB = hostmem.MiB


@pytest.fixture
def host_a(libvirtd_factory):
    return libvirtd_factory("a")


@pytest.fixture
def svc(request: pytest.FixtureRequest, artifacts, host_a,
        monkeypatch: pytest.MonkeyPatch) -> Iterator[Service]:
    """A Service that boots its VMs at host A; its VMs go at the end (the
    daemons' teardown destroys whatever domain is left), their serial logs
    kept if the test failed."""
    monkeypatch.setenv("CZONE_ACCEL", artifacts.accel)
    root = Path(tempfile.mkdtemp(prefix="czlm-"))
    service = Service(db=StateDB(root), backend="libvirt", uri=host_a.uri)
    try:
        yield service
    finally:
        service.close()
        if node_failed(request):
            save_state_evidence(service.db, REPO / "test-artifacts" / request.node.name / "vms")
        for vm in service.db.list():
            try:
                service.vm_down(vm.name, timeout=5)
            except Exception as e:  # noqa: BLE001 (cleanup goes on)
                print(f"cleanup of {vm.name}: {e}")
        shutil.rmtree(root, ignore_errors=True)


def domains(daemon) -> dict[str, tuple[bool, bool]]:
    """The daemon's domains: name -> (active, persistent)."""
    conn = daemon.connect()
    try:
        return {d.name(): (bool(d.isActive()), bool(d.isPersistent()))
                for d in conn.listAllDomains()}
    finally:
        conn.close()


def uuid_and_state(daemon, vm: str) -> tuple[str, int]:
    conn = daemon.connect()
    try:
        dom = conn.lookupByName(f"czone-{vm}")
        return dom.UUIDString(), dom.state()[0]
    finally:
        conn.close()


def listed_records(daemon, vm: str) -> dict[str, dict]:
    """The CZone records in the domain's metadata, by container id."""
    conn = daemon.connect()
    try:
        dom = conn.lookupByName(f"czone-{vm}")
        meta = ET.fromstring(dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, CZONE_NS))
    finally:
        conn.close()
    return {c["id"]: c for c in json.loads(meta.findtext("containers") or "[]")}


def answers(svc: Service, vm: str, ctr: str, files: int) -> None:
    reply, _ = svc.invoke(ctr)
    assert reply["ok"] and reply["result"] == EXPECTED["result"], (ctr, reply)
    assert verify_data(svc, vm, ctr) == files


def test_three_live_containers_migrate_to_another_host(svc: Service, host_a,
                                                       libvirtd_factory) -> None:
    host_b = libvirtd_factory("b", tcp=True)
    runs, vm, files = three_containers_one_with_holes(svc)

    before = svc.db.get(vm)
    dev_before = device_state(svc, vm)
    stats_before = guest_stats(svc, vm)
    ps_before = {c["id"]: (c["czone"], c["state"]) for c in svc.ps()}
    records_before = listed_records(host_a, vm)
    assert set(records_before) == set(files)
    qemu_rss = hostmem.stable_rss(before.pid)
    backed = hostmem.stable_mapping_rss(before.pid, "memfd:memory-backend-memfd")
    assert dev_before["size"] - backed >= 16 * MiB, ("the test needs holes in plugged chunks",
                                                     dev_before["size"], backed)
    uuid, _ = uuid_and_state(host_a, vm)
    # The dry run: the XML B will get, with the domain's UUID and records.
    planned = ET.fromstring(svc.libvirt_migration_xml(vm, host_b.tcp_uri))
    assert planned.findtext("uuid") == uuid
    planned_records = planned.findtext(f"metadata/{{{CZONE_NS}}}vm/{{{CZONE_NS}}}containers")
    assert {c["id"]: c for c in json.loads(planned_records or "[]")} == records_before

    res = svc.vm_migrate(vm, to_uri=host_b.tcp_uri)
    print(f"migrated {host_a.uri} -> {host_b.tcp_uri}: {res.total_s:.1f}s, QEMU's "
          f"{res.total_time_ms} ms, downtime {res.downtime_ms} ms, ram {res.ram}, device RSS "
          f"{res.src_device_rss} -> {res.dst_device_rss}; source QEMU RSS {qemu_rss}, "
          f"plugged {dev_before['size']}, backed {backed}")

    # The domain moved: gone from A, persistent and running at B, with the
    # CZone records it carried in its metadata.
    assert domains(host_a) == {}
    assert domains(host_b) == {f"czone-{vm}": (True, True)}
    assert listed_records(host_b, vm) == records_before
    # The record follows it.
    after = svc.db.get(vm)
    assert (after.uri, after.pid, after.run_dir, after.ssh_port) == (
        host_b.tcp_uri, res.dst_pid, res.run_dir, res.ssh_port)
    assert after.ssh_port != before.ssh_port and after.run_dir != before.run_dir
    assert [p.pid for p in libvirt_backend.qemu_processes(uuid)] == [res.dst_pid]
    assert not psutil.pid_exists(before.pid) or \
        psutil.Process(before.pid).status() == psutil.STATUS_ZOMBIE
    assert not Path(before.run_dir).exists()

    # The device's state and the guest's counters arrived as they were.
    dev_after = device_state(svc, vm)
    assert dev_after.pop("generation") >= dev_before.pop("generation")
    assert dev_after == dev_before
    assert guest_stats(svc, vm) == stats_before
    assert {c["id"]: (c["czone"], c["state"]) for c in svc.ps()} == ps_before
    for r in runs:
        answers(svc, vm, r.id, files[r.id])
    assert set(svc.stats()[vm]["containers"]) == {r.id for r in runs}

    # libvirt's job statistics are QEMU's query-migrate
    assert_sent_is_memory_in_use(res.ram, qemu_rss, backed)
    assert res.dst_device_rss is not None and res.dst_device_rss <= backed + 8 * MiB, \
        (res.dst_device_rss, backed)

    assert svc.vm_down(vm) == "stopped"
    assert domains(host_b) == {}


def check_source_intact(svc: Service, host_a, host_b, vm: str, before, ctr: str) -> None:
    """After a failed migration: the record, the domain and the QEMU are the
    source's, its container answers with its data, nothing is left at B."""
    rec = svc.db.get(vm)
    assert (rec.uri, rec.pid, rec.run_dir, rec.ssh_port) == (
        before.uri, before.pid, before.run_dir, before.ssh_port)
    assert domains(host_a) == {f"czone-{vm}": (True, True)}
    uuid, state = uuid_and_state(host_a, vm)
    assert state == libvirt.VIR_DOMAIN_RUNNING
    assert domains(host_b) == {}
    assert [p.pid for p in libvirt_backend.qemu_processes(uuid)] == [before.pid]
    assert sorted(d.name for d in (svc.db.root / "vms").iterdir()) == [vm]
    answers(svc, vm, ctr, 32)


def test_a_destination_without_our_qemu_build(svc: Service, host_a, libvirtd_factory,
                                              artifacts) -> None:
    # B sees an empty directory where our QEMU build is.
    host_b = libvirtd_factory("b", tcp=True, hide=(artifacts.qemu.parent.parent,))
    first = svc.run(FN, args=with_data(32, False))
    vm = first.vm
    before = svc.db.get(vm)
    with pytest.raises(ServiceError) as err:
        svc.vm_migrate(vm, to_uri=host_b.tcp_uri)
    msg = str(err.value)
    print(msg)
    assert "\n" not in msg
    assert msg.startswith(f"VM {vm!r} did not migrate and runs on at {host_a.uri}: the "
                          f"destination {host_b.tcp_uri} cannot run our QEMU build "
                          f"{artifacts.qemu}: "), msg
    check_source_intact(svc, host_a, host_b, vm, before, first.id)

    # The wrong way round: one line each, nothing touched.
    with pytest.raises(ServiceError, match="a libvirt VM migrates to another host: --to HOST"):
        svc.vm_migrate(vm)
    with pytest.raises(ServiceError, match=re.escape(f"already runs at {host_a.uri}")):
        svc.vm_migrate(vm, to_uri=host_a.uri)
    check_source_intact(svc, host_a, host_b, vm, before, first.id)


def test_migrations_that_fail_midway_leave_the_source_running(svc: Service, host_a,
                                                              libvirtd_factory) -> None:
    host_b = libvirtd_factory("b", tcp=True)
    first = svc.run(FN, args=with_data(32, False))
    vm = first.vm
    before = svc.db.get(vm)
    uuid, _ = uuid_and_state(host_a, vm)

    # 1. The destination's QEMU dies while pages are on their way.
    failure: list[BaseException] = []

    def migrate() -> None:
        try:
            # ~600 MiB at 16 MiB/s: caught in the middle.
            other.vm_migrate(vm, timeout=300, max_bandwidth=16 * MiB, to_uri=host_b.tcp_uri)
        except BaseException as e:  # noqa: BLE001 (handed to the test thread)
            failure.append(e)

    other = Service(db=svc.db)
    t = threading.Thread(target=migrate)
    t.start()
    try:
        deadline = time.monotonic() + 120
        dst, base_rss = None, 0
        while dst is None or dst.memory_info().rss < 32 * MiB + base_rss:
            assert time.monotonic() < deadline, "no destination receiving pages"
            assert t.is_alive(), f"the migration ended before the fault: {failure}"
            if dst is None:
                found = [p for p in libvirt_backend.qemu_processes(uuid) if p.pid != before.pid]
                if found:
                    dst, base_rss = found[0], found[0].memory_info().rss
            time.sleep(0.02)
        dst.kill()
    finally:
        t.join(180)
        other.close()
    assert not t.is_alive(), "vm_migrate did not return after the destination died"
    assert failure and isinstance(failure[0], ServiceError), failure
    assert f"did not migrate and runs on at {host_a.uri}" in str(failure[0]), failure[0]
    print(f"destination killed: {failure[0]}")
    check_source_intact(svc, host_a, host_b, vm, before, first.id)

    # 2. Too slow for its timeout: the job is aborted.
    with pytest.raises(ServiceError, match="still running after 3s; aborted") as err:
        svc.vm_migrate(vm, timeout=3, max_bandwidth=8 * MiB, to_uri=host_b.tcp_uri)
    print(f"timed out: {err.value}")
    check_source_intact(svc, host_a, host_b, vm, before, first.id)

    # And then it migrates.
    res = svc.vm_migrate(vm, to_uri=host_b.tcp_uri)
    assert svc.db.get(vm).uri == host_b.tcp_uri and domains(host_a) == {}
    assert res.dst_pid != before.pid
    answers(svc, vm, first.id, 32)


def test_czonectl_killed_during_a_migration_is_settled_by_the_next_command(
        svc: Service, host_a, libvirtd_factory) -> None:
    host_b = libvirtd_factory("b", tcp=True)
    first = svc.run(FN, args=with_data(32, False))
    vm = first.vm
    before = svc.db.get(vm)
    uuid, _ = uuid_and_state(host_a, vm)
    code = ("import sys; from pathlib import Path; from czone.service import Service; "
            "from czone.state import StateDB; "
            "Service(db=StateDB(Path(sys.argv[1]))).vm_migrate(sys.argv[2], timeout=300, "
            "max_bandwidth=16 << 20, to_uri=sys.argv[3])")
    proc = subprocess.Popen([sys.executable, "-c", code, str(svc.db.root), vm, host_b.tcp_uri],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not [p for p in libvirt_backend.qemu_processes(uuid) if p.pid != before.pid]:
            assert time.monotonic() < deadline and proc.poll() is None, "no destination"
            time.sleep(0.02)
        time.sleep(2)  # pages are on their way
        assert proc.poll() is None, "the migration ended before the kill"
        proc.kill()
    finally:
        proc.wait(30)
    assert svc.db.migration_marker(vm).exists()

    done = svc.reconcile()
    print(done)
    [settled] = [line for line in done if "migration" in line]
    assert settled.startswith(f"VM {vm}: a migration was cut short; the guest runs on at "
                              f"{host_a.uri}"), settled
    assert not svc.db.migration_marker(vm).exists()
    check_source_intact(svc, host_a, host_b, vm, before, first.id)
