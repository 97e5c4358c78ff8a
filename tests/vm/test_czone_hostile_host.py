"""The guest driver against a hostile host: the virtio-czone device lies or stops.

The device's test-only ``x-fault`` property (qemu-device/) makes it misbehave:
a config space that names an impossible node or region, responses handed
back unwritten, requests never answered.  The guest driver must refuse the
device at probe with one clear line, or fail the request with an errno, and
the guest stays up with its CZones' memory intact.  A PCI remove of the
device while CZones live is the same test from the other side: the device
goes, the CZones keep their memory.
"""

from __future__ import annotations

import re
import time

import pytest

from czone import hostmem
from czone.guest.agent import AgentError, GuestAgent
from czone.qemu import qmp
from czone.qemu.machine import Machine

from .guest import assert_dmesg_clean
from .test_czone_virtio import CZONE_VIRTIO_VM, DEV, hook, state

pytestmark = pytest.mark.vm
MiB = hostmem.MiB
# Short enough for a test, long enough for a TCG guest on a busy host.
TIMEOUT_MS = 3000
# The virtio-czone device's backend object, where x-fault lives.
BACKEND = f"{qmp.peripheral(DEV)}/virtio-backend"


def set_fault(vm: Machine, fault: str) -> None:
    vm.qmp("qom-set", path=BACKEND, property="x-fault", value=fault)


def dmesg(vm: Machine) -> str:
    with vm.ssh() as ssh:
        return ssh.check("dmesg").stdout


def far_block(vm: Machine) -> int:
    """A block the driver has not plugged: it plugs from the bottom."""
    start, size = (int(x, 16) for x in state(vm)["region"].split())
    return start + size - 4 * 2 * MiB


def boot(factory, name: str, fault: str = "none", append: str = "") -> Machine:
    return factory.boot(name, **CZONE_VIRTIO_VM,
                        extra_args=("-global", f"virtio-czone.x-fault={fault}"),
                        extra_append=append)


@pytest.mark.parametrize("fault, line", [
    ("bad-node", "node 65535 is not a possible NUMA node"),
    ("region-wrap", "is empty or wraps"),
    ("region-outside", "is outside the pluggable range"),
])
def test_a_device_with_an_impossible_config_is_refused(microvm_factory, fault: str,
                                                       line: str) -> None:
    vm = boot(microvm_factory, "czbad", fault)
    log = dmesg(vm)
    ours = "\n".join(x for x in log.splitlines() if "virtio_czone" in x)
    assert line in log, f"no {line!r} in dmesg:\n{ours}"
    with vm.ssh() as ssh:
        # Refused before anything was added, plugged or registered.
        assert "virtio_czone" not in ssh.check("cat /proc/iomem").stdout
        assert ssh.run("ls /sys/kernel/debug/virtio_czone/virtio*").rc != 0
    assert qmp.device_size(vm, DEV) == 0
    assert vm.qmp("query-status")["status"] == "running"
    assert_dmesg_clean(vm)


def test_an_unwritten_response_fails_the_request(microvm_factory) -> None:
    vm = boot(microvm_factory, "czshort")
    set_fault(vm, "short-response")
    # Zeroed, it would read as ACK (RESP_ACK is 0).
    rc, resp = hook(vm, f"4 {far_block(vm)} {2 * MiB}")
    assert rc != 0 and "Protocol error" in resp, (rc, resp)

    ssh = vm.ssh()
    with GuestAgent(ssh, timeout=120) as agent:
        cz = agent.create(64)
        agent.spawn("c", cz, 64)
        with pytest.raises(AgentError):
            agent.touch("c", 8)     # its PLUG "succeeded" unplugged before the fix
        assert qmp.device_size(vm, DEV) == 0
        assert "response of 0 bytes, expected 10" in dmesg(vm)

        # The device is not given up on: once it answers, CZones grow again.
        set_fault(vm, "none")
        assert state(vm)["broken"] == "0"
        agent.spawn("again", cz, 64)
        assert agent.touch("again", 8) == 8 * 1024
        assert agent.verify("again") == 8 * 256
        assert qmp.device_size(vm, DEV) >= 8 * MiB
    ssh.close()
    assert_dmesg_clean(vm)


def test_a_host_that_never_answers_wedges_no_task(microvm_factory) -> None:
    vm = boot(microvm_factory, "czmute",
              append=f"virtio_czone.request_timeout_ms={TIMEOUT_MS}")
    ssh = vm.ssh()
    with GuestAgent(ssh, timeout=120) as agent:
        live = agent.create(64)
        agent.spawn("live", live, 64)
        agent.touch("live", 16)
        pages = agent.verify("live")
        plugged = qmp.device_size(vm, DEV)

        set_fault(vm, "never-answer")
        # A page fault that needs a PLUG holds mmap_lock while it waits.
        cz = agent.create(64)
        agent.spawn("stuck", cz, 64)
        t0 = time.monotonic()
        with pytest.raises(AgentError):
            agent.touch("stuck", 8)
        waited = time.monotonic() - t0
        assert waited < 60, f"the fault waited {waited:.0f} s for a dead host"
        assert f"no answer to request 0 within {TIMEOUT_MS} ms" in dmesg(vm)
        assert state(vm)["broken"] == "1"

        # Given up on: nothing more is sent, so nothing more waits.
        rc, resp = hook(vm, f"4 {far_block(vm)} {2 * MiB}")
        assert rc != 0 and "Input/output error" in resp, (rc, resp)

        # The CZone that has its memory keeps it, and can still be destroyed.
        assert agent.verify("live") == pages
        agent.kill("live")
        assert agent.destroy(live)["failed"] == 0
        assert qmp.device_size(vm, DEV) == plugged
    ssh.close()
    assert vm.qmp("query-status")["status"] == "running"
    assert_dmesg_clean(vm)


def test_a_destroy_against_a_host_that_never_answers_ends(microvm_factory) -> None:
    """The batched UNPLUGs of a destroy share one deadline."""
    vm = boot(microvm_factory, "czmute2",
              append=f"virtio_czone.request_timeout_ms={TIMEOUT_MS}")
    ssh = vm.ssh()
    with GuestAgent(ssh, timeout=120) as agent:
        cz = agent.create(128)
        agent.spawn("c", cz, 128, thp=False)
        agent.touch("c", 64)
        plugged = qmp.device_size(vm, DEV)
        agent.kill("c")

        set_fault(vm, "never-answer")
        t0 = time.monotonic()
        res = agent.destroy(cz)
        waited = time.monotonic() - t0
        assert waited < 60, f"the destroy waited {waited:.0f} s for a dead host"
        # The CZone is gone; its blocks stay plugged, spare, never handed out.
        assert res["failed"] == 0 and res["released"] * 2 * MiB == plugged, res
        assert f"no answer to request 1 within {TIMEOUT_MS} ms" in dmesg(vm)
        st = state(vm)
        assert st["broken"] == "1" and int(st["spare_blocks"]) * 2 * MiB == plugged, st
        assert qmp.device_size(vm, DEV) == plugged
    ssh.close()
    assert vm.qmp("query-status")["status"] == "running"
    assert_dmesg_clean(vm)


def test_a_surprise_removal_leaves_czones_their_memory(microvm_factory) -> None:
    # Poisoned frees turn a use of the freed virtio device into an oops.
    vm = boot(microvm_factory, "czgone", append="slub_debug=P")
    ssh = vm.ssh()
    with GuestAgent(ssh, timeout=120) as agent:
        cz = agent.create(128)
        agent.spawn("c", cz, 128, thp=False)
        agent.touch("c", 64)
        pages = agent.verify("c")
        plugged = qmp.device_size(vm, DEV)
        assert plugged >= 64 * MiB

        with vm.ssh() as s:
            s.check("d=$(readlink -f /sys/bus/virtio/drivers/virtio_czone/virtio*) && "
                    "echo 1 > $(dirname $d)/remove")

        # The CZone keeps its memory, and the host still backs it.
        assert agent.verify("c") == pages
        assert qmp.device_size(vm, DEV) == plugged
        # The reclaim's discards and a new CZone's growth fail cleanly.
        assert agent.punch("c", 64) > 0
        agent.reclaim(cz)
        other = agent.create(64)
        agent.spawn("new", other, 64)
        with pytest.raises(AgentError):
            agent.touch("new", 8)
        # Its chunks go back to the driver, which can no longer unplug them.
        agent.kill("c")
        assert agent.destroy(cz)["failed"] == 0
        assert qmp.device_size(vm, DEV) == plugged

        # The device comes back: it must not UNPLUG_ALL what the old one left.
        with vm.ssh() as s:
            s.check("echo 1 > /sys/bus/pci/rescan")
        assert qmp.device_size(vm, DEV) == plugged
        log = dmesg(vm)
        own = re.search(r"removed while CZones own (\d+) of its chunks", log)
        assert own and int(own[1]) * 2 * MiB == plugged, own
        assert "is held by another device, or by a removed one" in log
    ssh.close()
    assert vm.qmp("query-status")["status"] == "running"
    assert_dmesg_clean(vm)
