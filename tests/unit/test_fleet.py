"""The fleet without a libvirtd: the host records, the host choice, and the
CLI's one-line errors.  (tests/vm/test_fleet.py places on two real daemons.)"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from czone import fleet, libvirt_backend
from czone.cli import cli
from czone.placement import HostView, NoFit, choose_host, unbacked
from czone.state import HostError, HostRecord, InvalidName, StateDB, VmRecord, host_of

pytest.importorskip("libvirt")
NOWHERE = "qemu:///system?socket=/nonexistent/czone-test/libvirt-sock"
MiB = 1 << 20


def vm(name: str, uri: str | None, **kw: object) -> VmRecord:
    return VmRecord(name=name, state="up", pid=1, proc_start=1.0, qmp_socket="", ssh_port=22,
                    ssh_key=None, run_dir="/r", accel="tcg", memory_mib=256, cpus=1,
                    created=time.time(), backend="libvirt" if uri else "qemu", uri=uri,
                    **kw)  # type: ignore[arg-type]


def test_host_records(tmp_path: Path) -> None:
    db = StateDB(tmp_path)
    db.add_host("a", "qemu+tcp://127.0.0.1:1/system")
    db.add_host("b", "qemu:///system")
    with pytest.raises(HostError, match="already has that name"):
        db.add_host("a", "qemu:///other")
    with pytest.raises(HostError, match="host 'b' already has URI qemu:///system"):
        db.add_host("c", "qemu:///system")
    with pytest.raises(InvalidName):
        db.add_host("-x", "qemu:///x")
    assert [h.name for h in db.hosts()] == ["a", "b"]
    with pytest.raises(HostError, match=r"no host named 'z' \(known: a, b\)"):
        db.host("z")

    db.reserve(vm("v2", "qemu:///system"))
    db.reserve(vm("v1", "qemu:///system"))
    with pytest.raises(HostError, match="host 'b' holds VM.s. v1, v2; migrate them away"):
        db.remove_host("b")
    assert db.remove_host("a").uri == "qemu+tcp://127.0.0.1:1/system"
    hosts = db.hosts()
    assert [h.name for h in hosts] == ["b"]
    assert host_of(db.get("v1"), hosts) == "b"
    assert host_of(vm("q", None), hosts) == "local"
    assert host_of(vm("u", "qemu:///elsewhere"), hosts) == "qemu:///elsewhere"


def test_choose_host_by_headroom() -> None:
    GiB = 1 << 30
    assert choose_host([HostView("a", 10 * GiB), HostView("b", 12 * GiB, 4 * GiB)]) == "a"
    assert choose_host([HostView("b", 10 * GiB), HostView("a", 10 * GiB)]) == "a"  # tie: name
    # within the noise of free memory: the host with fewer of our VMs
    assert choose_host([HostView("a", 10 * GiB, 0, vms=1),
                        HostView("b", 10 * GiB - 100 * MiB, 0, vms=0)]) == "b"
    assert choose_host([HostView("a", 10 * GiB, 0, vms=1),
                        HostView("b", 10 * GiB - 200 * MiB, 0, vms=0)]) == "a"
    with pytest.raises(NoFit):
        choose_host([])
    assert unbacked(512, 100 * MiB) == 412 * MiB
    assert unbacked(512, None) == 512 * MiB
    assert unbacked(100, 300 * MiB) == 0


def test_promised_counts_what_grows() -> None:
    assert fleet.promised_mib(replace(vm("c", "u"), memory_mode="czone", requested_mib=128)) \
        == 384
    assert fleet.promised_mib(replace(vm("b", "u"), memory_mode="balloon", requested_mib=128)) \
        == 256


def test_boot_host_spreads_and_skips_dead_hosts(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Equal free memory (two endpoints of one machine): the host whose VMs
    have touched less of their promise loses; one that fails is passed over."""
    db = StateDB(tmp_path)
    a, b, c = (HostRecord(n, f"qemu:///{n}", 0.0) for n in "abc")
    rec = replace(vm("va", a.uri), memory_mode="czone", requested_mib=256)
    db.reserve(rec)
    monkeypatch.setattr(fleet, "status", lambda v: "running")

    def free(uri: str) -> int:
        if uri == c.uri:
            raise libvirt_backend.LibvirtError(f"cannot connect to libvirt at {uri}")
        return 8 << 30

    monkeypatch.setattr(libvirt_backend, "node_free", free)
    monkeypatch.setattr(libvirt_backend, "domain_rss", lambda uri, name: 200 * MiB)
    said: list[str] = []
    assert fleet.boot_host(db, [a, b, c], said.append) == b
    assert said == ["warning: host c is passed over: cannot connect to libvirt at qemu:///c"]
    assert fleet.host_view(db, a) == HostView("a", 8 << 30, (512 - 200) * MiB, 1)
    with pytest.raises(fleet.FleetError, match=r"no host answers \(c, d\)"):
        fleet.boot_host(db, [c, replace(c, name="d")], said.append)


def test_cli_host_errors_are_one_line() -> None:
    r = CliRunner().invoke(cli, ["host", "add", "h1", NOWHERE])
    assert r.exit_code == 1
    assert r.output.splitlines()[-1].startswith(f"czonectl: error: cannot connect to libvirt "
                                                f"at {NOWHERE}")
    assert StateDB().hosts() == []
    r = CliRunner().invoke(cli, ["host", "rm", "h1"])
    assert (r.exit_code, r.output.strip()) == (1, "czonectl: error: no host named 'h1'")
    r = CliRunner().invoke(cli, ["run", "float_operation", "--backend", "libvirt", "--host", "h1"])
    assert r.exit_code == 1 and "no host named 'h1'" in r.output
    r = CliRunner().invoke(cli, ["host", "list"])
    assert r.exit_code == 0 and "no host registered" in r.output


def test_a_bridged_vm_boots_only_on_this_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    from czone.service import Service, ServiceError

    db = StateDB()
    db.add_host("far", "qemu+ssh://root@h2.example/system")
    svc = Service(db=db, backend="libvirt")
    with pytest.raises(ServiceError, match="--net bridge needs a host on this machine"):
        svc.boot_uri("bridge")
    db.add_host("here", "qemu:///system")
    offered: list[list[str]] = []
    monkeypatch.setattr(fleet, "boot_host",
                        lambda _db, hosts, _p: offered.append([h.name for h in hosts])
                        or hosts[0])
    assert svc.boot_uri("bridge") == "qemu:///system"
    svc.boot_uri("user")
    assert offered == [["here"], ["far", "here"]]
