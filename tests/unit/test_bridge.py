"""Bridged networking without a guest: pyroute2 in a network namespace each
test makes for itself (root only), the preflight checks, and the CLI's
bad input.  The host's own interfaces are never touched."""

from __future__ import annotations

import itertools
import os
import shlex
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from pyroute2 import IPRoute, netns

from czone import bridge
from czone.bridge import BridgeError, Namespace
from czone.cli import cli
from czone.netplan import BRIDGE, allocate, nic_at
from czone.service import Service
from czone.state import StateDB, VmRecord, process_start

_seq = itertools.count()
needs_root = pytest.mark.skipif(os.geteuid() != 0 or not Path("/dev/net/tun").exists(),
                                reason="needs root and /dev/net/tun")


def invoke(*args: str):  # noqa: ANN201
    return CliRunner().invoke(cli, list(args))


@pytest.fixture
def ns_name(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A namespace name of this test's own, in $CZONE_NETNS; gone afterwards."""
    name = f"czone-u{os.getpid()}-{next(_seq)}"
    monkeypatch.setenv("CZONE_NETNS", name)
    yield name
    if bridge.exists(name):
        netns.remove(name)
        pytest.fail(f"the test left network namespace {name} behind")


def wait_gone(ns: Namespace, link: str, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while link in ns.links():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@needs_root
def test_namespace_bridge_and_a_tap_that_goes_with_its_descriptor(ns_name: str,
                                                                  tmp_path: Path) -> None:
    ns = Namespace(ns_name, tmp_path)
    with ns.locked():
        ns.ensure()
        ns.ensure()  # idempotent
        fd = ns.open_tap(allocate([]))
    assert bridge.exists(ns_name) and ns.ours()
    links = ns.links()
    assert links["czt2"]["master"] == links[BRIDGE]["index"]
    assert links["czt2"]["state"] == "up" and links[BRIDGE]["state"] == "up"
    os.close(fd)
    # Not persistent: the last descriptor (QEMU's, in real use) takes the tap along.
    assert wait_gone(ns, "czt2")
    assert ns.remove() and not bridge.exists(ns_name) and not ns.ours()
    assert not ns.remove()  # idempotent


@needs_root
def test_a_leftover_tap_is_replaced_and_delete_is_idempotent(ns_name: str,
                                                             tmp_path: Path) -> None:
    ns = Namespace(ns_name, tmp_path)
    nic = nic_at("10.77.0.5/24")
    with ns.locked():
        ns.ensure()
        first = ns.open_tap(nic)
        second = ns.open_tap(nic)  # a launch cut short left czt5 behind
    try:
        assert "czt5" in ns.links()
        assert ns.delete_tap("czt5") and not ns.delete_tap("czt5")
        assert "czt5" not in ns.links()
    finally:
        os.close(first)
        os.close(second)
        ns.remove()


@needs_root
def test_a_namespace_we_did_not_make_is_never_touched(ns_name: str, tmp_path: Path) -> None:
    netns.create(ns_name)
    try:
        ns = Namespace(ns_name, tmp_path)
        with pytest.raises(BridgeError, match=f"network namespace {ns_name} exists but "
                                              "czonectl did not create it"):
            ns.ensure()
        assert not ns.remove() and bridge.exists(ns_name)
        assert set(ns.links()) == {"lo"}
    finally:
        netns.remove(ns_name)


@needs_root
def test_a_socket_from_inside_the_namespace_reaches_only_the_bridge(ns_name: str,
                                                                     tmp_path: Path) -> None:
    ns = Namespace(ns_name, tmp_path)
    with ns.locked():
        ns.ensure()
    try:
        listener = bridge.in_netns(ns_name, lambda: __import__("socket").create_server(
            ("10.77.0.1", 0)))
        with listener:
            port = listener.getsockname()[1]
            with bridge.connect(ns_name, "10.77.0.1", port, timeout=5):
                conn, _ = listener.accept()
                conn.close()
        # The bridge's address exists only in the namespace, not on the host.
        with pytest.raises(OSError):
            __import__("socket").create_connection(("10.77.0.1", port), timeout=1).close()
    finally:
        ns.remove()


def test_preflight_wants_capabilities_and_tun(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    status = tmp_path / "status"
    status.write_text("Name:\tczonectl\nCapEff:\t0000000000001000\n")  # NET_ADMIN only
    monkeypatch.setattr(bridge, "PROC_STATUS", status)
    with pytest.raises(BridgeError, match=r"^--net bridge needs root \(CAP_SYS_ADMIN missing\)"):
        bridge.preflight()
    status.write_text("CapEff:\t000001ffffffffff\n")
    monkeypatch.setattr(bridge, "TUN_PATH", tmp_path / "tun")
    with pytest.raises(BridgeError, match=f"needs the tun device {tmp_path}/tun"):
        bridge.preflight()


def test_cli_bad_net_is_one_line(fake_artifacts: dict, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    for args in (("vm", "up", "--net", "tap", "--dry-run"), ("run", "matmul", "--net", "tap")):
        r = invoke(*args)
        assert r.exit_code == 1, r.output
        assert r.output == ("czonectl: error: unknown network mode 'tap' "
                            "(use one of: user, bridge)\n")
    r = invoke("run", "matmul", "--net", "bridge", "--mode", "scpv-snapshot")
    assert r.exit_code == 1 and r.output.count("\n") == 1
    assert "--net bridge is for MCPV VMs, not scpv-snapshot" in r.output
    status = tmp_path / "status"
    status.write_text("CapEff:\t000001ffffffffff\n")
    monkeypatch.setattr(bridge, "PROC_STATUS", status)
    monkeypatch.setattr(bridge, "TUN_PATH", tmp_path / "no-tun")
    r = invoke("run", "matmul", "--net", "bridge")
    assert r.exit_code == 1 and r.output.count("\n") == 1
    assert "czonectl: error: --net bridge needs the tun device" in r.output
    monkeypatch.setenv("CZONE_NETNS", "host0")
    r = invoke("vm", "up", "--net", "bridge", "--dry-run")
    assert r.exit_code == 1 and r.output.count("\n") == 1
    assert "invalid network namespace name 'host0'" in r.output


def test_dry_run_shows_the_tap_and_creates_nothing(fake_artifacts: dict, ns_name: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CZONE_ACCEL", "tcg")
    r = invoke("vm", "up", "--name", "b1", "--net", "bridge", "--ssh-port", "2299", "--dry-run")
    assert r.exit_code == 0, r.output
    argv = shlex.split(r.output.strip())
    assert "user,id=n0,hostfwd=tcp:127.0.0.1:2299-:22" in argv
    i = argv.index("tap,id=n1,fd=TAPFD")
    assert argv[i - 1:i + 3] == ["-netdev", "tap,id=n1,fd=TAPFD", "-device",
                                 "virtio-net-pci,netdev=n1,mac=52:54:00:77:00:02,romfile="]
    assert "ip=10.77.0.2:::255.255.255.0::eth1:off" in argv[argv.index("-append") + 1]
    assert StateDB().list() == [] and not bridge.exists(ns_name)


def bridged_record(name: str, address: str, pid: int, start: float, netns_: str) -> VmRecord:
    return VmRecord(name=name, state="up", pid=pid, proc_start=start, qmp_socket="/q",
                    ssh_port=1, ssh_key="/k", run_dir=f"/nonexistent/{name}", accel="tcg",
                    memory_mib=512, cpus=1, created=time.time(), net="bridge", netns=netns_,
                    net_addr=address, tap=f"czt{address.split('.')[3].split('/')[0]}")


@needs_root
def test_failed_launch_leaves_no_record_tap_or_namespace(fake_artifacts: dict, ns_name: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CZONE_ACCEL", "tcg")
    fake_artifacts["qemu"].write_text("#!/bin/sh\nls -l /proc/$$/fd >&2\nexit 1\n")
    r = invoke("vm", "up", "--name", "early", "--net", "bridge")
    assert r.exit_code == 1
    assert "czonectl: error: QEMU exited with status 1" in r.output
    # QEMU inherited the tap: the shell saw it as an open /dev/net/tun.
    assert "/dev/net/tun" in (StateDB().vm_dir("early") / "qemu.log").read_text()
    assert StateDB().list() == []
    assert not bridge.exists(ns_name)


@needs_root
def test_reconcile_deletes_dead_taps_and_unused_namespaces(ns_name: str) -> None:
    svc = Service()
    db = svc.db
    ns = Namespace(ns_name, db.root)
    me = os.getpid()
    with ns.locked():
        ns.ensure()
        live_fd = ns.open_tap(nic_at("10.77.0.2/24"))
    # czt3 outlived its VM: persistent, as a launch that died between pyroute2's
    # creating it and czonectl's opening it would leave it.
    with IPRoute(netns=ns_name, flags=0) as ipr:
        ipr.link("add", ifname="czt3", kind="tuntap", mode="tap")
    db.reserve(bridged_record("live", "10.77.0.2/24", me, process_start(me), ns_name))
    db.reserve(bridged_record("dead", "10.77.0.3/24", me, process_start(me) - 100, ns_name))
    try:
        # A live VM keeps the namespace; the dead one's tap goes.
        assert svc.reconcile_net() == ["VM dead: its tap czt3 deleted"]
        assert "czt3" not in ns.links() and "czt2" in ns.links()
        # Its address stays reserved until `vm down` removes the record.
        assert svc._bridge_assign(db.list())["net_addr"] == "10.77.0.4/24"
        db.remove("live")
        assert svc.reconcile_net() == [f"network namespace {ns_name} removed: no live VM uses it"]
        assert not bridge.exists(ns_name) and not ns.ours()
        assert svc.reconcile_net() == []
        # `vm down` of the dead record has nothing left to remove, and says so plainly.
        assert svc.vm_down("dead") == "was dead; record removed"
        assert db.list() == []
    finally:
        os.close(live_fd)
