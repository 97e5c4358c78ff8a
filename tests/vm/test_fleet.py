"""A fleet of two libvirt endpoints on this machine (two private libvirtds,
one reached through a remote URI, ``qemu+tcp://127.0.0.1``): ``czonectl
host add/list/rm``, placement across them, and which host holds what."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from czone.net import free_port
from tests.vm.conftest import REPO, node_failed
from tests.vm.sshd import PrivateSshd
from tests.vm.test_libvirt import czonectl

pytestmark = pytest.mark.vm

NOWHERE = "qemu+tcp://127.0.0.1:1/system"


@pytest.fixture
def sshd(request: pytest.FixtureRequest) -> Iterator[PrivateSshd]:
    """A private sshd on 127.0.0.1 (tests/vm/sshd.py): a remote host's door."""
    if not Path("/usr/sbin/sshd").exists():
        pytest.fail("sshd is not installed: run scripts/deps.sh", pytrace=False)
    daemon = PrivateSshd(Path(tempfile.mkdtemp(prefix="czone-sshd-")), free_port())
    daemon.start()
    try:
        yield daemon
    finally:
        if node_failed(request):
            daemon.save_logs(REPO / "test-artifacts" / request.node.name / "sshd")
        daemon.stop()
        # libvirt's ssh (no_verify=1) recorded the throwaway host key
        subprocess.run(["ssh-keygen", "-q", "-R", f"[127.0.0.1]:{daemon.port}"],
                       capture_output=True, check=False)


class Ctl:
    """czonectl with a state store of the test's own."""

    def __init__(self, env: dict[str, str]):
        self.env = env

    def __call__(self, *args: str) -> subprocess.CompletedProcess:
        return czonectl(self.env, *args)

    def ok(self, *args: str) -> str:
        r = czonectl(self.env, *args)
        assert r.returncode == 0, r.stderr
        return r.stdout


@pytest.fixture
def ctl(artifacts) -> Iterator[Ctl]:
    run = tempfile.mkdtemp(prefix="czone-fleet-")
    yield Ctl({**os.environ, "CZONE_RUN": run, "CZONE_ACCEL": artifacts.accel})
    subprocess.run(["rm", "-rf", run], check=False)


@pytest.fixture
def two_hosts(libvirtd_factory) -> dict[str, str]:
    """Host name -> URI: ``a`` through its Unix socket, ``b`` through TCP."""
    a = libvirtd_factory("a")
    b = libvirtd_factory("b", tcp=True)
    return {"a": a.uri, "b": b.tcp_uri}


def test_two_hosts_place_list_and_refuse(ctl: Ctl, two_hosts: dict[str, str]) -> None:
    uris, ok = two_hosts, ctl.ok

    for name, uri in uris.items():
        assert ok("host", "add", name, uri).startswith(f"host {name}: {uri} (")
    r = ctl("host", "add", "c", NOWHERE)
    assert r.returncode == 1
    [line] = r.stderr.strip().splitlines()
    assert line.startswith(f"czonectl: error: cannot connect to libvirt at {NOWHERE}: ")
    r = ctl("host", "add", "a2", uris["a"])
    assert r.returncode == 1 and "host 'a' already has URI" in r.stderr
    hosts = {h["name"]: h for h in json.loads(ok("host", "list", "--json"))}
    assert set(hosts) == {"a", "b"} and all(h["reachable"] for h in hosts.values())

    # Two functions: the second VM boots on the other host (the first host's
    # VM has touched little of its promise; or, within the noise of free
    # memory, the host with fewer VMs wins).
    first = json.loads(ok("run", "float_operation", "--backend", "libvirt", "--json"))
    second = json.loads(ok("run", "json_dumps_loads", "--backend", "libvirt", "--json"))
    assert first["booted"] and second["booted"]
    # A function's next container goes into its VM, wherever it runs.
    third = json.loads(ok("run", "float_operation", "--backend", "libvirt", "--json"))
    assert third["vm"] == first["vm"] and not third["booted"]

    vms = {v["name"]: v for v in json.loads(ok("vm", "list", "--json"))}
    on = {vm: next(n for n, u in uris.items() if u == vms[vm]["uri"]) for vm in vms}
    assert sorted(on.values()) == ["a", "b"], on
    ps = {c["id"]: c for c in json.loads(ok("ps", "--json"))}
    assert {c: ps[r["id"]]["host"] for c, r in (("1", first), ("2", second), ("3", third))} \
        == {"1": on[first["vm"]], "2": on[second["vm"]], "3": on[first["vm"]]}
    assert f"  {on[second['vm']]}  " in ok("ps")
    stats = json.loads(ok("stats", "--json"))
    assert {vm: s["host"] for vm, s in stats.items()} == on
    for ctr in (first, second, third):
        r = ctl("invoke", ctr["id"])
        assert r.returncode == 0 and "latency" in r.stderr, r.stderr

    # A host that holds VMs cannot go; the error lists them.
    host_a_vms = sorted(vm for vm, h in on.items() if h == "a")
    r = ctl("host", "rm", "a")
    assert r.returncode == 1
    assert r.stderr.strip() == (f"czonectl: error: host 'a' holds VM(s) {', '.join(host_a_vms)}"
                                "; migrate them away or `czonectl vm down` them first")
    listed = {h["name"]: h["vms"] for h in json.loads(ok("host", "list", "--json"))}
    assert listed["a"] == host_a_vms

    # --host pins a new VM; the pinned host's VM is used by its function.
    pinned = json.loads(ok("run", "pyaes", "--backend", "libvirt", "--host", "b", "--json"))
    assert json.loads(ok("vm", "list", "--json"))[-1]["uri"] == uris["b"]

    for ctr in (first, second, third, pinned):
        ok("kill", ctr["id"])
    for vm in json.loads(ok("vm", "list", "--json")):
        ok("vm", "down", vm["name"])
    assert ok("host", "rm", "a").strip() == f"host a ({uris['a']}) removed"
    ok("host", "rm", "b")
    assert "no host registered" in ok("host", "list")


def test_a_remote_host_through_ssh(ctl: Ctl, libvirtd, sshd) -> None:
    """A host reached by ``qemu+ssh`` is another machine to czonectl: its
    domain keeps nothing in our run dir, the console streams through
    libvirt, the guest's SSH goes through the host's sshd, and memory is
    libvirt's figure."""
    uri, ok, run = sshd.uri(libvirtd.socket), ctl.ok, ctl.env["CZONE_RUN"]
    ok("host", "add", "far", uri)
    ctr = json.loads(ok("run", "float_operation", "--backend", "libvirt", "--host", "far",
                        "--json"))
    [vm] = json.loads(ok("vm", "list", "--json"))
    assert (vm["name"], vm["uri"], vm["pid"], vm["status"]) == (ctr["vm"], uri, 0, "running")
    # the console came through libvirt into our serial log
    console = (Path(vm["run_dir"]) / "serial.log").read_text(errors="replace")
    assert "czone-agentd: listening" in console
    dom = libvirtd.connect().lookupByName(f"czone-{ctr['vm']}")
    assert run not in dom.XMLDesc(0)
    assert dom.XMLDesc(0).count("<serial type='pty'>") == 1

    assert json.loads(ok("invoke", ctr["id"]))["n"] > 0  # the agent, through the tunnel
    assert ok("vm", "ssh", ctr["vm"], "--", "echo", "hello").strip() == "hello"
    # ... which the host's sshd carried
    assert ("server_request_direct_tcpip: originator 127.0.0.1 port 0, target 127.0.0.1 "
            f"port {vm['ssh_port']}") in sshd.log()
    [c] = json.loads(ok("ps", "--json"))
    assert c["host"] == "far"
    s = json.loads(ok("stats", "--json"))[ctr["vm"]]
    assert s["host"] == "far" and s["pss_bytes"] is None
    assert s["rss_bytes"] == pytest.approx(dom.memoryStats()["rss"] << 10, rel=0.2)
    assert "back to the host" in ok("kill", ctr["id"])
    ok("vm", "down", ctr["vm"])
    with pytest.raises(libvirt.libvirtError):
        libvirtd.connect().lookupByName(f"czone-{ctr['vm']}")
    ok("host", "rm", "far")


def test_vm_migrate_to_a_host_by_name(ctl: Ctl, libvirtd_factory, sshd) -> None:
    """``vm migrate NAME --to HOST`` through libvirt, from a local host to one
    reached by ``qemu+ssh`` (another machine to czonectl): the container
    answers there, through the host's sshd, and ps says where it is."""
    a = libvirtd_factory("a")
    b = libvirtd_factory("b")
    far, ok, run = sshd.uri(b.socket), ctl.ok, ctl.env["CZONE_RUN"]
    ok("host", "add", "a", a.uri)
    ok("host", "add", "far", far)
    ctr = json.loads(ok("run", "float_operation", "--backend", "libvirt", "--host", "a",
                        "--json"))
    xml = ok("vm", "migrate", ctr["vm"], "--to", "far", "--dry-run")
    assert "<serial type=\"pty\">" in xml or "<serial type='pty'>" in xml
    assert run not in xml  # nothing of our run dir on another machine
    r = ctl("vm", "migrate", ctr["vm"], "--to", "nowhere")
    assert r.returncode == 1 and "no host named 'nowhere'" in r.stderr

    out = ok("vm", "migrate", ctr["vm"], "--to", "far")
    assert f"VM {ctr['vm']} migrated: QEMU pid " in out and "-> far 0 in" in out
    [vm] = json.loads(ok("vm", "list", "--json"))
    assert (vm["uri"], vm["pid"], vm["status"]) == (far, 0, "running")
    assert not a.connect().listAllDomains()
    assert b.connect().lookupByName(f"czone-{ctr['vm']}").isActive()
    [c] = json.loads(ok("ps", "--json"))
    assert (c["id"], c["host"], c["state"]) == (ctr["id"], "far", "running")
    assert json.loads(ok("invoke", ctr["id"]))["n"] > 0
    assert ("server_request_direct_tcpip: originator 127.0.0.1 port 0, target 127.0.0.1 "
            f"port {vm['ssh_port']}") in sshd.log()
    ok("kill", ctr["id"])
    ok("vm", "down", ctr["vm"])
    assert not b.connect().listAllDomains()
