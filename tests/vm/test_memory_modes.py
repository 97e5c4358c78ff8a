"""The three memory modes boot on the same QEMU and kernel, and the baselines shrink."""

from __future__ import annotations

import pytest

from czone.qemu import qmp

pytestmark = pytest.mark.vm
MiB = 1 << 20


def test_virtio_mem_plugs_and_unplugs(microvm_factory) -> None:
    vm = microvm_factory.boot("vmem", memory_mode="virtio-mem", device_memory_mib=512,
                              requested_mib=256)
    assert qmp.wait_size(vm, "vmem0", 256 * MiB, timeout=120) == 256 * MiB
    with vm.ssh() as ssh:
        total_kib = int(ssh.check("awk '/MemTotal/ {print $2}' /proc/meminfo").stdout)
    assert total_kib > 512 * 1024
    qmp.set_requested_size(vm, "vmem0", 0)
    assert qmp.wait_size(vm, "vmem0", 0, timeout=120) == 0


def test_balloon_inflates(microvm_factory) -> None:
    vm = microvm_factory.boot("balloon", memory_mib=768, memory_mode="balloon")
    assert qmp.balloon_actual(vm) == 768 * MiB
    qmp.balloon_target(vm, 512 * MiB)
    assert qmp.wait_balloon(vm, 512 * MiB, timeout=120) == 512 * MiB


def test_czone_device_is_a_memory_device(microvm_factory) -> None:
    vm = microvm_factory.boot("czdev", memory_mode="czone", device_memory_mib=256)
    devices = vm.qmp("query-memory-devices")
    assert [d["type"] for d in devices] == ["virtio-czone"]
    assert devices[0]["data"]["max-size"] == 256 * MiB
    qmp.set_requested_size(vm, "czdev0", 64 * MiB)
    assert vm.qmp("query-memory-devices")[0]["data"]["requested-size"] == 64 * MiB
    # The driver plugs on demand: with no CZone, nothing is plugged.
    assert qmp.device_size(vm, "czdev0") == 0
    assert qmp.czone_stats(vm) == []
