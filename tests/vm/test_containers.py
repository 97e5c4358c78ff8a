"""Function containers for real: crun bundles in CZones, every function
answering, a broken bundle leaving nothing behind, memory back on the host.

One MCPV VM (czone memory mode) serves the whole module; each test starts
and kills its own containers through the guest agent.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from czone import hostmem
from czone.guest.runtime import AGENT_MARKER, AgentError, RuntimeAgent
from czone.qemu.cmdline import DEVICE_MEMFD
from czone.qemu.machine import Machine
from tests.vm.conftest import BOOT_TIMEOUT, MicrovmFactory
from tests.vm.guest import assert_dmesg_clean, run_program

pytestmark = pytest.mark.vm

EXPECTED = json.loads((Path(__file__).resolve().parents[2]
                       / "guest-image/functions/expected.json").read_text())
MiB = hostmem.MiB


@pytest.fixture
def mcpv_vm(microvm_factory: MicrovmFactory) -> Machine:
    vm = microvm_factory.boot("mcpv", memory_mib=512, memory_mode="czone",
                              device_memory_mib=1024, requested_mib=1024)
    vm.wait_for_console(AGENT_MARKER, BOOT_TIMEOUT)
    return vm


@pytest.fixture
def agent(mcpv_vm: Machine) -> Iterator[RuntimeAgent]:
    with mcpv_vm.ssh() as ssh, RuntimeAgent(ssh) as ag:
        yield ag


def guest(vm: Machine, cmd: str) -> str:
    with vm.ssh() as ssh:
        return ssh.check(cmd).stdout


def test_every_function_answers_and_survives_its_own_error(agent: RuntimeAgent) -> None:
    for fn, exp in EXPECTED.items():
        ctr = f"t-{fn.replace('_', '-')}"
        agent.start(ctr, fn, 128)
        ok = agent.invoke(ctr)
        assert ok["ok"] and ok["result"] == exp["result"], (fn, ok)
        bad = agent.invoke(ctr, exp["bad_payload"])
        assert not bad["ok"] and bad["error"] == exp["bad_error"], (fn, bad)
        again = agent.invoke(ctr, exp["default_payload"])
        assert again["ok"] and again["result"] == exp["result"], (fn, again)
        agent.kill(ctr)
    assert agent.list() == []


def test_container_processes_and_pages_live_in_its_czone(mcpv_vm: Machine,
                                                        agent: RuntimeAgent) -> None:
    a = agent.start("pa", "matmul", 128)
    b = agent.start("pb", "float_operation", 128)
    for ctr in ("pa", "pb"):
        assert agent.invoke(ctr)["ok"]
    listed = {c["id"]: c for c in agent.list()}
    for ctr, started, other in (("pa", a, b), ("pb", b, a)):
        pids = listed[ctr]["pids"]
        assert pids, f"{ctr}: no process in its cgroup"
        czones = guest(mcpv_vm, " ".join(f"cat /proc/{p}/czone;" for p in pids)).split()
        assert czones == [str(started["czone"])] * len(pids), (ctr, pids, czones)
        # The server is the container's init: the first pid of its cgroup.
        out = run_program(mcpv_vm, f"czone_pages {min(pids)} {started['czone']} "
                                   f"{other['czone']}")
        assert f"in CZone {started['czone']}, 0 in the others, 0 elsewhere" in out, out
    stats = agent.stats()
    assert stats["pa"]["czone_stat"]["used_pages"] > 0
    assert stats["pa"]["memory_current"] <= 128 << 20
    agent.kill("pa")
    agent.kill("pb")
    assert_dmesg_clean(mcpv_vm)


def test_a_broken_bundle_returns_crun_stderr_and_leaves_nothing(mcpv_vm: Machine,
                                                               agent: RuntimeAgent) -> None:
    before = guest(mcpv_vm, "ls /sys/kernel/debug/czone/").split()
    with pytest.raises(AgentError) as e:
        agent.start("broken", "matmul", 64, args=["/no/such/server"])
    assert e.value.errno_name == "EIO"
    assert "/no/such/server" in e.value.detail, e.value.detail
    left = guest(mcpv_vm, "ls /run/czone/ctr /sys/fs/cgroup/czone; crun list -q; "
                          "ls /sys/kernel/debug/czone/")
    assert "broken" not in left, left
    assert guest(mcpv_vm, "ls /sys/kernel/debug/czone/").split() == before
    with pytest.raises(AgentError, match="unknown function 'nope'"):
        agent.start("x", "nope", 64)
    with pytest.raises(AgentError) as e:
        agent.invoke("ghost")
    assert e.value.errno_name == "ENOENT"


def test_kill_gives_the_containers_memory_back_to_the_host(mcpv_vm: Machine,
                                                          agent: RuntimeAgent) -> None:
    agent.start("big", "matmul", 256)
    # n=1000: three float64 matrices of 7.6 MiB each, on top of numpy itself.
    assert agent.invoke("big", {"n": 1000, "seed": 1})["ok"]
    backed = agent.stats()["big"]["czone_stat"]["host_backed_pages"] * 4096
    assert backed > 32 * MiB, backed
    # The guest memory the host backs: the memfd behind the device.
    before = hostmem.stable_mapping_rss(mcpv_vm.pid, DEVICE_MEMFD)
    res = agent.kill("big")
    after = hostmem.stable_mapping_rss(mcpv_vm.pid, DEVICE_MEMFD)
    assert res["migrated_pages"] == 0 and res["released_chunks"] > 0
    # The host gets back what the CZone had backed, within 2 MiB (one chunk).
    assert abs((before - after) - backed) <= 2 * MiB, (before - after, backed)


def test_the_writable_layer_is_the_containers_own_memory(mcpv_vm: Machine,
                                                        agent: RuntimeAgent) -> None:
    # The overlay's upper layer is a tmpfs the container's first task mounted:
    # what the container writes to its root lands in its CZone.
    agent.start("writer", "matmul", 64, args=[
        "/bin/sh", "-c", "dd if=/dev/urandom of=/layer.bin bs=1M count=24 2>/dev/null; "
                         "echo ready; exec sleep 600"])
    st = agent.stats()["writer"]
    assert st["czone_stat"]["used_pages"] * 4096 >= 24 * MiB, st["czone_stat"]
    assert guest(mcpv_vm, "ls /run/czone/fnbase/layer.bin 2>&1 || true").strip().endswith(
        "No such file or directory"), "the write went to the shared base image"
    agent.kill("writer")
    assert_dmesg_clean(mcpv_vm)
