"""Bridged networking with real guests: ``--net bridge`` through the service
layer, in a network namespace of the test's own (never the host's
interfaces).  Root only: the namespace, bridge and taps need CAP_NET_ADMIN."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from pyroute2 import netns

from czone import bridge
from czone.guest.runtime import RuntimeAgent
from czone.guest.ssh import SSHClient
from czone.netplan import BRIDGE
from czone.qemu.machine import own_qemu_processes
from czone.service import Service
from czone.state import StateDB, status
from tests.vm.conftest import REPO, node_failed, save_state_evidence
from tests.vm.test_vm_cli import CZONECTL

pytestmark = [pytest.mark.vm,
              pytest.mark.skipif(os.geteuid() != 0 or not Path("/dev/net/tun").exists(),
                                 reason="bridged networking needs root and /dev/net/tun")]

FN = "float_operation"


@pytest.fixture
def netns_name() -> Iterator[str]:
    name = f"czone-t{os.getpid()}"
    yield name
    if bridge.exists(name):  # the test failed before its own checks
        netns.remove(name)


@pytest.fixture
def run_root(request: pytest.FixtureRequest) -> Iterator[Path]:
    """The test's own state store; every QEMU it recorded is killed afterwards,
    and its logs are kept in test-artifacts/ when the test failed."""
    root = Path(tempfile.mkdtemp(prefix="czone-br-"))
    yield root
    if node_failed(request):
        save_state_evidence(StateDB(root), REPO / "test-artifacts" / request.node.name)
    for p in own_qemu_processes(root):
        p.kill()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def svc(artifacts, run_root: Path, netns_name: str,
        monkeypatch: pytest.MonkeyPatch) -> Iterator[Service]:
    monkeypatch.setenv("CZONE_ACCEL", artifacts.accel)  # the session's verdict, no probe
    with Service(db=StateDB(run_root), netns=netns_name, progress=print) as s:
        yield s


def guest(svc: Service, vm: str, cmd: str) -> str:
    rec = svc.db.get(vm)
    with SSHClient("127.0.0.1", rec.ssh_port, Path(rec.ssh_key)) as ssh:  # type: ignore[arg-type]
        ssh.connect(timeout=30)
        return ssh.check(cmd, timeout=60).stdout


def over_bridge(svc: Service, vm: str) -> SSHClient:
    """SSH to ``vm``'s bridge address from inside the namespace."""
    rec = svc.db.get(vm)
    ip = rec.net_addr.partition("/")[0]  # type: ignore[union-attr]
    ssh = SSHClient(ip, 22, Path(rec.ssh_key),  # type: ignore[arg-type]
                    sock=lambda: bridge.connect(rec.netns, ip, 22, timeout=10))  # type: ignore[arg-type]
    ssh.connect(timeout=30)
    return ssh


def test_bridged_vms_get_static_addresses_serve_on_the_bridge_and_leave_nothing(
        svc: Service, netns_name: str) -> None:
    res = svc.run(FN, net="bridge")
    vm1 = svc.db.get(res.vm)
    assert (vm1.net, vm1.netns, vm1.net_addr, vm1.tap) == \
        ("bridge", netns_name, "10.77.0.2/24", "czt2")

    # The guest has the address on its second NIC, the one with our MAC;
    # eth0 stays on user-mode networking, which SSH (above) came through.
    assert "inet 10.77.0.2/24" in guest(svc, vm1.name, "busybox ip addr show dev eth1")
    assert guest(svc, vm1.name, "cat /sys/class/net/eth1/address").strip() == \
        "52:54:00:77:00:02"
    assert "inet 10.0.2.15/24" in guest(svc, vm1.name, "busybox ip addr show dev eth0")

    ns = bridge.Namespace(netns_name, svc.db.root)
    links = ns.links()
    assert links["czt2"]["master"] == links[BRIDGE]["index"] and links["czt2"]["state"] == "up"

    # The function server answers a client on the bridge: SSH from inside the
    # namespace to the guest's bridge address, then its agent and the container.
    with over_bridge(svc, vm1.name) as ssh:
        assert ssh.run("echo $SSH_CLIENT", timeout=30).stdout.split()[0] == "10.77.0.1"
        with RuntimeAgent(ssh) as agent:
            reply = agent.invoke(res.id)
    assert reply["ok"], reply

    # A second bridged VM gets the next address, and the guests reach each other.
    spec = svc.vm_spec("b2", net="bridge", memory_mode="none")
    vm2 = svc.vm_up(spec)
    assert (vm2.net_addr, vm2.tap) == ("10.77.0.3/24", "czt3")
    probe = "import socket; socket.create_connection(('10.77.0.3', 22), 5).close(); print('ok')"
    assert guest(svc, vm1.name, f'python3 -c "{probe}"').strip() == "ok"

    # Down: the tap goes with its VM; the namespace with the last one.
    assert "network namespace" not in svc.vm_down(vm1.name)
    links = ns.links()
    assert "czt2" not in links and links["czt3"]["master"] == links[BRIDGE]["index"]
    what = svc.vm_down("b2")
    assert what == f"stopped; network namespace {netns_name} removed (no bridged VM left)"
    assert not bridge.exists(netns_name) and not ns.ours()
    assert svc.db.list() == [] and svc.db.ctrs() == []


def test_a_killed_czonectl_leaves_no_tap_or_namespace(svc: Service, netns_name: str,
                                                      run_root: Path) -> None:
    env = {**os.environ, "CZONE_RUN": str(run_root), "CZONE_NETNS": netns_name}
    up = subprocess.Popen([CZONECTL, "vm", "up", "--name", "r1", "--net", "bridge"], env=env,
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT)
    ns = bridge.Namespace(netns_name, run_root)
    deadline = time.monotonic() + 60
    while not (bridge.exists(netns_name) and "czt2" in ns.links()
               and (qemu := own_qemu_processes(run_root))):
        assert up.poll() is None, up.communicate()[0]
        assert time.monotonic() < deadline, "no tap and QEMU within 60s"
        time.sleep(0.1)
    up.send_signal(signal.SIGKILL)  # mid-boot: record starting, QEMU and tap alive
    up.wait(10)
    assert status(svc.db.get("r1")) == "dead"

    ps = subprocess.run([CZONECTL, "ps", "--json"], env=env, capture_output=True, text=True,
                        timeout=120)
    assert ps.returncode == 0, ps.stderr
    assert json.loads(ps.stdout) == []
    assert "reconcile: VM r1: its boot was cut short; 1 QEMU process(es) killed" in ps.stderr
    assert f"reconcile: network namespace {netns_name} removed: no live VM uses it" in ps.stderr
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in qemu)
    assert not bridge.exists(netns_name)
    down = subprocess.run([CZONECTL, "vm", "down", "r1"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert down.returncode == 0 and down.stdout == "VM r1 was dead; record removed\n"


def test_a_libvirt_vm_on_the_bridge(artifacts, run_root: Path, netns_name: str, libvirtd,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """libvirtd opens a tap czonectl staged in the host's namespace; once the
    domain runs it moves into czonectl's namespace, onto the bridge; the
    function answers there, and nothing is left after ``vm down``."""
    from pyroute2 import IPRoute

    from czone.netplan import staging_tap_name

    monkeypatch.setenv("CZONE_ACCEL", artifacts.accel)
    with Service(db=StateDB(run_root), netns=netns_name, progress=print, backend="libvirt",
                 uri=libvirtd.uri) as svc:
        res = svc.run(FN, net="bridge")
        vm = svc.db.get(res.vm)
        assert (vm.backend, vm.net, vm.net_addr, vm.tap) == \
            ("libvirt", "bridge", "10.77.0.2/24", "czt2")
        ns = bridge.Namespace(netns_name, svc.db.root)
        links = ns.links()
        assert links["czt2"]["master"] == links[BRIDGE]["index"]
        assert links["czt2"]["state"] == "up"
        with IPRoute() as ipr:  # nothing left in the host's namespace
            assert not ipr.link_lookup(ifname=staging_tap_name(vm.run_dir))
        assert "inet 10.77.0.2/24" in guest(svc, vm.name, "busybox ip addr show dev eth1")
        assert guest(svc, vm.name, "cat /sys/class/net/eth1/address").strip() == \
            "52:54:00:77:00:02"
        with over_bridge(svc, vm.name) as ssh:
            assert ssh.run("echo $SSH_CLIENT", timeout=30).stdout.split()[0] == "10.77.0.1"
            with RuntimeAgent(ssh) as agent:
                reply = agent.invoke(res.id)
        assert reply["ok"], reply

        what = svc.vm_down(vm.name)
        assert what == f"stopped; network namespace {netns_name} removed (no bridged VM left)"
        assert not bridge.exists(netns_name)
        assert libvirtd.connect().listAllDomains() == []
