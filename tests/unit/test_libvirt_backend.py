"""The backend seam without a libvirtd: options, records, one-line errors.
(tests/vm/test_libvirt.py drives a private libvirtd end to end.)"""

from __future__ import annotations

import os
import sqlite3
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from click.testing import CliRunner

from czone.cli import cli
from czone.service import Service, ServiceError
from czone.state import StateDB, VmRecord, process_start, status

pytest.importorskip("libvirt")
NOWHERE = "qemu:///system?socket=/nonexistent/czone-test/libvirt-sock"


def invoke(*args: str):  # noqa: ANN201
    return CliRunner().invoke(cli, list(args))


def test_dry_run_prints_the_domain(fake_artifacts: dict) -> None:
    r = invoke("vm", "up", "--name", "lv0", "--backend", "libvirt", "--memory-mode", "czone",
               "--device-memory", "1024", "--dry-run")
    assert r.exit_code == 0, r.output
    dom = ET.fromstring(r.output)
    assert dom.findtext("name") == "czone-lv0"
    assert dom.findtext("devices/emulator") == str(fake_artifacts["qemu"])


def test_unreachable_uri_is_one_line(fake_artifacts: dict, monkeypatch: pytest.MonkeyPatch
                                     ) -> None:
    monkeypatch.setenv("CZONE_ACCEL", "tcg")
    r = invoke("vm", "up", "--name", "lv0", "--backend", "libvirt", "--connect", NOWHERE)
    assert r.exit_code == 1
    assert r.output.splitlines()[-1] == (
        f"czonectl: error: cannot connect to libvirt at {NOWHERE}: Failed to connect socket "
        "to '/nonexistent/czone-test/libvirt-sock': No such file or directory")
    assert "Traceback" not in r.output
    assert StateDB().list() == []  # nothing reserved


def test_unsupported_spec_refused_before_any_record(fake_artifacts: dict,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CZONE_ACCEL", "tcg")
    r = invoke("vm", "up", "--backend", "libvirt", "--connect", NOWHERE, "--cpus", "2")
    assert r.exit_code == 1 and "runs one vCPU" in r.output
    assert StateDB().list() == []


def test_backend_options_checked() -> None:
    with pytest.raises(ServiceError, match="unknown backend"):
        Service(backend="xen")
    with pytest.raises(ServiceError, match="--connect and --host are for --backend libvirt"):
        Service(uri="qemu:///system")
    with pytest.raises(ServiceError, match="give one"):
        Service(backend="libvirt", uri="qemu:///system", host="h")
    assert [h.uri for h in Service(backend="libvirt").hosts()] == ["qemu:///system"]


def test_old_store_reads_as_qemu_backend(tmp_path: Path) -> None:
    db = StateDB(tmp_path)
    conn = sqlite3.connect(db.path)
    conn.execute("CREATE TABLE vms (name TEXT PRIMARY KEY, state TEXT NOT NULL, pid INTEGER "
                 "NOT NULL, proc_start REAL NOT NULL, qmp_socket TEXT NOT NULL, ssh_port "
                 "INTEGER, ssh_key TEXT, run_dir TEXT NOT NULL, accel TEXT NOT NULL, "
                 "memory_mib INTEGER NOT NULL, cpus INTEGER NOT NULL, created REAL NOT NULL)")
    conn.execute("INSERT INTO vms VALUES ('old', 'up', 1, 1.0, '/q', 22, '/k', '/r', 'tcg', "
                 "512, 1, 1.0)")
    conn.commit()
    conn.close()
    [rec] = db.list()
    assert (rec.backend, rec.uri) == ("qemu", None)


def test_libvirt_record_unreachable_falls_back_to_pid() -> None:
    rec = VmRecord(name="lv", state="up", pid=os.getpid(), proc_start=process_start(os.getpid()),
                   qmp_socket="", ssh_port=None, ssh_key=None, run_dir="/r", accel="tcg",
                   memory_mib=512, cpus=1, created=1.0, backend="libvirt", uri=NOWHERE)
    assert status(rec) == "running"


def _libvirt_record(name: str) -> None:
    me = os.getpid()
    StateDB().reserve(VmRecord(name=name, state="up", pid=me, proc_start=process_start(me),
                               qmp_socket="", ssh_port=None, ssh_key=None, run_dir="/r",
                               accel="tcg", memory_mib=512, cpus=1, created=1.0, fn="matmul",
                               mode="mcpv", backend="libvirt", uri=NOWHERE))


def test_a_libvirt_vm_migrates_only_to_another_host(fake_artifacts: dict) -> None:
    _libvirt_record("lv")
    r = invoke("vm", "migrate", "lv")
    assert r.exit_code == 1 and r.output.splitlines()[-1] == (
        f"czonectl: error: VM 'lv' is a libvirt domain at {NOWHERE}; a libvirt VM migrates "
        "to another host: --to HOST")
    # reconcile says it could not ask libvirt (the record's URI is unreachable)
    assert f"reconcile: cannot list the domains at {NOWHERE}: cannot connect" in r.output
    r = invoke("run", "matmul", "--mode", "scpv-template", "--backend", "libvirt",
               "--connect", NOWHERE)
    assert r.exit_code == 1 and r.output.endswith(
        "use an MCPV mode\n") and r.output.count("\n") == 1


def test_a_failed_uri_is_not_retried_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    import libvirt

    from czone import libvirt_backend

    uri = NOWHERE + "-once"
    calls = []
    real_open = libvirt.open
    monkeypatch.setattr(libvirt, "open", lambda u: calls.append(u) or real_open(u))
    for _ in range(3):
        with pytest.raises(libvirt_backend.LibvirtError, match="cannot connect to libvirt"):
            libvirt_backend.connect(uri)
    assert calls == [uri]
    monkeypatch.setattr(libvirt_backend, "RETRY_AFTER", 0.0)
    with pytest.raises(libvirt_backend.LibvirtError):
        libvirt_backend.connect(uri)
    assert calls == [uri, uri]


class _Conn:
    def __init__(self, alive: bool = True):
        self.alive = alive

    def isAlive(self) -> bool:  # noqa: N802 (libvirt's name)
        return self.alive


def test_a_broken_connection_waits_for_the_daemon(monkeypatch: pytest.MonkeyPatch) -> None:
    """libvirtd restarting: a connection that died is reopened once the daemon
    answers again; a URI never reached fails at once."""
    import libvirt

    from czone import libvirt_backend

    uri = NOWHERE + "-restart"
    monkeypatch.setattr(libvirt_backend, "RECONNECT_POLL", 0.01)
    monkeypatch.setitem(libvirt_backend._conns, uri, _Conn(alive=False))
    fresh = _Conn()
    answers = [libvirt.libvirtError("down"), libvirt.libvirtError("down"), fresh]

    def fake_open(u: str) -> _Conn:
        a = answers.pop(0)
        if isinstance(a, Exception):
            raise a
        return a

    monkeypatch.setattr(libvirt, "open", fake_open)
    assert libvirt_backend.connect(uri) is fresh and answers == []

    fresh.alive = False
    monkeypatch.setattr(libvirt_backend, "RECONNECT_TIMEOUT", 0.05)
    monkeypatch.setattr(libvirt, "open", lambda u: (_ for _ in ()).throw(
        libvirt.libvirtError("still down")))
    with pytest.raises(libvirt_backend.LibvirtError, match="did not come back within 0s"):
        libvirt_backend.connect(uri)
