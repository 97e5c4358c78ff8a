"""Pure translation of a ``VmSpec`` into a libvirt domain XML.

The libvirt twin of ``czone/qemu/cmdline.py``: the same spec gives the same
machine, once as QEMU's argv and once as a domain that libvirtd turns into
argv of its own.  Whatever libvirt has an element for is said with it
(memory and slots, vCPUs, direct kernel boot, disks, the serial console,
virtio-mem, the balloon); the rest goes through ``<qemu:commandline>``:
the virtio-czone device, the user-mode network with its SSH forward (slirp
has no port forwards in libvirt 9.0) and the firmware directories.  QMP is
libvirt's own monitor: there is no socket of ours.

A domain for a *remote* host (``czone/endpoint.py``) keeps nothing in our
run dir, which is on this machine: its serial console is a pty that
czonectl streams through libvirt, logged by libvirt in its own log
directory, and the device's statistics trace is left out.

Nothing here touches a file, the environment or a process.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from typing import Any

from czone.netplan import staging_tap_name
from czone.qemu.cmdline import (
    MEMORY_DEVICE_ID,
    VmSpec,
    firmware_args,
    kernel_append,
    serial_log_path,
    stats_log_path,
)

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
# Our metadata namespace (a URI names it; nothing is fetched from it).
CZONE_NS = "https://czone.invalid/xmlns/libvirt/vm/1"
ET.register_namespace("qemu", QEMU_NS)
ET.register_namespace("czone", CZONE_NS)
# libvirt accepts user aliases only with this prefix; QEMU's id is the alias.
USER_ALIAS = "ua-"
# Our devices sit on the root bus at fixed slots: QEMU would otherwise give
# them the first free one before libvirt's own devices claim it (slot 1 is
# libvirt's root ports), and the domain would not start.
PCI_SLOT = {"net": 0x10, "czone": 0x11, "bridge": 0x12}


class UnsupportedSpec(ValueError):
    """A spec the libvirt backend cannot express (yet)."""


def domain_name(vm: str) -> str:
    """The domain of VM ``vm``: the name its plain QEMU process has (``-name``)."""
    return f"czone-{vm}"


def device_id(memory_mode: str) -> str:
    """The QOM id of the memory device under libvirt: libvirt's own devices
    carry user aliases (``ua-``); the czone device is ours, via the command line."""
    dev = MEMORY_DEVICE_ID[memory_mode]
    return dev if memory_mode in ("czone", "balloon") else USER_ALIAS + dev


def remote_serial_log(vm: str) -> str:
    """Where a remote host's libvirtd logs VM ``vm``'s console (its log dir)."""
    return f"/var/log/libvirt/qemu/{domain_name(vm)}.serial.log"


def check_spec(spec: VmSpec) -> None:
    """Raise UnsupportedSpec for what this slice of the backend does not do."""
    if spec.ram_file is not None or spec.incoming:
        raise UnsupportedSpec("templates and incoming migrations are plain-QEMU only")
    if spec.accel == "tcg" and spec.cpus > 1:
        # cmdline.machine_args runs several TCG vCPUs in one thread (a QEMU 7.2
        # bug); libvirt writes -accel itself and has no element for thread=.
        raise UnsupportedSpec("--backend libvirt under TCG runs one vCPU (libvirt cannot ask "
                              "for single-threaded TCG)")
    if spec.machine != "q35":
        raise UnsupportedSpec(f"machine {spec.machine!r}: the libvirt backend builds q35")


def _sub(parent: ET.Element, tag: str, text: str | int | None = None,
         **attrs: str) -> ET.Element:
    el = ET.SubElement(parent, tag, {k.rstrip("_"): v for k, v in attrs.items()})
    if text is not None:
        el.text = str(text)
    return el


def max_memory_mib(spec: VmSpec) -> int:
    """The hot-plug address space, as ``cmdline.memory_args`` reserves it."""
    return spec.max_memory_mib or spec.memory_mib + max(4096, spec.device_memory_mib)


def _memory(dom: ET.Element, spec: VmSpec) -> None:
    _sub(dom, "maxMemory", max_memory_mib(spec), slots=str(spec.memory_slots), unit="MiB")
    # libvirt adds the memory devices' sizes to <memory> itself.
    _sub(dom, "memory", spec.memory_mib, unit="MiB")
    _sub(dom, "currentMemory", spec.memory_mib, unit="MiB")
    _sub(dom, "vcpu", spec.cpus, placement="static")


def _os(dom: ET.Element, spec: VmSpec) -> None:
    os_el = _sub(dom, "os")
    _sub(os_el, "type", "hvm", arch="x86_64", machine=spec.machine)
    _sub(os_el, "kernel", str(spec.kernel))
    _sub(os_el, "cmdline", kernel_append(spec))


def _features(dom: ET.Element, spec: VmSpec) -> None:
    feats = _sub(dom, "features")
    _sub(feats, "acpi")
    if spec.accel == "tcg" and spec.tb_size_mib is not None:
        _sub(_sub(feats, "tcg"), "tb-cache", spec.tb_size_mib, unit="MiB")
    cpu = _sub(dom, "cpu", mode="host-passthrough" if spec.accel == "kvm" else "maximum")
    # Memory hot-plug needs a NUMA node in libvirt; one node, as QEMU has anyway.
    numa = _sub(cpu, "numa")
    _sub(numa, "cell", id="0", cpus=f"0-{spec.cpus - 1}", memory=str(spec.memory_mib),
         unit="MiB")
    # No wakeup from S3/S4 (a reset, which ends the VM): see cmdline.machine_args.
    pm = _sub(dom, "pm")
    _sub(pm, "suspend-to-mem", enabled="no")
    _sub(pm, "suspend-to-disk", enabled="no")
    # -no-reboot: a guest panic (panic=-1) or reboot ends the VM.
    for event in ("on_poweroff", "on_reboot", "on_crash"):
        _sub(dom, event, "destroy")


def _disk(devices: ET.Element, path: str, dev: str) -> None:
    disk = _sub(devices, "disk", type="file", device="disk")
    _sub(disk, "driver", name="qemu", type="raw")
    _sub(disk, "source", file=path)
    _sub(disk, "target", dev=dev, bus="virtio")
    _sub(disk, "readonly")


def _devices(dom: ET.Element, spec: VmSpec, remote: bool) -> None:
    devices = _sub(dom, "devices")
    _sub(devices, "emulator", str(spec.qemu))
    # Order matters: the guest finds the root on vda and the base image on vdb.
    _disk(devices, str(spec.rootfs), "vda")
    if spec.fnbase is not None:
        _disk(devices, str(spec.fnbase), "vdb")
    _sub(devices, "controller", type="usb", model="none")
    if remote:
        serial = _sub(devices, "serial", type="pty")
        _sub(serial, "log", file=remote_serial_log(spec.name), append="off")
    else:
        serial = _sub(devices, "serial", type="file")
        _sub(serial, "source", path=str(serial_log_path(spec.run_dir)))
    _sub(serial, "target", port="0")
    if spec.tap is not None:
        _bridge_nic(devices, spec)
    if spec.memory_mode == "virtio-mem":
        mem = _sub(devices, "memory", model="virtio-mem")
        target = _sub(mem, "target")
        _sub(target, "size", spec.device_memory_mib, unit="MiB")
        _sub(target, "node", 0)
        _sub(target, "block", spec.block_mib * 1024, unit="KiB")
        _sub(target, "requested", spec.requested_mib, unit="MiB")
        _sub(mem, "alias", name=device_id("virtio-mem"))
    if spec.memory_mode == "balloon" or spec.free_page_reporting:
        balloon = _sub(devices, "memballoon", model="virtio", freePageReporting="on")
        if spec.memory_mode == "balloon":
            _sub(balloon, "alias", name=device_id("balloon"))
    else:
        _sub(devices, "memballoon", model="none")


def _bridge_nic(devices: ET.Element, spec: VmSpec) -> None:
    """The bridged NIC: a tap libvirtd opens by name in its namespace
    (``managed='no'``: czonectl made it, and moves it onto the bridge once
    QEMU holds it).  On the root bus after the user-mode NIC, so that the
    guest sees it as eth1, as with plain QEMU."""
    assert spec.tap is not None
    nic = _sub(devices, "interface", type="ethernet")
    _sub(nic, "mac", address=spec.tap.mac)
    _sub(nic, "target", dev=staging_tap_name(spec.run_dir), managed="no")
    _sub(nic, "model", type="virtio")
    _sub(nic, "rom", enabled="no")
    _sub(nic, "address", type="pci", domain="0x0000", bus="0x00",
         slot=f"{PCI_SLOT['bridge']:#04x}", function="0x0")


def _pcie0(what: str) -> str:
    return f"bus=pcie.0,addr={PCI_SLOT[what]:#x}"


def qemu_args(spec: VmSpec, remote: bool = False) -> list[str]:
    """What goes through ``<qemu:commandline>``: what libvirt has no element for."""
    args = firmware_args(spec)
    if spec.ssh_port is not None:
        args += ["-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{spec.ssh_port}-:22",
                 "-device", "virtio-net-pci,netdev=n0,romfile=," + _pcie0("net")]
    if spec.memory_mode == "czone":
        dev = MEMORY_DEVICE_ID["czone"]
        args += ["-object", f"memory-backend-memfd,id=mem-{dev},size={spec.device_memory_mib}M",
                 "-device", f"virtio-czone-pci,id={dev},memdev=mem-{dev},"
                            f"block-size={spec.block_mib}M,requested-size={spec.requested_mib}M,"
                            + _pcie0("czone")]
        if not remote:
            args += ["-trace", "enable=virtio_czone_stats",
                     "-D", str(stats_log_path(spec.run_dir))]
    return args + list(spec.extra_args)


def metadata(name: str, fn: str | None, mode: str | None, memory_mode: str,
             containers: list[dict[str, Any]] | None = None) -> ET.Element:
    """Our element in ``<metadata>``: whose domain this is (VM ``name``), its
    function, mode and CZone records, so that libvirt alone can say what runs
    where."""
    el = ET.Element(f"{{{CZONE_NS}}}vm", {"name": name})
    for key, value in (("fn", fn), ("mode", mode), ("memory-mode", memory_mode)):
        if value is not None:
            el.set(key, value)
    recs = ET.SubElement(el, f"{{{CZONE_NS}}}containers")
    recs.text = json.dumps(containers or [], sort_keys=True)
    return el


def build_xml(spec: VmSpec, fn: str | None = None, mode: str | None = None,
              remote: bool = False) -> str:
    """The domain of ``spec`` (UnsupportedSpec if this backend cannot run it),
    for a host that is not this machine if ``remote``."""
    check_spec(spec)
    dom = ET.Element("domain", {"type": "kvm" if spec.accel == "kvm" else "qemu"})
    _sub(dom, "name", domain_name(spec.name))
    _sub(dom, "metadata").append(metadata(spec.name, fn, mode, spec.memory_mode))
    _memory(dom, spec)
    _os(dom, spec)
    _features(dom, spec)
    _devices(dom, spec, remote)
    cmd = ET.SubElement(dom, f"{{{QEMU_NS}}}commandline")
    for arg in qemu_args(spec, remote):
        ET.SubElement(cmd, f"{{{QEMU_NS}}}arg", {"value": arg})
    ET.indent(dom)
    return ET.tostring(dom, encoding="unicode")
