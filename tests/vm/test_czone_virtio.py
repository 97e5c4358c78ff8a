"""czone-virtio end to end: a guest with the virtio-czone driver, judged by the host.

Every memory figure is the QEMU process's RSS (and PSS), sampled until it
is stable (czone.hostmem.settle), never after a fixed sleep.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from czone import hostmem
from czone.guest.agent import AgentError, GuestAgent
from czone.qemu import qmp
from czone.qemu.cmdline import DEVICE_MEMFD, stats_log_path
from czone.qemu.machine import Machine

from .guest import assert_dmesg_clean, run_program

pytestmark = pytest.mark.vm
MiB = hostmem.MiB
DEV = "czdev0"
# No movablecore: every CZone chunk comes from the device.
CZONE_VIRTIO_VM = {"memory_mib": 768, "memory_mode": "czone",
                   "device_memory_mib": 1024, "requested_mib": 1024}


def rss(vm: Machine) -> int:
    return hostmem.stable_rss(vm.pid)


def pss(vm: Machine) -> int:
    return hostmem.stable_pss(vm.pid)


def state(vm: Machine) -> dict[str, str]:
    with vm.ssh() as ssh:
        out = ssh.check("cat /sys/kernel/debug/virtio_czone/*/state").stdout
    return dict(line.split(" ", 1) for line in out.splitlines())


def memory_judged(vm: Machine) -> tuple[bool, Callable[[], int]]:
    """What a test of given-back memory reads: the QEMU process's RSS; on a
    ``make kernel-debug`` guest the device memory's, since KASAN's shadow and
    stack depot grow in boot memory with every page the kernel hands out."""
    with vm.ssh() as ssh:
        debug = "-czone-debug-" in ssh.check("uname -r").stdout
    if debug:
        return True, lambda: hostmem.stable_mapping_rss(vm.pid, DEVICE_MEMFD)
    return False, lambda: rss(vm)


def meminfo_kib(vm: Machine, key: str) -> int:
    with vm.ssh() as ssh:
        return int(ssh.check(f"awk '/^{key}:/ {{print $2}}' /proc/meminfo").stdout)


@pytest.fixture
def czvm(microvm_factory) -> Machine:
    return microvm_factory.boot("czv", **CZONE_VIRTIO_VM)


@pytest.fixture
def agent(czvm: Machine):
    ssh = czvm.ssh()
    with GuestAgent(ssh) as ag:
        yield ag
    ssh.close()


def test_create_touch_destroy_returns_rss(czvm: Machine, agent: GuestAgent) -> None:
    debug, judged = memory_judged(czvm)
    before, before_pss = judged(), pss(czvm)
    cz = agent.create(256)
    agent.spawn("c", cz, 256)
    assert agent.touch("c", 200) == 200 * 1024

    grown = judged() - before
    assert 190 * MiB <= grown <= 230 * MiB, f"RSS grew by {grown / MiB:.0f} MiB"
    grown_pss = pss(czvm) - before_pss
    assert grown_pss >= 190 * MiB
    assert qmp.device_size(czvm, DEV) >= 200 * MiB

    agent.kill("c")
    res = agent.destroy(cz)
    assert res["migrated"] == 0 and res["failed"] == 0
    # Judged against the bytes the container grew QEMU by, not QEMU's whole RSS.
    kept = judged() - before
    assert kept <= 0.05 * grown, \
        f"{kept / MiB:.0f} of the {grown / MiB:.0f} MiB the container used stayed"
    kept_pss = pss(czvm) - before_pss
    assert debug or kept_pss <= 0.05 * grown_pss, f"PSS: {kept_pss / MiB:.0f} MiB stayed"
    assert qmp.wait_size(czvm, DEV, 0, timeout=60) == 0
    assert_dmesg_clean(czvm)


def test_destroy_unplugs_contiguous_chunks_in_one_request(czvm: Machine,
                                                          agent: GuestAgent) -> None:
    cz = agent.create(128)
    agent.spawn("c", cz, 128)
    agent.touch("c", 64)
    before = state(czvm)
    agent.kill("c")
    agent.destroy(cz)
    after = state(czvm)
    blocks = int(after["unplugs"]) - int(before["unplugs"])
    requests = int(after["unplug_requests"]) - int(before["unplug_requests"])
    assert blocks >= 32 and requests == 1, f"{blocks} blocks in {requests} requests"
    assert qmp.wait_size(czvm, DEV, 0, timeout=60) == 0


def test_czones_grown_together_keep_their_blocks_apart(czvm: Machine,
                                                       agent: GuestAgent) -> None:
    """Two CZones grown in turn, 64 KiB at a time: each grows into the blocks
    after its own, so the dead one goes back in one request, all of it."""
    names = []
    for name in ("dead", "live"):
        cz = agent.create(96)
        agent.spawn(name, cz, 96, thp=False)
        names.append((name, cz))
    agent.interleave([n for n, _ in names], 64, 64)
    live_pages = agent.verify("live")
    # The device memory alone: SSH sessions in between touch boot memory.
    backed = hostmem.stable_mapping_rss(czvm.pid, DEVICE_MEMFD)
    st0 = state(czvm)
    agent.kill("dead")
    res = agent.destroy(names[0][1])
    st1 = state(czvm)
    returned = backed - hostmem.stable_mapping_rss(czvm.pid, DEVICE_MEMFD)
    blocks = int(st1["unplugs"]) - int(st0["unplugs"])
    runs = int(st1["unplug_requests"]) - int(st0["unplug_requests"])
    assert res["migrated"] == 0 and res["failed"] == 0
    assert blocks >= 32 and runs == 1, f"{blocks} blocks in {runs} runs: interleaved"
    assert 63 * MiB <= returned <= 68 * MiB, f"{returned / MiB:.1f} MiB came back"
    assert agent.verify("live") == live_pages
    assert st1["failures"] == st0["failures"] and st1["spare_blocks"] == "0"
    assert_dmesg_clean(czvm)


def test_destroy_of_a_scattered_czone_returns_it_all(czvm: Machine,
                                                     agent: GuestAgent) -> None:
    """15 small CZones spread over the region (the agent holds 16 containers)
    leave a big one only short runs between them: its many runs go to the
    device together (one batch), and all of it comes back."""
    small = []
    for i in range(15):
        cz = agent.create(4)
        agent.spawn(f"s{i}", cz, 1, thp=False)
        agent.touch(f"s{i}", 1)
        small.append(f"s{i}")
    pages = {name: agent.verify(name) for name in small}
    big = agent.create(400)
    agent.spawn("big", big, 400, thp=False)
    agent.touch("big", 384)
    backed = hostmem.stable_mapping_rss(czvm.pid, DEVICE_MEMFD)
    st0 = state(czvm)
    agent.kill("big")
    res = agent.destroy(big)
    st1 = state(czvm)
    returned = backed - hostmem.stable_mapping_rss(czvm.pid, DEVICE_MEMFD)
    blocks = int(st1["unplugs"]) - int(st0["unplugs"])
    runs = int(st1["unplug_requests"]) - int(st0["unplug_requests"])
    assert res["migrated"] == 0 and res["failed"] == 0
    assert blocks >= 192 and runs >= 8, f"{blocks} blocks in {runs} runs: not scattered"
    assert 383 * MiB <= returned <= 392 * MiB, f"{returned / MiB:.1f} MiB came back"
    assert {name: agent.verify(name) for name in small} == pages
    assert st1["failures"] == st0["failures"] and st1["spare_blocks"] == "0"
    assert_dmesg_clean(czvm)


def test_host_reclaims_one_czone_without_ssh(czvm: Machine, agent: GuestAgent) -> None:
    cz = agent.create(256)
    agent.spawn("idle", cz, 256, thp=False)
    agent.touch("idle", 200)
    pages = agent.verify("idle")
    assert agent.punch("idle", 64) == 100 * 1024
    touched = rss(czvm)

    res = qmp.reclaim(czvm, DEV, timeout=60, czone=cz)
    # The guest's count also holds the chunks it found empty and unplugged.
    assert res["czones"] == 1 and res["bytes"] >= 99 * MiB, res
    dropped = touched - rss(czvm)
    assert 95 * MiB <= dropped <= 105 * MiB, f"RSS fell by {dropped / MiB:.0f} MiB"
    assert agent.verify("idle") == pages

    again = qmp.reclaim(czvm, DEV, timeout=60, czone=cz)
    assert again["seq"] == res["seq"] + 1 and again["bytes"] == 0, again
    # A CZone that does not exist is reclaimed by nobody, and breaks nothing.
    assert qmp.reclaim(czvm, DEV, timeout=60, czone=999_999)["czones"] == 0
    assert_dmesg_clean(czvm)


def test_host_reclaims_idle_czones_only(czvm: Machine, agent: GuestAgent) -> None:
    idle, busy = agent.create(128), agent.create(128)
    agent.spawn("idle", idle, 128, thp=False)
    agent.touch("idle", 64)
    assert agent.punch("idle", 64) == 32 * 1024
    time.sleep(8)
    agent.spawn("busy", busy, 128, thp=False)
    agent.touch("busy", 64)
    assert agent.punch("busy", 64) == 32 * 1024

    res = qmp.reclaim(czvm, DEV, timeout=60, idle_ms=5000)
    assert res["czones"] == 1 and res["bytes"] >= 31 * MiB, res
    assert agent.stat(busy)["backed"] > agent.stat(busy)["used"], "the busy CZone was reclaimed"
    assert agent.stat(idle)["backed"] == agent.stat(idle)["used"]
    assert_dmesg_clean(czvm)


def test_a_guest_asking_to_suspend_keeps_running(czvm: Machine, agent: GuestAgent) -> None:
    cz = agent.create(128)
    agent.spawn("c", cz, 128, thp=False)
    agent.touch("c", 64)
    pages = agent.verify("c")
    with czvm.ssh() as ssh:
        # S3 is not offered (argv), so "mem" is suspend-to-idle; the driver refuses it.
        r = ssh.run("echo mem > /sys/power/state", timeout=120)
        assert r.rc != 0 and "not permitted" in r.stderr, r
        assert "not supported" in ssh.check("dmesg | grep virtio_czone").stdout
    assert czvm.is_running()
    assert agent.verify("c") == pages
    assert qmp.device_size(czvm, DEV) >= 64 * MiB
    assert_dmesg_clean(czvm)


def test_stats_carry_their_age(czvm: Machine, agent: GuestAgent) -> None:
    stats_log = stats_log_path(czvm.run_dir)
    cz = agent.create(64)
    agent.spawn("s", cz, 64)
    agent.touch("s", 16)
    requested = time.time()
    # While a CZone exists the guest sends a snapshot every second.
    deadline = time.monotonic() + 10
    while (at := qmp.czone_stats_time(stats_log)) is None or at < requested:
        assert time.monotonic() < deadline, f"no stats snapshot after the request: {at}"
        time.sleep(0.2)
    [st] = [s for s in qmp.czone_stats(czvm, DEV) if s["czone"] == cz]
    assert st["used"] >= 16 * MiB
    assert time.time() - at < 3


def test_idle_reclaim_returns_the_free_half_only(czvm: Machine, agent: GuestAgent) -> None:
    cz = agent.create(256)
    agent.spawn("idle", cz, 256, thp=False)
    agent.touch("idle", 200)
    pages = agent.verify("idle")
    touched = rss(czvm)

    # Every other 64 KiB: the free half is scattered among used pages.
    assert agent.punch("idle", 64) == 100 * 1024
    assert rss(czvm) >= touched - 4 * MiB, "the guest's free alone must not move RSS"

    res = agent.reclaim(cz)
    assert res["failed"] == 0
    assert res["discarded"] * 4096 >= 99 * MiB
    dropped = touched - rss(czvm)
    assert 95 * MiB <= dropped <= 105 * MiB, f"RSS fell by {dropped / MiB:.0f} MiB"
    assert agent.verify("idle") == pages

    # The flag makes a second pass a no-op: nothing is returned twice.
    again = agent.reclaim(cz)
    assert again["discarded"] == 0 and again["released"] == 0
    st = agent.stat(cz)
    assert st["backed"] == st["used"]
    assert_dmesg_clean(czvm)


def test_churn_leaves_rss_and_memtotal_flat(czvm: Machine, agent: GuestAgent) -> None:
    _, judged = memory_judged(czvm)
    before, total = judged(), meminfo_kib(czvm, "MemTotal")
    for i in range(50):
        cz = agent.create(64)
        agent.spawn(f"c{i}", cz, 64)
        agent.touch(f"c{i}", 32)
        agent.kill(f"c{i}")
        assert agent.destroy(cz)["failed"] == 0
    kept = judged() - before
    # Half of what one cycle touches (the guest's own RAM moves a few MiB too):
    # a leaked cycle cannot hide in QEMU's total.
    assert kept <= 16 * MiB, f"{kept / MiB:.0f} MiB stayed after 50 cycles of 32 MiB"
    assert meminfo_kib(czvm, "MemTotal") == total
    st = state(czvm)
    assert int(st["plugs"]) >= 50 and st["plugs"] == st["unplugs"]
    assert int(st["plugged_bytes"]) == 0 and int(st["failures"]) == 0
    assert_dmesg_clean(czvm)


def test_reclaim_races_faults_frees_and_destroys_on_4_vcpus(microvm_factory) -> None:
    vm = microvm_factory.boot("czrace", cpus=4, **CZONE_VIRTIO_VM)
    print(run_program(vm, "czone_race 20", timeout=600))
    # Every CZone is gone: the device holds nothing plugged.
    assert qmp.wait_size(vm, DEV, 0, timeout=60) == 0
    assert_dmesg_clean(vm)


def test_a_fault_storm_against_an_empty_source_fails_cleanly(microvm_factory) -> None:
    """Four vCPUs fault into CZones that ask for far more than the device
    holds: once it is empty every task ends, OOM-killed by its own CZone,
    within a bound, and every chunk goes back."""
    vm = microvm_factory.boot("czstorm", cpus=4, **{**CZONE_VIRTIO_VM,
                                                    "device_memory_mib": 256,
                                                    "requested_mib": 256})
    print(run_program(vm, "czone_storm 120", timeout=300))
    assert qmp.wait_size(vm, DEV, 0, timeout=60) == 0
    assert_dmesg_clean(vm)


def test_kcore_reader_in_a_growing_czone_beside_destroys(czvm: Machine,
                                                         agent: GuestAgent) -> None:
    """A /proc/kcore read holds page_offline_freeze() across copies to the
    reader's buffer, which may fault and grow the reader's CZone (cz->mutex,
    the driver's hp_mutex); a destroy beside it sets PageOffline under
    page_offline_begin().  Neither may wait for the other: a deadlock would
    hang this test, and the debug build's lockdep reports the cycle."""
    reader = agent.create(64)
    with czvm.ssh() as ssh:
        ssh.check("test -r /proc/kcore")
        # each dd is a new task whose 8 MiB buffer faults during the copy
        ssh.check(f"nohup sh -c 'for i in $(seq 12); do /usr/local/bin/czone_exec {reader} "
                  "dd if=/proc/kcore of=/dev/null bs=8M count=2 skip=1; done; "
                  "echo done > /tmp/kcore.done' > /tmp/kcore.log 2>&1 &")
        for i in range(8):
            cz = agent.create(32)
            agent.spawn(f"d{i}", cz, 32, thp=False)
            agent.touch(f"d{i}", 16)
            agent.kill(f"d{i}")
            assert agent.destroy(cz)["failed"] == 0
        deadline = time.monotonic() + 120
        while ssh.run("test -e /tmp/kcore.done").rc:
            assert time.monotonic() < deadline, \
                "the kcore readers did not finish: " + ssh.run("cat /tmp/kcore.log").stdout
            time.sleep(0.5)
        assert "records in" in ssh.check("cat /tmp/kcore.log").stdout
    assert agent.stat(reader)["chunks"] >= 4, "the reader's CZone never grew"
    assert_dmesg_clean(czvm)


def hook(vm: Machine, req: str) -> tuple[int, str]:
    """Send one raw request through debugfs: (write status, device response)."""
    with vm.ssh() as ssh:
        res = ssh.run(f"d=$(echo /sys/kernel/debug/virtio_czone/*); echo '{req}' > $d/request "
                      f"&& cat $d/request")
    return res.rc, (res.stdout.strip() or res.stderr.strip())


def first_chunk(vm: Machine, cz: int) -> int:
    """Guest-physical address of a chunk of CZone ``cz``."""
    with vm.ssh() as ssh:
        line = ssh.check(f"head -1 /sys/kernel/debug/czone/{cz}/chunks").stdout
    return int(line.split("-")[0], 16) * 4096


def test_malformed_requests_get_errors(czvm: Machine, agent: GuestAgent) -> None:
    start, size = (int(x, 16) for x in state(czvm)["region"].split())
    block = 2 * MiB
    live = agent.create(64)
    agent.spawn("live", live, 64)
    agent.touch("live", 48)
    pages = agent.verify("live")

    # A block that was plugged and is unplugged again.
    gone = agent.create(16)
    agent.spawn("gone", gone, 16)
    agent.touch("gone", 8)
    unplugged = first_chunk(czvm, gone)
    agent.kill("gone")
    agent.destroy(gone)

    far = start + size - 4 * block     # never plugged: the driver plugs from the bottom
    bad = {
        "misaligned unplug": f"1 {far + 4096} {block}",
        "misaligned size": f"1 {far} {block + 4096}",
        "misaligned plug": f"0 {far + 4096} {block}",
        "out of range (below)": f"1 {start - block} {block}",
        "out of range (above)": f"1 {start + size} {block}",
        "overflowing range": f"4 {start} {(1 << 64) - 4096}",
        "unknown type": f"9 {far} {block}",
        "discard of unplugged memory": f"3 {unplugged} 4096",
        "double unplug": f"1 {unplugged} {block}",
        "state of a range past the end": f"4 {start + size - block} {2 * block}",
    }
    for what, req in bad.items():
        rc, resp = hook(czvm, req)
        assert rc == 0 and resp == "ERROR", f"{what}: {req} -> rc {rc} {resp!r}"
        assert czvm.qmp("query-status")["status"] == "running"

    # The hook never lets a request reach plugged memory.
    for req in (f"1 {start} {size}", "2 0 0", f"0 {unplugged} {block}"):
        rc, _ = hook(czvm, req)
        assert rc != 0, f"the hook sent {req}"

    assert agent.verify("live") == pages
    assert state(czvm)["broken"] == "0"
    cz = agent.create(16)
    agent.spawn("after", cz, 16)
    agent.touch("after", 8)
    assert agent.verify("after") == 2048
    assert_dmesg_clean(czvm)


def test_requested_size_shrink_takes_free_chunks_first(czvm: Machine,
                                                       agent: GuestAgent) -> None:
    busy, idle = agent.create(64), agent.create(64)
    agent.spawn("busy", busy, 64)
    agent.touch("busy", 32)
    agent.spawn("idle", idle, 64)
    agent.touch("idle", 32)
    agent.free("idle", 32)
    used = agent.stat(busy)["chunks"] * 2 * MiB
    assert qmp.device_size(czvm, DEV) >= used + 32 * MiB
    before = rss(czvm)

    qmp.set_requested_size(czvm, DEV, used)
    size = hostmem.settle(lambda: qmp.device_size(czvm, DEV), tolerance=0).value
    # idle's empty chunks went back; the one its task's stack and data use stays
    kept = agent.stat(busy)["chunks"] + agent.stat(idle)["chunks"]
    assert size == kept * 2 * MiB <= used + 2 * MiB
    assert before - rss(czvm) >= 28 * MiB
    assert agent.verify("busy") == 32 * 256

    # What CZones use cannot go: the driver keeps it and says how much.  An
    # empty reserve chunk (kernel 0050) the first shrink did not need goes now.
    qmp.set_requested_size(czvm, DEV, 0)
    with czvm.ssh() as ssh:
        ssh.check("for i in $(seq 100); do grep -q '^shortfall_bytes [1-9]' "
                  "/sys/kernel/debug/virtio_czone/*/state && exit 0; sleep 0.1; done; exit 1")
    left = hostmem.settle(lambda: qmp.device_size(czvm, DEV), tolerance=0).value
    held = (agent.stat(busy)["chunks"] + agent.stat(idle)["chunks"]) * 2 * MiB
    assert int(state(czvm)["shortfall_bytes"]) == left == held <= size

    # Nothing more is plugged: a container that needs memory is OOM-killed.
    greedy = agent.create(64)
    agent.spawn("greedy", greedy, 64)
    with pytest.raises(AgentError):
        agent.touch("greedy", 8)
    assert agent.verify("busy") == 32 * 256

    qmp.set_requested_size(czvm, DEV, 1024 * MiB)
    agent.spawn("again", greedy, 64)
    agent.touch("again", 8)
    assert agent.verify("again") == 8 * 256
    assert_dmesg_clean(czvm)


def test_a_kdump_kernel_leaves_the_device_alone(microvm_factory) -> None:
    """elfcorehdr= makes is_kdump_kernel() true (the header itself is bogus:
    the vmcore is not set up, which this test does not need).  A fresh VM
    has nothing plugged, so this shows that the device is not used at all;
    it cannot show an UNPLUG_ALL of memory a crashed kernel left plugged."""
    vm = microvm_factory.boot("czkdump", **CZONE_VIRTIO_VM, extra_append="elfcorehdr=0x1000")
    with vm.ssh() as ssh:
        assert "kdump kernel: not using the device" in ssh.check("dmesg").stdout
        assert "virtio_czone" not in ssh.check("cat /proc/iomem").stdout
        assert ssh.run("ls /sys/kernel/debug/virtio_czone/virtio*").rc != 0
    assert qmp.device_size(vm, DEV) == 0
    assert vm.qmp("query-status")["status"] == "running"
    assert_dmesg_clean(vm)


VMEM = "vmem0"


def memory_device(kind: str, dev_id: str, size_mib: int, requested_mib: int) -> list[str]:
    return ["-object", f"memory-backend-memfd,id=mem-{dev_id},size={size_mib}M",
            "-device", f"{kind},id={dev_id},memdev=mem-{dev_id},block-size=2M,"
                       f"requested-size={requested_mib}M"]


@pytest.mark.parametrize("argv_first", ["virtio-czone", "virtio-mem"])
def test_virtio_mem_beside_virtio_czone(microvm_factory, argv_first: str) -> None:
    """Both memory devices in one VM.  Built in, the virtio-mem driver
    registers first and probes first whatever the argv order; rebinding it
    then probes it after virtio-czone.  Each order once had the second
    driver fail: there was one online_page callback for both (kernel
    patches 0040/0041)."""
    if argv_first == "virtio-czone":
        spec = {**CZONE_VIRTIO_VM,
                "extra_args": tuple(memory_device("virtio-mem-pci", VMEM, 1024, 0))}
    else:
        spec = {"memory_mib": 768, "memory_mode": "virtio-mem", "device_memory_mib": 1024,
                "requested_mib": 0,
                "extra_args": tuple(memory_device("virtio-czone-pci", DEV, 1024, 1024))}
    vm = microvm_factory.boot(f"both-{argv_first}", **spec)
    with vm.ssh() as ssh:
        dmesg = ssh.check("dmesg").stdout
        assert "manages onlining" not in dmesg
        assert "MiB at" in dmesg, "virtio-czone did not probe:\n" + dmesg
        vmem_dev = ssh.check("basename /sys/bus/virtio/drivers/virtio_mem/virtio*").stdout.strip()
        assert vmem_dev.startswith("virtio"), "virtio-mem did not probe:\n" + dmesg
        ssh.check(f"echo {vmem_dev} > /sys/bus/virtio/drivers/virtio_mem/unbind")
        ssh.check(f"echo {vmem_dev} > /sys/bus/virtio/drivers/virtio_mem/bind")
        assert ssh.run(f"test -e /sys/bus/virtio/drivers/virtio_mem/{vmem_dev}").rc == 0, \
            "virtio-mem did not probe after virtio-czone:\n" + ssh.check("dmesg").stdout
    # The virtio-czone region is onlined but never counted: only boot memory.
    total_kib = meminfo_kib(vm, "MemTotal")
    assert total_kib < 768 * 1024

    qmp.set_requested_size(vm, VMEM, 256 * MiB)
    assert qmp.wait_size(vm, VMEM, 256 * MiB, timeout=120) == 256 * MiB
    grown_kib = meminfo_kib(vm, "MemTotal") - total_kib
    assert 250 * 1024 <= grown_kib <= 256 * 1024, f"MemTotal grew by {grown_kib} KiB"

    ssh = vm.ssh()
    with GuestAgent(ssh) as agent:
        cz = agent.create(128)
        agent.spawn("c", cz, 128)
        assert agent.touch("c", 64) == 64 * 1024
        assert qmp.device_size(vm, DEV) >= 64 * MiB
        agent.kill("c")
        assert agent.destroy(cz)["failed"] == 0
    ssh.close()
    assert qmp.wait_size(vm, DEV, 0, timeout=60) == 0

    qmp.set_requested_size(vm, VMEM, 0)
    assert qmp.wait_size(vm, VMEM, 0, timeout=120) == 0
    assert meminfo_kib(vm, "MemTotal") == total_kib
    assert_dmesg_clean(vm)


def test_region_goes_movable_whatever_the_online_policy(microvm_factory) -> None:
    """memhp_default_state=online would online hot-added memory to ZONE_NORMAL
    while the driver adds it; the driver's memory notifier refuses that, and
    every block of the region ends up in ZONE_MOVABLE (kernel patch 0042)."""
    vm = microvm_factory.boot("czonline", **CZONE_VIRTIO_VM,
                              extra_append="memhp_default_state=online")
    with vm.ssh() as ssh:
        assert "memhp_default_state=online" in ssh.check("cat /proc/cmdline").stdout.split()
        dmesg = ssh.check("dmesg").stdout
        line, = (x for x in ssh.check("cat /proc/iomem").stdout.splitlines()
                 if x.endswith(": System RAM (virtio_czone)"))
        start, end = (int(x, 16) for x in line.split(" : ")[0].strip().split("-"))
        block = int(ssh.check("cat /sys/devices/system/memory/block_size_bytes").stdout, 16)
        zones = {ssh.check(f"cat /sys/devices/system/memory/memory{n}/valid_zones").stdout.strip()
                 for n in range(start // block, (end + 1) // block)}
    assert zones == {"Movable"}, f"{zones}:\n{dmesg}"
    assert "it goes to Movable" in dmesg, "auto-onlining was not tried:\n" + dmesg
    ssh = vm.ssh()
    with GuestAgent(ssh) as agent:
        cz = agent.create(64)
        agent.spawn("c", cz, 64)
        assert agent.touch("c", 32) == 32 * 1024
        agent.kill("c")
        assert agent.destroy(cz)["failed"] == 0
    ssh.close()
    assert_dmesg_clean(vm)
