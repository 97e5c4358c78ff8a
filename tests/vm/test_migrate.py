"""Live migration of an MCPV VM between two QEMU processes on this host
(issue 11 §3, plain QEMU backend), through the service layer.

Three containers of one function share one VM.  Each writes data into its
own root (the tmpfs upper layer: its CZone's memory) and records the
checksums; one deletes every other file and has its CZone reclaimed, so its
plugged chunks are full of holes.  After the migration every container
answers its function, its data verifies, CZone IDs and stats are those of
before, and what QEMU sent is the memory in use, not the device's maximum.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from czone import hostmem
from czone.guest.ssh import GuestTimeout, SSHClient, SshError
from czone.qemu import qmp
from czone.qemu.machine import own_qemu_processes
from czone.service import DEVICE, MCPV_DEVICE_MIB, VM_BOOT_MIB, RunResult, Service, ServiceError
from czone.state import StateDB
from tests.vm.conftest import PS, REPO, node_failed, save_state_evidence
from tests.vm.test_vm_cli import CZONECTL, czonectl

pytestmark = pytest.mark.vm

FN = "float_operation"
EXPECTED = json.loads((REPO / "guest-image/functions/expected.json").read_text())[FN]
MiB = hostmem.MiB
PAGE = 4096
# The function server's command (guest-image/.../bundle.py), run after the data is written.
SERVER = ["/usr/bin/python3", "/opt/fn/fnserver.py", FN, "/run/fn/fn.sock"]


def with_data(files: int, drop_every_other: bool) -> list[str]:
    """A container command: ``files`` MiB of random data in /data (every other
    file deleted again if asked), their checksums in /sums.json, then the server."""
    script = f"""
import hashlib, json, os
os.makedirs("/data")
for i in range({files}):
    with open(f"/data/{{i}}", "wb") as f:
        f.write(os.urandom(1 << 20))
if {drop_every_other}:
    for i in range(1, {files}, 2):
        os.unlink(f"/data/{{i}}")
sums = {{n: hashlib.sha256(open("/data/" + n, "rb").read()).hexdigest()
        for n in os.listdir("/data")}}
with open("/sums.json", "w") as f:
    json.dump(sums, f)
os.execv({SERVER[0]!r}, {SERVER!r})
"""
    return ["/usr/bin/python3", "-c", script]


# Run in the VM as root: read a container's files through /proc/PID/root.
VERIFY = """
import hashlib, json, sys
root = "/proc/%d/root"
sums = json.load(open(root + "/sums.json"))
bad = [n for n, h in sums.items()
       if hashlib.sha256(open(root + "/data/" + n, "rb").read()).hexdigest() != h]
print(json.dumps({"files": len(sums), "bad": bad}))
"""


@pytest.fixture
def svc(request: pytest.FixtureRequest, artifacts,
        monkeypatch: pytest.MonkeyPatch) -> Iterator[Service]:
    monkeypatch.setenv("CZONE_ACCEL", artifacts.accel)
    # A short root: the QMP socket paths must fit AF_UNIX's 108 bytes.
    root = Path(tempfile.mkdtemp(prefix="czm-"))
    service = Service(db=StateDB(root))
    try:
        yield service
    finally:
        service.close()
        if node_failed(request):
            save_state_evidence(service.db, REPO / "test-artifacts" / request.node.name)
        for vm in service.db.list():
            try:
                service.vm_down(vm.name, timeout=5)
            except Exception as e:  # noqa: BLE001 (cleanup goes on; the strays go below)
                print(f"cleanup of {vm.name}: {e}")
        for p in own_qemu_processes(root):
            p.kill()
        psutil.wait_procs(own_qemu_processes(root), timeout=10)
        shutil.rmtree(root, ignore_errors=True)


def verify_data(svc: Service, vm: str, ctr: str) -> int:
    """Checks the container's files from inside the VM; returns how many there are."""
    listed = {c["id"]: c for c in svc.ask(vm, lambda a: a.list())}
    pid = min(listed[ctr]["pids"])
    rec = svc.db.get(vm)
    assert rec.ssh_port is not None and rec.ssh_key is not None
    with SSHClient("127.0.0.1", rec.ssh_port, Path(rec.ssh_key)) as ssh:
        out = ssh.check(f"python3 -c {shlex.quote(VERIFY % pid)}").stdout
    res = json.loads(out)
    assert res["bad"] == [], f"{ctr}: files changed: {res['bad']}"
    return res["files"]


def device_state(svc: Service, vm: str) -> dict:
    machine = svc.machine(svc.db.get(vm))
    try:
        return {"stats": qmp.czone_stats(machine, DEVICE),
                "generation": machine.qmp("qom-get", path=qmp.peripheral(DEVICE),
                                          property="stats-generation"),
                "size": qmp.device_size(machine, DEVICE),
                "requested": qmp.requested_size(machine, DEVICE)}
    finally:
        machine.close()


def guest_stats(svc: Service, vm: str) -> dict[str, dict]:
    """Per container: its CZone and the CZone's counters, as the guest keeps them."""
    return {c: {"czone": s["czone"], **s["czone_stat"]}
            for c, s in svc.ask(vm, lambda a: a.stats()).items()}


def three_containers_one_with_holes(svc: Service) -> tuple[list[RunResult], str,
                                                               dict[str, int]]:
    """Three containers of FN in one MCPV VM, with 16, 24 and 24 files of
    data; the second deleted every other file of 48, and a reclaim punched
    the freed pages out of its chunks.  The runs, the VM and the files."""
    runs = [svc.run(FN, args=with_data(16, False)),
            svc.run(FN, args=with_data(48, True)),
            svc.run(FN, args=with_data(24, False))]
    vm = runs[0].vm
    assert {r.vm for r in runs} == {vm}, "MCPV put the function's containers in one VM"
    assert all(r.warmup.get("ok") for r in runs), [r.warmup for r in runs]
    files = {r.id: verify_data(svc, vm, r.id) for r in runs}
    assert files == {runs[0].id: 16, runs[1].id: 24, runs[2].id: 24}
    # The deleted files' pages (and the writer's freed heap) go back to the host:
    # DISCARDs punch holes into the chunks the CZone keeps plugged.
    reclaimed = svc.vm_reclaim(vm, czone=runs[1].czone)
    assert reclaimed["bytes"] >= 16 * MiB, reclaimed
    return runs, vm, files


def assert_sent_is_memory_in_use(ram: dict, qemu_rss: int, backed: int) -> None:
    """What a migration sent (query-migrate's ``ram``) is the memory in use.
    Every guest page is sent at least once, a zero page as a header of a few
    bytes; pages the guest dirties meanwhile go again.  So the bytes stay
    within the source's whole RSS (which also holds TCG's code cache and
    QEMU's own heap) plus 64 MiB of pages sent twice, and hold at least the
    64 MiB of random data.  Pages looked at (sent, zero or not): the boot
    memory, what the device backs (``backed``), and at most 128 MiB of
    resends: not its unplugged blocks nor the holes of the plugged ones."""
    assert 64 * MiB <= ram["normal-bytes"] <= ram["transferred"] <= qemu_rss + 64 * MiB, \
        (ram, qemu_rss)
    pages = ram["normal"] + ram["duplicate"]
    assert pages * PAGE <= VM_BOOT_MIB * MiB + backed + 128 * MiB, (ram, backed)
    assert pages * PAGE < (VM_BOOT_MIB + MCPV_DEVICE_MIB) * MiB // 2


def test_three_live_containers_migrate_with_their_data(svc: Service) -> None:
    runs, vm, files = three_containers_one_with_holes(svc)
    before = svc.db.get(vm)
    dev_before = device_state(svc, vm)
    stats_before = guest_stats(svc, vm)
    ps_before = {c["id"]: (c["czone"], c["state"]) for c in svc.ps()}
    # The host's view: all of the source QEMU, and the memfd behind the device.
    qemu_rss = hostmem.stable_rss(before.pid)
    plugged = dev_before["size"]
    backed = hostmem.stable_mapping_rss(before.pid, "memfd:memory-backend-memfd")
    assert plugged - backed >= 16 * MiB, ("the test needs holes in plugged chunks",
                                          plugged, backed)

    res = svc.vm_migrate(vm)
    print(f"migrated: {res.total_s:.1f}s, downtime {res.downtime_ms} ms, ram {res.ram}, "
          f"device RSS {res.src_device_rss} -> {res.dst_device_rss}, source after "
          f"{res.src_device_rss_after}; source QEMU RSS {qemu_rss}, plugged {plugged}")

    # The record follows the destination; the source is gone.
    after = svc.db.get(vm)
    assert (after.pid, after.run_dir, after.ssh_port) == (res.dst_pid, res.run_dir,
                                                         res.ssh_port)
    assert after.pid != before.pid and after.ssh_port != before.ssh_port
    assert not psutil.pid_exists(before.pid) or \
        psutil.Process(before.pid).status() == psutil.STATUS_ZOMBIE
    assert not Path(before.run_dir).exists()

    # The device's state arrived as it was (nothing has run in the guest since).
    # The driver sends a snapshot every second while CZones exist: the
    # generation goes on counting from where the source left it.
    dev_after = device_state(svc, vm)
    assert dev_after["generation"] >= dev_before.pop("generation")
    dev_after.pop("generation")
    assert dev_after == dev_before
    assert guest_stats(svc, vm) == stats_before
    assert {c["id"]: (c["czone"], c["state"]) for c in svc.ps()} == ps_before
    for r in runs:
        reply, _ = svc.invoke(r.id)
        assert reply["ok"] and reply["result"] == EXPECTED["result"], (r.id, reply)
        assert verify_data(svc, vm, r.id) == files[r.id]
    assert set(svc.stats()[vm]["containers"]) == {r.id for r in runs}

    assert_sent_is_memory_in_use(res.ram, qemu_rss, backed)
    # The holes were not read on either side: reading a memfd hole backs it.
    assert res.src_device_rss_after is not None and res.dst_device_rss is not None
    assert res.src_device_rss_after <= backed + 8 * MiB, (res.src_device_rss_after, backed)
    assert res.dst_device_rss <= backed + 8 * MiB, (res.dst_device_rss, backed)


def test_a_migration_that_fails_midway_leaves_the_source_running(svc: Service) -> None:
    first = svc.run(FN, args=with_data(32, False))
    vm = first.vm
    before = svc.db.get(vm)
    root = svc.db.root
    failure: list[BaseException] = []

    def migrate() -> None:
        try:
            # Slow enough to be caught in the middle: ~600 MiB at 16 MiB/s.
            svc_mig.vm_migrate(vm, timeout=300, max_bandwidth=16 * MiB)
        except BaseException as e:  # noqa: BLE001 (handed to the test thread)
            failure.append(e)

    svc_mig = Service(db=StateDB(root))
    t = threading.Thread(target=migrate)
    t.start()
    try:
        # The destination: the QEMU started with -incoming, once it holds 32 MiB.
        deadline = time.monotonic() + 120
        dst, base_rss = None, 0
        while dst is None or dst.memory_info().rss < 32 * MiB + base_rss:
            assert time.monotonic() < deadline, "no destination receiving pages"
            assert t.is_alive(), f"the migration ended before the fault: {failure}"
            if dst is None:
                found = [p for p in own_qemu_processes(root) if "-incoming" in p.cmdline()]
                if found:
                    dst = found[0]
                    base_rss = dst.memory_info().rss
            time.sleep(0.02)
        dst.kill()
    finally:
        t.join(120)
        svc_mig.close()
    assert not t.is_alive(), "vm_migrate did not return after the destination died"
    assert failure and isinstance(failure[0], ServiceError), failure
    assert "did not migrate and runs on" in str(failure[0]), failure[0]
    print(f"the failed migration: {failure[0]}")

    # The source runs the guest, the record still points at it, nothing leaked.
    rec = svc.db.get(vm)
    assert (rec.pid, rec.run_dir, rec.ssh_port) == (before.pid, before.run_dir,
                                                    before.ssh_port)
    assert [p.pid for p in own_qemu_processes(root)] == [before.pid]
    assert [d.name for d in (root / "vms").iterdir()] == [vm]
    machine = svc.machine(rec)
    try:
        assert machine.qmp("query-status")["status"] == "running"
    finally:
        machine.close()
    reply, _ = svc.invoke(first.id)
    assert reply["ok"] and reply["result"] == EXPECTED["result"], reply
    assert verify_data(svc, vm, first.id) == 32

    # And it can still migrate, with czonectl as users run it.
    env = {**os.environ, "CZONE_RUN": str(root)}
    dry = czonectl(env, "vm", "migrate", vm, "--dry-run")
    assert dry.returncode == 0 and dry.stdout.rstrip().endswith("-incoming defer"), dry
    out = czonectl(env, "vm", "migrate", vm, "--json", timeout=600)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert svc.db.get(vm).pid == res["dst_pid"] != before.pid
    inv = czonectl(env, "invoke", first.id)
    assert inv.returncode == 0 and json.loads(inv.stdout) == EXPECTED["result"], inv
    [row] = json.loads(czonectl(env, "ps", "--json").stdout)
    assert (row["id"], row["czone"], row["state"]) == (first.id, first.czone, "running")
    assert verify_data(svc, vm, first.id) == 32


def test_czonectl_killed_during_a_migration_is_settled_by_the_next_command(
        svc: Service) -> None:
    first = svc.run(FN, args=with_data(32, False))
    vm = first.vm
    before = svc.db.get(vm)
    root = svc.db.root
    env = {**os.environ, "CZONE_RUN": str(root)}
    proc = subprocess.Popen([CZONECTL, "vm", "migrate", vm, "--max-bandwidth", "16"],
                            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not any("-incoming" in p.cmdline() for p in own_qemu_processes(root)):
            assert time.monotonic() < deadline and proc.poll() is None, "no destination"
            time.sleep(0.02)
        time.sleep(2)  # pages are on their way
        assert proc.poll() is None, "the migration ended before the kill"
        proc.kill()
    finally:
        proc.wait(30)
    assert svc.db.migration_marker(vm).exists()
    assert len(own_qemu_processes(root)) == 2

    # The next command (ps) reconciles: the destination goes, the source runs on.
    out = czonectl(env, "ps", "--json")
    assert out.returncode == 0, out.stderr
    assert "a migration was cut short; the destination's 1 QEMU process(es) killed" \
        in out.stderr, out.stderr
    assert not svc.db.migration_marker(vm).exists()
    assert [p.pid for p in own_qemu_processes(root)] == [before.pid]
    assert [d.name for d in (root / "vms").iterdir()] == [vm]
    assert svc.db.get(vm).pid == before.pid
    reply, _ = svc.invoke(first.id)
    assert reply["ok"] and reply["result"] == EXPECTED["result"], reply
    assert verify_data(svc, vm, first.id) == 32


def destination_evidence(svc: Service, vm: str) -> str:
    """What CI needs to tell a wedged guest from a starved one: QEMU's run
    state and CPU time, the serial log's tail, and the guest's tasks and
    kernel log if SSH still answers (each part best effort)."""
    rec = svc.db.get(vm)
    parts = []
    try:
        proc = psutil.Process(rec.pid)
        times = proc.cpu_times()
        parts.append(f"QEMU {rec.pid}: {proc.status()}, cpu user {times.user:.1f}s "
                     f"system {times.system:.1f}s, threads "
                     + ", ".join(f"{t.id}:{t.user_time + t.system_time:.1f}s"
                                 for t in proc.threads()))
        machine = svc.machine(rec)
        try:
            parts.append(f"run state: {machine.qmp('query-status')['status']}")
        finally:
            machine.close()
    except Exception as e:  # noqa: BLE001 (evidence is best effort)
        parts.append(f"QEMU: {type(e).__name__}: {e}")
    serial = Path(rec.run_dir) / "serial.log"
    tail = serial.read_text(errors="replace").strip() if serial.exists() else ""
    if tail:
        parts.append("serial.log (tail):\n" + "\n".join(tail.splitlines()[-40:]))
    try:
        with SSHClient("127.0.0.1", rec.ssh_port, Path(rec.ssh_key)) as ssh:
            ssh.wait_ready(timeout=60)
            ssh.run("echo w > /proc/sysrq-trigger", timeout=30)
            parts.append("guest tasks:\n" + ssh.run(PS, timeout=30).stdout)
            parts.append("guest dmesg (tail):\n" + ssh.run("dmesg | tail -80", timeout=30).stdout)
    except Exception as e:  # noqa: BLE001 (evidence is best effort)
        parts.append(f"guest unreachable: {type(e).__name__}: {e}")
    return "\n".join(parts)


def churning(seconds: int) -> list[str]:
    """A container command: a child writes 1 MiB files, deletes half of them
    and older rounds, for ``seconds``, then records the checksums of what is
    left in /sums.json; the container serves ``FN`` meanwhile."""
    script = f"""
import hashlib, json, os, time
os.makedirs("/data")
if os.fork() == 0:
    end, i = time.time() + {seconds}, 0
    while time.time() < end:
        for k in range(4):
            with open(f"/data/{{i}}-{{k}}", "wb") as f:
                f.write(os.urandom(1 << 20))
        for k in (0, 2):
            os.unlink(f"/data/{{i}}-{{k}}")
        for k in (1, 3):
            if i >= 8:
                os.unlink(f"/data/{{i - 8}}-{{k}}")
        i += 1
        time.sleep(0.2)
    sums = {{n: hashlib.sha256(open("/data/" + n, "rb").read()).hexdigest()
            for n in os.listdir("/data")}}
    with open("/sums.tmp", "w") as f:
        json.dump(sums, f)
    os.rename("/sums.tmp", "/sums.json")
    os._exit(0)
os.execv({SERVER[0]!r}, {SERVER!r})
"""
    return ["/usr/bin/python3", "-c", script]


def test_the_guest_writes_frees_and_reclaims_during_the_migration(svc: Service) -> None:
    """Pages hinted free (holes, discards) that the guest writes again during
    the migration must arrive: dirty logging covers their reuse."""
    quiet = svc.run(FN, args=with_data(16, True))
    vm = quiet.vm
    svc.vm_reclaim(vm, czone=quiet.czone)
    churn = svc.run(FN, args=churning(40))
    failure: list[BaseException] = []
    result = []

    def migrate() -> None:
        try:
            result.append(Service(db=svc.db).vm_migrate(vm, max_bandwidth=48 * MiB))
        except BaseException as e:  # noqa: BLE001 (handed to the test thread)
            failure.append(e)

    t = threading.Thread(target=migrate)
    t.start()
    reclaims = 0
    other = Service(db=svc.db)
    try:
        # DISCARDs (and UNPLUGs of emptied chunks) while the migration runs,
        # through the agent: the migration holds the source's monitor.
        while t.is_alive():
            try:
                other.ask(vm, lambda a: a.reclaim(churn.id), retry=False)
                reclaims += 1
            except ServiceError:
                pass  # the source's forward closed: the hand-over
            time.sleep(0.3)
    finally:
        t.join(300)
        other.close()
    assert not failure, failure
    assert reclaims >= 2, f"only {reclaims} reclaims during the migration"
    print(f"{reclaims} reclaims during a migration of {result[0].total_s:.1f}s: "
          f"{result[0].ram}")
    # The churn goes on on the destination, then records what it kept.  The
    # guest waits for it: one SSH command, not a channel opened every second.
    rec = svc.db.get(vm)
    pid = min({c["id"]: c for c in svc.ask(vm, lambda a: a.list())}[churn.id]["pids"])
    wait = (f"i=0; until test -e /proc/{pid}/root/sums.json; do "
            f"i=$((i + 1)); [ $i -le 120 ] || exit 1; sleep 1; done")
    try:
        with SSHClient("127.0.0.1", rec.ssh_port, Path(rec.ssh_key)) as ssh:
            finished = ssh.run(wait, timeout=180).rc == 0
    except (SshError, GuestTimeout) as e:
        finished = False
        print(f"waiting for the churn: {e}")
    if not finished:
        # CI shows only the failure: the evidence goes into it
        pytest.fail(f"the churn never finished\n{destination_evidence(svc, vm)}")
    assert verify_data(svc, vm, churn.id) == 16
    assert verify_data(svc, vm, quiet.id) == 8
    for r in (quiet, churn):
        reply, _ = svc.invoke(r.id)
        assert reply["ok"] and reply["result"] == EXPECTED["result"], (r.id, reply)
