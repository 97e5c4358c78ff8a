"""libvirt migration without a libvirtd: the parameters, the destination's
XML, libvirt's statistics as QEMU's, and the service's refusals.
(tests/vm/test_libvirt_migrate.py migrates between two private libvirtds.)"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from czone import libvirt_migrate as lm
from czone.errors import CZoneError
from czone.libvirt_xml import CZONE_NS, build_xml
from czone.service import Service, ServiceError
from czone.state import StateDB, VmRecord, process_start
from czone.vmspec import save_spec
from tests.unit.test_migrate import SPEC

libvirt = pytest.importorskip("libvirt")
NOWHERE = "qemu:///system?socket=/nonexistent/czone-test/libvirt-sock"
LOCAL_A = "qemu:///system?socket=/tmp/a/libvirt-sock"


def test_the_stream_goes_where_the_destination_is() -> None:
    assert lm.data_address(LOCAL_A, "qemu+tcp://127.0.0.1:16509/system") == "127.0.0.1"
    assert lm.data_address(LOCAL_A, "qemu+ssh://root@h2.example/system") == "h2.example"
    # two daemons on this machine
    assert lm.data_address(LOCAL_A, "qemu:///system?socket=/tmp/b/sock") == "127.0.0.1"
    # a remote source and a local destination: libvirt's default
    assert lm.data_address("qemu+ssh://h1/system", "qemu:///system") is None


def test_params() -> None:
    p = lm.migration_params(LOCAL_A, "qemu+tcp://127.0.0.1:1/system", "<domain/>", 16 << 20)
    assert p == {libvirt.VIR_MIGRATE_PARAM_DEST_XML: "<domain/>",
                 libvirt.VIR_MIGRATE_PARAM_PERSIST_XML: "<domain/>",
                 libvirt.VIR_MIGRATE_PARAM_BANDWIDTH: 16,
                 libvirt.VIR_MIGRATE_PARAM_URI: "tcp://127.0.0.1",
                 libvirt.VIR_MIGRATE_PARAM_LISTEN_ADDRESS: "127.0.0.1"}
    # a real host: the stream goes to its name, it listens where its qemu.conf says
    p = lm.migration_params(LOCAL_A, "qemu+ssh://h2/system", "<domain/>", 1)
    assert p[libvirt.VIR_MIGRATE_PARAM_URI] == "tcp://h2"
    assert libvirt.VIR_MIGRATE_PARAM_LISTEN_ADDRESS not in p
    # bytes/s to MiB/s rounded up; never 0, which would mean no cap
    assert p[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] == 1
    p = lm.migration_params(LOCAL_A, "qemu+ssh://h2/system", "<domain/>", (1 << 20) + 1)
    assert p[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] == 2
    flags = lm.flags()
    for f in ("LIVE", "PERSIST_DEST", "UNDEFINE_SOURCE", "UNSAFE"):
        assert flags & getattr(libvirt, f"VIR_MIGRATE_{f}"), f
    assert not flags & libvirt.VIR_MIGRATE_PEER2PEER


class FakeDomain:
    """What destination_xml asks of the source domain."""

    def __init__(self, meta: str | None):
        self.meta = meta

    def UUIDString(self) -> str:  # noqa: N802 (libvirt's name)
        return "2beec001-6dd5-4e7d-8bc9-23f80faf94c5"

    def name(self) -> str:
        return "czone-vm0"

    def metadata(self, kind: int, ns: str) -> str:
        assert (kind, ns) == (libvirt.VIR_DOMAIN_METADATA_ELEMENT, CZONE_NS)
        if self.meta is None:
            raise libvirt.libvirtError("metadata not found")
        return self.meta


def test_the_destination_xml_carries_the_uuid_and_the_records() -> None:
    dst = replace(SPEC, run_dir=Path("/run/vm0.ab12cd"), ssh_port=2300)
    # as libvirt returns our element: without its namespace
    live = ('<vm name="vm0" fn="matmul" mode="mcpv" memory-mode="czone">\n'
            '  <containers>[{"czone": 1, "id": "matmul-1"}]</containers>\n</vm>')
    out = ET.fromstring(lm.destination_xml(FakeDomain(live), build_xml(dst, "matmul", "mcpv")))
    assert [el.tag for el in out][:2] == ["name", "uuid"]
    assert out.findtext("uuid") == "2beec001-6dd5-4e7d-8bc9-23f80faf94c5"
    [meta] = out.find("metadata")  # type: ignore[misc]
    assert meta.tag == f"{{{CZONE_NS}}}vm" and meta.get("fn") == "matmul"
    assert meta.findtext(f"{{{CZONE_NS}}}containers") == '[{"czone": 1, "id": "matmul-1"}]'
    # the rest is build_xml's: the new run dir and SSH port
    assert out.find("devices/serial/source").get("path") == "/run/vm0.ab12cd/serial.log"
    args = [a.get("value") for a in out.iter("{http://libvirt.org/schemas/domain/qemu/1.0}arg")]
    assert any(":2300-:22" in (a or "") for a in args)
    with pytest.raises(lm.LibvirtMigrationError, match="has no CZone metadata"):
        lm.destination_xml(FakeDomain(None), build_xml(dst))


def test_libvirts_statistics_read_as_query_migrate() -> None:
    stats = {"time_elapsed": 1035, "downtime": 56, "memory_processed": 137069436,
             "memory_total": 3221757952, "memory_remaining": 0, "memory_constant": 99379,
             "memory_normal": 33181, "memory_normal_bytes": 135909376, "memory_iteration": 3,
             "memory_page_size": 4096, "disk_total": 0}
    assert lm.ram_stats(stats) == {"transferred": 137069436, "total": 3221757952,
                                   "remaining": 0, "duplicate": 99379, "normal": 33181,
                                   "normal-bytes": 135909376, "dirty-sync-count": 3,
                                   "page-size": 4096}


@pytest.fixture
def running(tmp_path: Path) -> Iterator[subprocess.Popen]:
    """A process whose pid stands for a running VM's QEMU."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


def add(db: StateDB, pid: int, backend: str, uri: str | None) -> VmRecord:
    run_dir = db.vm_dir("vm0")
    run_dir.mkdir(parents=True)
    save_spec(replace(SPEC, run_dir=run_dir))
    rec = VmRecord(name="vm0", state="up", pid=pid, proc_start=process_start(pid),
                   qmp_socket="", ssh_port=2222, ssh_key="/k", run_dir=str(run_dir),
                   accel="tcg", memory_mib=512, cpus=1, created=1.0, fn="matmul", mode="mcpv",
                   memory_mode="czone", device_mib=1024, requested_mib=256, backend=backend,
                   uri=uri)
    db.reserve(rec)
    return rec


def test_the_wrong_way_round_is_one_line(running: subprocess.Popen) -> None:
    db = StateDB()
    rec = add(db, running.pid, "libvirt", NOWHERE)
    svc = Service(db=db)
    with pytest.raises(ServiceError) as e:
        svc.vm_migrate("vm0")
    assert str(e.value) == (f"VM 'vm0' is a libvirt domain at {NOWHERE}; a libvirt VM "
                            "migrates to another host: --to HOST")
    with pytest.raises(ServiceError, match="VM 'vm0' already runs at "):
        svc.vm_migrate("vm0", to_uri=NOWHERE)
    with pytest.raises(ServiceError, match="is a libvirt domain at .* --to HOST"):
        svc.migration_plan("vm0")
    # An unreachable destination fails before anything is written or moved.
    other = "qemu:///system?socket=/nonexistent/czone-test/other-sock"
    with pytest.raises(CZoneError, match=re.escape(f"cannot connect to libvirt at {other}")) as e:
        svc.vm_migrate("vm0", to_uri=other)
    assert "\n" not in str(e.value)
    assert db.get("vm0") == rec
    assert db.migration_markers() == []
    assert [d.name for d in (db.root / "vms").iterdir()] == ["vm0"]


def test_a_plain_vm_takes_no_destination_host(running: subprocess.Popen) -> None:
    db = StateDB()
    add(db, running.pid, "qemu", None)
    with pytest.raises(ServiceError) as e:
        Service(db=db).vm_migrate("vm0", to_uri="qemu+ssh://h2/system")
    assert str(e.value) == ("VM 'vm0' runs under plain QEMU; --to HOST is for libvirt VMs "
                            "(this one migrates into a new QEMU process on this host)")


def marker(db: StateDB, rec: VmRecord, dst_uri: str) -> dict:
    """A migration marker whose owner is dead (pid 1 never started at 0.0)."""
    m = {"owner_pid": 1, "owner_start": 0.0, "src_run_dir": rec.run_dir,
         "dst_run_dir": f"{rec.run_dir}.ab12cd", "backend": "libvirt", "src_uri": rec.uri,
         "dst_uri": dst_uri, "uuid": "2beec001-6dd5-4e7d-8bc9-23f80faf94c5",
         "dst_ssh_port": 2300}
    path = db.migration_marker(rec.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(m))
    Path(m["dst_run_dir"]).mkdir()
    return m


@pytest.mark.parametrize("moved", [False, True])
def test_a_migration_whose_czonectl_died(running: subprocess.Popen, moved: bool,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The next command settles it: whichever side runs the guest keeps it;
    the record follows the guest, the other side's domain and run dir go."""
    from czone import libvirt_backend, recovery

    db = StateDB()
    rec = add(db, running.pid, "libvirt", LOCAL_A)
    dst_uri = "qemu+tcp://127.0.0.1:1/system"
    m = marker(db, rec, dst_uri)
    calls: list[tuple] = []
    monkeypatch.setattr(lm, "moved_domain", lambda *a: object() if moved else None)
    monkeypatch.setattr(lm, "rescue", lambda *a: calls.append(("rescue", *a)) or "")
    monkeypatch.setattr(libvirt_backend, "remove_domain",
                        lambda *a: calls.append(("remove", *a)) or "destroyed and undefined")
    monkeypatch.setattr(libvirt_backend, "qemu_processes", lambda uuid: [])
    [line] = recovery._settle_migration(Service(db=db), db.migration_marker("vm0"))
    after = db.get("vm0")
    if moved:
        assert line == (f"VM vm0: a migration was cut short; the guest runs at {dst_uri}, the "
                        "record follows it; the source's domain: destroyed and undefined")
        assert calls == [("remove", LOCAL_A, "vm0")]
        assert (after.uri, after.run_dir, after.ssh_port) == (dst_uri, m["dst_run_dir"], 2300)
        assert not Path(rec.run_dir).exists() and Path(m["dst_run_dir"]).exists()
    else:
        assert line == f"VM vm0: a migration was cut short; the guest runs on at {LOCAL_A}"
        assert calls == [("rescue", "vm0", LOCAL_A, dst_uri, m["uuid"])]
        assert after == rec
        assert Path(rec.run_dir).exists() and not Path(m["dst_run_dir"]).exists()
    assert db.migration_markers() == []


def test_a_migration_that_cannot_be_settled_yet_keeps_its_marker(
        running: subprocess.Popen, monkeypatch: pytest.MonkeyPatch) -> None:
    """A host that does not answer: nothing is removed, the marker stays for
    a later command; a remote destination's record gets pid 0."""
    from czone import libvirt_backend, recovery

    db = StateDB()
    rec = add(db, running.pid, "libvirt", LOCAL_A)
    far = "qemu+ssh://root@h2.example/system"
    m = marker(db, rec, far)

    def down(*_a: object) -> None:
        raise libvirt_backend.LibvirtError(f"cannot connect to libvirt at {far}")

    monkeypatch.setattr(lm, "moved_domain", down)
    [line] = recovery._settle_migration(Service(db=db), db.migration_marker("vm0"))
    assert line == ("VM vm0: a migration was cut short; cannot settle it yet (the marker "
                    f"stays): cannot connect to libvirt at {far}")
    assert db.migration_markers() == [db.migration_marker("vm0")]
    assert Path(rec.run_dir).exists() and Path(m["dst_run_dir"]).exists()
    assert db.get("vm0") == rec

    monkeypatch.setattr(lm, "moved_domain", lambda *a: object())
    monkeypatch.setattr(libvirt_backend, "remove_domain", lambda *a: "destroyed and undefined")
    recovery._settle_migration(Service(db=db), db.migration_marker("vm0"))
    after = db.get("vm0")
    assert (after.uri, after.pid, after.proc_start) == (far, 0, 0.0)
    assert db.migration_markers() == []
