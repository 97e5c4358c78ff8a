"""``czonectl --backend libvirt`` end to end, against a private libvirtd
(the ``libvirtd`` fixture): a VM is a domain, QMP goes through libvirt, the
domain's state is libvirt's, and ``vm down`` leaves nothing defined."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import libvirt  # scripts/deps.sh installs it: the VM tests need it, not skip without it
import pytest

from czone.libvirt_backend import qemu_processes
from czone.libvirt_xml import CZONE_NS, build_xml
from czone.qemu.cmdline import build_argv
from czone.vmspec import load_spec
from tests.effective import comparable, from_argv, from_xml

pytestmark = pytest.mark.vm

CZONECTL = str(Path(sys.executable).parent / "czonectl")


def czonectl(env: dict[str, str], *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([CZONECTL, *args], env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.fixture
def lv_env(artifacts, libvirtd) -> Iterator[dict[str, str]]:
    run = tempfile.mkdtemp(prefix="czone-lv-")
    env = {**os.environ, "CZONE_RUN": run, "CZONE_ACCEL": artifacts.accel}
    yield env
    # the libvirtd fixture destroys whatever domain is left; the records go here
    subprocess.run(["rm", "-rf", run], check=False)


def test_up_ssh_qmp_list_down(lv_env: dict[str, str], libvirtd) -> None:
    uri = libvirtd.uri
    up = czonectl(lv_env, "vm", "up", "--name", "lv1", "--backend", "libvirt", "--connect", uri,
                  "--memory-mode", "czone", "--device-memory", "512", "--requested", "256",
                  "--boot-timeout", "120")
    assert up.returncode == 0, up.stderr
    assert f"libvirt: domain czone-lv1 at {uri}" in up.stdout

    [rec] = json.loads(czonectl(lv_env, "vm", "list", "--json").stdout)
    assert (rec["status"], rec["backend"], rec["uri"]) == ("running", "libvirt", uri)
    assert rec["qmp_socket"] == ""  # libvirt's monitor, not ours
    run_dir = Path(rec["run_dir"])
    dom = libvirtd.connect().lookupByName("czone-lv1")
    assert dom.isActive()
    meta = ET.fromstring(dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, CZONE_NS))
    assert meta.get("name") == "lv1" and meta.get("memory-mode") == "czone"
    # The QEMU libvirt runs is the machine our argv describes, and it has no
    # monitor socket of ours.
    [qemu] = qemu_processes(dom.UUIDString())
    assert qemu.pid == rec["pid"]
    spec = load_spec(run_dir)
    assert spec is not None
    live = from_argv(qemu.cmdline())
    # libvirtd opens the serial log itself and hands QEMU the descriptor
    assert live["serial"].startswith("/dev/fdset/")
    live["serial"] = str(spec.run_dir / "serial.log")
    assert comparable(live) == comparable(from_argv(build_argv(spec))) \
        == comparable(from_xml(build_xml(spec)))
    assert not list(run_dir.glob("*.sock"))

    # Reconciliation asks libvirt: a domain of ours without a record is
    # reported and left alone.
    conn = libvirtd.connect()
    stray = conn.defineXML(build_xml(replace(spec, name="stray")))
    ps = czonectl(lv_env, "ps")
    assert ps.returncode == 0, ps.stderr
    assert (f"reconcile: domain czone-stray at {uri} carries CZone metadata but no record "
            "here has it (shut off); left alone") in ps.stderr
    stray.undefine()

    uname = czonectl(lv_env, "vm", "ssh", "lv1", "--", "uname", "-r")
    assert uname.returncode == 0 and "-czone" in uname.stdout, uname.stderr

    # QMP through libvirt: the device's state, and an event (the guest's
    # reclaim report) through libvirt's event loop.
    mem = czonectl(lv_env, "vm", "mem", "lv1")
    assert mem.returncode == 0 and "czdev0" in mem.stdout + mem.stderr, mem.stderr
    rc = czonectl(lv_env, "vm", "reclaim", "lv1", timeout=120)
    assert rc.returncode == 0 and "CZone(s) reclaimed" in rc.stdout, rc.stderr

    # An admin destroys the domain behind our back: libvirt's word is taken.
    dom.destroy()
    [rec] = json.loads(czonectl(lv_env, "vm", "list", "--json").stdout)
    assert rec["status"] == "dead"
    down = czonectl(lv_env, "vm", "down", "lv1")
    assert down.returncode == 0 and "domain undefined" in down.stdout, down.stderr
    assert libvirtd.connect().listAllDomains() == []
    assert json.loads(czonectl(lv_env, "vm", "list", "--json").stdout) == []
    assert not qemu_processes(dom.UUIDString())


def test_vm_down_destroys_and_undefines(lv_env: dict[str, str], libvirtd) -> None:
    up = czonectl(lv_env, "vm", "up", "--name", "lv3", "--backend", "libvirt",
                  "--connect", libvirtd.uri, "--boot-timeout", "120")
    assert up.returncode == 0, up.stderr
    [rec] = json.loads(czonectl(lv_env, "vm", "list", "--json").stdout)
    uuid = libvirtd.connect().lookupByName("czone-lv3").UUIDString()
    assert [p.pid for p in qemu_processes(uuid)] == [rec["pid"]]
    down = czonectl(lv_env, "vm", "down", "lv3")
    assert down.returncode == 0 and "stopped" in down.stdout, down.stderr
    assert libvirtd.connect().listAllDomains() == []
    assert qemu_processes(uuid) == []


def test_a_domain_not_ours_is_never_overwritten(lv_env: dict[str, str], libvirtd,
                                                artifacts) -> None:
    foreign = ("<domain type='qemu'><name>czone-lv2</name><memory unit='MiB'>64</memory>"
               "<os><type arch='x86_64' machine='q35'>hvm</type></os>"
               f"<devices><emulator>{artifacts.qemu}</emulator></devices></domain>")
    conn = libvirtd.connect()
    conn.defineXML(foreign)
    before = conn.lookupByName("czone-lv2").XMLDesc()
    r = czonectl(lv_env, "vm", "up", "--name", "lv2", "--backend", "libvirt",
                 "--connect", libvirtd.uri)
    assert r.returncode == 1
    assert r.stderr.splitlines()[-1] == (
        f"czonectl: error: a domain named czone-lv2 already exists at {libvirtd.uri} "
        "(not ours: no CZone metadata); refusing to touch it")
    assert conn.lookupByName("czone-lv2").XMLDesc() == before
    assert json.loads(czonectl(lv_env, "vm", "list", "--json").stdout) == []


def test_an_unreachable_uri_is_one_line(lv_env: dict[str, str], tmp_path: Path) -> None:
    uri = f"qemu:///system?socket={tmp_path}/no-such-sock"
    r = czonectl(lv_env, "vm", "up", "--name", "lv4", "--backend", "libvirt", "--connect", uri)
    assert r.returncode == 1
    errors = [line for line in r.stderr.splitlines() if "error" in line]
    assert errors == [f"czonectl: error: cannot connect to libvirt at {uri}: Failed to connect "
                      f"socket to '{tmp_path}/no-such-sock': No such file or directory"]
    assert json.loads(czonectl(lv_env, "vm", "list", "--json").stdout) == []


def test_mcpv_containers_in_a_domain(lv_env: dict[str, str], libvirtd) -> None:
    """run/invoke/ps/stats/kill through the service layer on a libvirt VM; the
    domain lists its CZone records; a domain destroyed behind our back loses
    its containers."""
    def ok(*args: str) -> str:
        r = czonectl(lv_env, *args)
        assert r.returncode == 0, r.stderr
        return r.stdout

    ctr = json.loads(ok("run", "float_operation", "--backend", "libvirt", "--connect",
                        libvirtd.uri, "--json"))
    second = json.loads(ok("run", "float_operation", "--json"))  # placed in the same VM
    assert second["vm"] == ctr["vm"] and not second["booted"]
    [rec] = json.loads(ok("vm", "list", "--json"))
    assert (rec["backend"], rec["uri"], rec["fn"]) == ("libvirt", libvirtd.uri,
                                                       "float_operation")
    assert json.loads(ok("invoke", ctr["id"]))["n"] > 0
    stats = json.loads(ok("stats", "--json"))
    assert stats[ctr["vm"]]["plugged_bytes"] > 0

    dom = libvirtd.connect().lookupByName(f"czone-{ctr['vm']}")
    meta = ET.fromstring(dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, CZONE_NS))
    listed = {c["id"]: c for c in json.loads(meta.findtext("containers") or "[]")}
    assert set(listed) == {ctr["id"], second["id"]}
    assert listed[ctr["id"]]["czone"] == ctr["czone"]

    ok("kill", second["id"])
    meta = ET.fromstring(dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, CZONE_NS))
    assert [c["id"] for c in json.loads(meta.findtext("containers") or "[]")] == [ctr["id"]]

    dom.destroy()
    [c] = json.loads(ok("ps", "--json"))
    assert (c["id"], c["state"]) == (ctr["id"], "lost")
    ok("kill", ctr["id"])
    ok("vm", "down", ctr["vm"])
    assert libvirtd.connect().listAllDomains() == []


def test_czonectl_killed_while_the_domain_boots(lv_env: dict[str, str], libvirtd) -> None:
    """The next command asks libvirt: the half-booted domain is destroyed and
    undefined, its container lost, and nothing is left defined."""
    proc = subprocess.Popen([CZONECTL, "run", "float_operation", "--backend", "libvirt",
                             "--connect", libvirtd.uri], env=lv_env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    conn = libvirtd.connect()
    deadline = time.monotonic() + 120
    while not any(d.isActive() for d in conn.listAllDomains()):
        assert proc.poll() is None and time.monotonic() < deadline, "no domain started"
        time.sleep(0.1)
    [dom] = conn.listAllDomains()
    uuid = dom.UUIDString()
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    ps = czonectl(lv_env, "ps", "--json")
    assert ps.returncode == 0, ps.stderr
    assert "its domain destroyed and undefined" in ps.stderr
    [ctr] = json.loads(ps.stdout)
    assert ctr["state"] == "lost"
    assert conn.listAllDomains() == [] and qemu_processes(uuid) == []
    assert czonectl(lv_env, "kill", ctr["id"]).returncode == 0
    [rec] = json.loads(czonectl(lv_env, "vm", "list", "--json").stdout)
    assert rec["status"] == "dead"
    down = czonectl(lv_env, "vm", "down", rec["name"])
    assert down.returncode == 0 and "was dead" in down.stdout, down.stderr


def test_libvirtd_restarted_under_a_running_vm(lv_env: dict[str, str], libvirtd,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A czonectl that holds a connection across a libvirtd restart reconnects;
    the VM and its container run on."""
    from czone.service import Service

    r = czonectl(lv_env, "run", "float_operation", "--backend", "libvirt", "--connect",
                 libvirtd.uri, "--json")
    assert r.returncode == 0, r.stderr
    ctr = json.loads(r.stdout)
    monkeypatch.setenv("CZONE_RUN", lv_env["CZONE_RUN"])
    with Service() as svc:
        before = svc.stats()[ctr["vm"]]
        libvirtd.restart()
        after = svc.stats()[ctr["vm"]]  # QMP through a new connection
        assert after["pid"] == before["pid"]
        assert after["plugged_bytes"] == before["plugged_bytes"] > 0
        reply, _ = svc.invoke(ctr["id"])
        assert reply["ok"], reply
    assert czonectl(lv_env, "vm", "down", ctr["vm"]).returncode == 0
    assert libvirtd.connect().listAllDomains() == []


def test_libvirtd_restarted_while_a_vm_boots(lv_env: dict[str, str], libvirtd) -> None:
    """libvirtd restarts in the middle of ``run`` (the domain has started,
    czonectl waits for the guest): czonectl reconnects, and the run ends
    with the container in the domain's records."""
    proc = subprocess.Popen([CZONECTL, "run", "float_operation", "--backend", "libvirt",
                             "--connect", libvirtd.uri, "--json"], env=lv_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        conn = libvirtd.connect()
        deadline = time.monotonic() + 120
        while not any(d.isActive() for d in conn.listAllDomains()):
            assert proc.poll() is None and time.monotonic() < deadline, "no domain started"
            time.sleep(0.1)
        conn.close()
        libvirtd.restart()
        out, err = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    ctr = json.loads(out)
    [c] = json.loads(czonectl(lv_env, "ps", "--json").stdout)
    assert (c["id"], c["state"]) == (ctr["id"], "running")
    dom = libvirtd.connect().lookupByName(f"czone-{ctr['vm']}")
    meta = ET.fromstring(dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, CZONE_NS))
    assert [r["id"] for r in json.loads(meta.findtext("containers") or "[]")] == [ctr["id"]]
    assert json.loads(czonectl(lv_env, "invoke", ctr["id"]).stdout)["n"] > 0
    assert czonectl(lv_env, "vm", "down", ctr["vm"]).returncode == 0


def _libvirt_size_kib(dom, mode: str) -> int:
    """What libvirt believes the memory device is asked for: virtio-mem's
    <requested>, or the balloon's target (<currentMemory>)."""
    root = ET.fromstring(dom.XMLDesc(0))
    path = ("devices/memory[@model='virtio-mem']/target/requested" if mode == "mcpv-virtio-mem"
            else "currentMemory")
    return int(root.findtext(path) or -1)


@pytest.mark.parametrize("mode", ["mcpv-virtio-mem", "mcpv-balloon"])
def test_mcpv_baselines_resize_through_libvirt(lv_env: dict[str, str], libvirtd,
                                               mode: str) -> None:
    """libvirt owns these devices, so they are resized through libvirt's API and
    libvirt's view of the domain follows."""
    r = czonectl(lv_env, "run", "float_operation", "--mode", mode, "--backend", "libvirt",
                 "--connect", libvirtd.uri, "--json")
    assert r.returncode == 0, r.stderr
    ctr = json.loads(r.stdout)
    dom = libvirtd.connect().lookupByName(f"czone-{ctr['vm']}")
    boot = 512 << 10 if mode == "mcpv-balloon" else 0
    assert _libvirt_size_kib(dom, mode) == boot + (128 << 10)
    k = czonectl(lv_env, "kill", ctr["id"])
    assert k.returncode == 0 and "killed" in k.stdout, k.stderr
    assert _libvirt_size_kib(dom, mode) == boot
    assert czonectl(lv_env, "vm", "down", ctr["vm"]).returncode == 0
