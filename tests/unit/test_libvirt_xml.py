"""The domain XML runs the machine the plain argv runs (czone/libvirt_xml.py)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path

import pytest

from czone.libvirt_xml import CZONE_NS, QEMU_NS, UnsupportedSpec, build_xml, device_id
from czone.netplan import staging_tap_name
from czone.qemu.cmdline import TapNic, VmSpec, build_argv
from tests.effective import comparable, from_argv, from_xml

SPEC = VmSpec(name="vm0", memory_mib=512, cpus=1, kernel=Path("/k/vmlinux"),
              rootfs=Path("/i/rootfs.squashfs"), fnbase=Path("/i/fnbase.squashfs"),
              qemu=Path("/q/qemu-system-x86_64"), accel="tcg", ssh_port=2222,
              run_dir=Path("/run/vm0"), firmware_dirs=(Path("/usr/share/qemu"),),
              extra_append="quiet")
SPECS = {
    "none": SPEC,
    "czone": replace(SPEC, memory_mode="czone", device_memory_mib=2560, requested_mib=256,
                     free_page_reporting=True, tb_size_mib=256),
    "virtio-mem": replace(SPEC, memory_mode="virtio-mem", device_memory_mib=1024,
                          requested_mib=128, block_mib=2, free_page_reporting=True),
    # a device larger than the default 4 GiB of hot-plug space
    "czone-large": replace(SPEC, memory_mode="czone", device_memory_mib=6144,
                           requested_mib=0),
    "balloon": replace(SPEC, memory_mode="balloon", memory_mib=1024, fnbase=None),
    "kvm-no-ssh": replace(SPEC, accel="kvm", cpus=2, ssh_port=None, max_memory_mib=8192,
                          memory_slots=4),
}


@pytest.mark.parametrize("case", SPECS)
def test_xml_runs_what_argv_runs(case: str) -> None:
    spec = SPECS[case]
    argv, xml = from_argv(build_argv(spec)), from_xml(build_xml(spec))
    assert comparable(xml) == comparable(argv)
    # and the comparison is not vacuous
    assert xml["kernel"] == "/k/vmlinux" and xml["memory_mib"] == spec.memory_mib
    assert xml["append"].endswith(" quiet") and xml["disks"][0] == ("/i/rootfs.squashfs", True)


def test_memory_devices_named_for_libvirt() -> None:
    czone = from_xml(build_xml(SPECS["czone"]))["memdevs"]["virtio-czone-pci"]
    assert czone == {"id": "czdev0", "size_mib": 2560, "requested_mib": 256, "block_mib": 2}
    vmem = from_xml(build_xml(SPECS["virtio-mem"]))["memdevs"]["virtio-mem-pci"]
    assert vmem["id"] == device_id("virtio-mem") == "ua-vmem0"


def test_czone_device_through_qemu_namespace_virtio_mem_native() -> None:
    dom = ET.fromstring(build_xml(SPECS["czone"]))
    args = [a.get("value") for a in dom.iter(f"{{{QEMU_NS}}}arg")]
    assert any(a and a.startswith("virtio-czone-pci,") for a in args)
    assert dom.find("devices/memory") is None
    dom = ET.fromstring(build_xml(SPECS["virtio-mem"]))
    assert dom.find("devices/memory").get("model") == "virtio-mem"  # type: ignore[union-attr]
    assert not any("virtio-mem" in (a.get("value") or "") for a in dom.iter(f"{{{QEMU_NS}}}arg"))


def test_emulator_name_and_metadata() -> None:
    dom = ET.fromstring(build_xml(SPECS["czone"], fn="echo", mode="mcpv"))
    assert dom.findtext("devices/emulator") == "/q/qemu-system-x86_64"
    assert dom.findtext("name") == "czone-vm0"
    meta = dom.find(f"metadata/{{{CZONE_NS}}}vm")
    assert meta is not None and meta.attrib == {"name": "vm0", "fn": "echo", "mode": "mcpv",
                                                 "memory-mode": "czone"}


def test_no_monitor_socket_of_ours() -> None:
    assert "qmp" not in build_xml(SPECS["czone"])


def test_bridged_nic_is_a_tap_libvirtd_opens_then_eth1() -> None:
    """The tap is ours (``managed='no'``), staged under a per-VM name in the
    host's namespace; on the root bus after the user-mode NIC; the kernel
    line configures eth1 as with plain QEMU."""
    spec = replace(SPEC, tap=TapNic("10.77.0.2/24", "52:54:00:77:00:02"))
    dom = ET.fromstring(build_xml(spec))
    [nic] = dom.findall("devices/interface")
    assert nic.get("type") == "ethernet"
    assert nic.find("mac").get("address") == "52:54:00:77:00:02"
    target = nic.find("target")
    assert target.get("managed") == "no" and target.get("dev") == staging_tap_name(spec.run_dir)
    assert len(target.get("dev")) <= 15
    assert nic.find("address").get("slot") == "0x12" and nic.find("address").get("bus") == "0x00"
    assert "ip=10.77.0.2:::255.255.255.0::eth1:off" in dom.findtext("os/cmdline")
    assert staging_tap_name("/r1/vms/a") != staging_tap_name("/r2/vms/a")


@pytest.mark.parametrize("change", [
    {"cpus": 2},  # TCG
    {"incoming": True},
    {"ram_file": Path("/t/ram")},
])
def test_unsupported_specs_refused(change: dict[str, object]) -> None:
    with pytest.raises(UnsupportedSpec):
        build_xml(replace(SPEC, **change))  # type: ignore[arg-type]
