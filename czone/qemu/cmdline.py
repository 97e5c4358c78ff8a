"""Pure translation of a VM description into a QEMU command line.

Nothing here touches the file system, the environment or a process: the
same ``VmSpec`` always gives the same argv, which is what ``--dry-run``
prints and what the unit tests pin down.  Devices are small functions that
return argument lists so later memory modes (virtio-mem, balloon, the czone
device) can be composed in without touching the others.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

Accel = Literal["kvm", "tcg"]
# How the VM's memory grows and shrinks.  All three use the same QEMU binary
# and guest kernel config, so benchmarks compare like with like.
MemoryMode = Literal["none", "czone", "virtio-mem", "balloon"]
MEMORY_MODES: tuple[MemoryMode, ...] = ("none", "czone", "virtio-mem", "balloon")
# How the guest is networked.  "user": QEMU's user-mode network only (SSH
# forwarded on 127.0.0.1).  "bridge": that, plus a second NIC on a tap that
# czonectl opens in its network namespace (czone/bridge.py) and hands QEMU as
# a file descriptor.
NetMode = Literal["user", "bridge"]
NET_MODES: tuple[NetMode, ...] = ("user", "bridge")
# What --dry-run shows in place of the tap's descriptor, which exists only
# once czonectl has opened the tap for a launch.
TAP_FD_PLACEHOLDER = "TAPFD"
MAC_RE = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
# QOM ids of the memory devices, as found under /machine/peripheral/.
MEMORY_DEVICE_ID = {"czone": "czdev0", "virtio-mem": "vmem0", "balloon": "balloon0"}
# How the device memory's memfd shows in /proc/PID/smaps (QEMU names it so).
DEVICE_MEMFD = "memfd:memory-backend-memfd"

# Printed by the guest's init once sshd is listening.
# x86-64 Linux hot-adds memory in memory blocks of this size (guests below 64 GiB).
LINUX_MEMORY_BLOCK_MIB = 128
READY_MARKER = "czone-init: ready"
# Printed by the kernel when it hands over to init (the accelerator probe's marker).
INIT_MARKER = "Run /sbin/czone-init"

BASE_APPEND = ("console=ttyS0 root=/dev/vda ro rootfstype=squashfs init=/sbin/czone-init "
               "memhp_default_state=online_movable panic=-1")


@dataclass(frozen=True)
class TapNic:
    """The guest's NIC on the bridge: its static address (CIDR), its MAC and
    the tap's descriptor that QEMU inherits (None until a launch opens it)."""

    address: str
    mac: str
    fd: int | None = None

    def __post_init__(self) -> None:
        iface = ipaddress.ip_interface(self.address)  # ValueError if malformed
        if iface.version != 4 or iface.network.prefixlen == 32:
            raise ValueError(f"a bridged NIC needs an IPv4 address with a prefix, "
                             f"not {self.address!r}")
        if not MAC_RE.fullmatch(self.mac):
            raise ValueError(f"not a MAC address: {self.mac!r}")

    @property
    def ip(self) -> str:
        return self.address.partition("/")[0]

    @property
    def netmask(self) -> str:
        bits = int(self.address.partition("/")[2] or 32)
        mask = (0xFFFFFFFF << (32 - bits)) & 0xFFFFFFFF
        return ".".join(str(mask >> s & 0xFF) for s in (24, 16, 8, 0))


@dataclass(frozen=True)
class VmSpec:
    name: str
    memory_mib: int
    cpus: int
    kernel: Path
    rootfs: Path
    qemu: Path
    accel: Accel
    ssh_port: int | None
    run_dir: Path
    extra_append: str = ""
    extra_args: tuple[str, ...] = ()
    machine: str = "q35"
    # Address space reserved for later hot-plug; None = memory + 4 GiB.
    max_memory_mib: int | None = None
    memory_slots: int = 8
    firmware_dirs: tuple[Path, ...] = ()
    memory_mode: MemoryMode = "none"
    # Hot-pluggable memory behind the czone or virtio-mem device.
    device_memory_mib: int = 0
    requested_mib: int = 0
    block_mib: int = 2
    # The function base image (second disk, /dev/vdb), if the VM runs functions.
    fnbase: Path | None = None
    # Boot RAM in a file (templates): shared, so a template writes it through,
    # or private, so a clone maps it copy-on-write.
    ram_file: Path | None = None
    ram_shared: bool = True
    # Start paused, waiting for `migrate-incoming` (a template's clone).
    incoming: bool = False
    # Free page reporting (virtio-balloon, never inflated): the guest hands its
    # free boot memory back to the host, whatever the memory mode.
    free_page_reporting: bool = False
    # TCG's translation cache in MiB (None: QEMU's default); each QEMU process
    # holds its own, which KVM does not have, so benchmarks set it explicitly.
    tb_size_mib: int | None = None
    # The bridged NIC (net mode "bridge"), or None (user-mode networking only).
    tap: TapNic | None = None

    @property
    def net(self) -> NetMode:
        return "bridge" if self.tap is not None else "user"

    def __post_init__(self) -> None:
        if self.memory_mib <= 0 or self.cpus <= 0:
            raise ValueError("memory_mib and cpus must be positive")
        if self.accel not in ("kvm", "tcg"):
            raise ValueError(f"unknown accelerator {self.accel!r}")
        if self.max_memory_mib is not None and self.max_memory_mib < self.memory_mib:
            raise ValueError("max_memory_mib must be >= memory_mib")
        if self.memory_mode not in MEMORY_MODES:
            raise ValueError(f"unknown memory mode {self.memory_mode!r}")
        if self.memory_mode in ("czone", "virtio-mem"):
            if self.device_memory_mib <= 0 or self.device_memory_mib % self.block_mib:
                raise ValueError("device_memory_mib must be a positive multiple of block_mib")
            if not 0 <= self.requested_mib <= self.device_memory_mib \
                    or self.requested_mib % self.block_mib:
                raise ValueError("requested_mib must be a multiple of block_mib "
                                 "within device_memory_mib")
        if self.memory_mode == "czone" and self.device_memory_mib % LINUX_MEMORY_BLOCK_MIB:
            raise ValueError(f"device_memory_mib must be a multiple of {LINUX_MEMORY_BLOCK_MIB}: "
                             "the guest adds memory in blocks of that size")


def qmp_socket_path(run_dir: Path) -> Path:
    return run_dir / "qmp.sock"


def qmp_launch_socket_path(run_dir: Path) -> Path:
    return run_dir / "qmp-launch.sock"


def migration_socket_path(run_dir: Path) -> Path:
    """Where a migration destination listens (``migrate-incoming``)."""
    return run_dir / "migrate.sock"


def migration_destination(spec: VmSpec, run_dir: Path, ssh_port: int | None) -> VmSpec:
    """The destination of a live migration of ``spec``: the same VM, started
    with ``-incoming defer``, with a run dir (sockets, logs) and an SSH
    forward of its own, since the source holds both until it hands over."""
    return replace(spec, run_dir=run_dir, ssh_port=ssh_port, incoming=True)


def serial_log_path(run_dir: Path) -> Path:
    return run_dir / "serial.log"


def qemu_log_path(run_dir: Path) -> Path:
    return run_dir / "qemu.log"


def stats_log_path(run_dir: Path) -> Path:
    return run_dir / "czone-stats.log"


def opt_escape(value: str | Path) -> str:
    """Escape a value for QEMU's ``key=value,...`` option syntax."""
    return str(value).replace(",", ",,")


def bridge_ifname(spec: VmSpec) -> str:
    """The guest's name of the bridged NIC: PCI order follows the argv, and the
    user-mode NIC (if any) comes first."""
    return "eth1" if spec.ssh_port is not None else "eth0"


def ip_config(spec: VmSpec) -> str:
    """The kernel's static IP configuration of the bridged NIC (no gateway:
    the default route stays on the user-mode network)."""
    if spec.tap is None:
        return ""
    tap = spec.tap
    return f"ip={tap.ip}:::{tap.netmask}::{bridge_ifname(spec)}:off"


def kernel_append(spec: VmSpec) -> str:
    return " ".join(w for w in (BASE_APPEND, ip_config(spec), spec.extra_append.strip()) if w)


def machine_args(spec: VmSpec) -> list[str]:
    cpu = "host" if spec.accel == "kvm" else "max"
    accel = spec.accel
    if spec.accel == "tcg" and spec.tb_size_mib is not None:
        accel += f",tb-size={spec.tb_size_mib}"
    if spec.accel == "tcg" and spec.cpus > 1:
        # QEMU 7.2's multi-threaded TCG can run a stale translation after
        # another vCPU patched kernel text (an int3 oops in sched_clock_cpu
        # at boot, 2 boots of 30): one thread runs all vCPUs round-robin.
        accel += ",thread=single"
    args = ["-M", spec.machine, "-accel", accel, "-cpu", cpu, "-smp", str(spec.cpus)]
    if spec.machine == "q35":
        # A wakeup from S3 is a reset, and with -no-reboot QEMU exits and every
        # container is gone; no sleep state is offered until the stack survives one.
        args += ["-global", "ICH9-LPC.disable_s3=1", "-global", "ICH9-LPC.disable_s4=1"]
    return args


def memory_args(spec: VmSpec) -> list[str]:
    maxmem = spec.max_memory_mib or spec.memory_mib + max(4096, spec.device_memory_mib)
    args = ["-m", f"{spec.memory_mib}M,slots={spec.memory_slots},maxmem={maxmem}M"]
    if spec.ram_file is not None:
        share = "on" if spec.ram_shared else "off"
        args += ["-object", f"memory-backend-file,id=ram0,size={spec.memory_mib}M,"
                            f"mem-path={opt_escape(spec.ram_file)},share={share}",
                 "-machine", "memory-backend=ram0"]
    return args


def incoming_args(spec: VmSpec) -> list[str]:
    return ["-incoming", "defer"] if spec.incoming else []


def memory_device_args(spec: VmSpec) -> list[str]:
    mode = spec.memory_mode
    fpr = (["-device", "virtio-balloon-pci,id=fpr0,free-page-reporting=on"]
           if spec.free_page_reporting and mode != "balloon" else [])
    if mode == "none":
        return fpr
    dev_id = MEMORY_DEVICE_ID[mode]
    if mode == "balloon":
        return ["-device", f"virtio-balloon-pci,id={dev_id},free-page-reporting=on"]
    device = "virtio-czone-pci" if mode == "czone" else "virtio-mem-pci"
    args = ["-object", f"memory-backend-memfd,id=mem-{dev_id},size={spec.device_memory_mib}M",
            "-device", f"{device},id={dev_id},memdev=mem-{dev_id},"
                       f"block-size={spec.block_mib}M,requested-size={spec.requested_mib}M"]
    if mode == "czone":
        # The stats snapshot carries no time; QEMU's log trace backend stamps each
        # arrival with the wall clock, so `vm mem` can say how old the stats are.
        args += ["-msg", "timestamp=on", "-trace", "enable=virtio_czone_stats",
                 "-D", str(stats_log_path(spec.run_dir))]
    return args + fpr


def firmware_args(spec: VmSpec) -> list[str]:
    return [a for d in spec.firmware_dirs for a in ("-L", str(d))]


def kernel_args(spec: VmSpec) -> list[str]:
    return ["-kernel", str(spec.kernel), "-append", kernel_append(spec)]


def drive_args(drive_id: str, path: Path) -> list[str]:
    return ["-drive", f"file={opt_escape(path)},if=none,id={drive_id},format=raw,readonly=on",
            "-device", f"virtio-blk-pci,drive={drive_id}"]


def rootfs_args(spec: VmSpec) -> list[str]:
    # Order matters: the guest finds the root on vda and the base image on vdb.
    args = drive_args("root", spec.rootfs)
    if spec.fnbase is not None:
        args += drive_args("fnbase", spec.fnbase)
    return args


def net_args(spec: VmSpec) -> list[str]:
    # romfile= drops the PXE option ROM: we boot with -kernel and need no iPXE.
    args = []
    if spec.ssh_port is not None:
        args += ["-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{spec.ssh_port}-:22",
                 "-device", "virtio-net-pci,netdev=n0,romfile="]
    if spec.tap is not None:
        fd = TAP_FD_PLACEHOLDER if spec.tap.fd is None else spec.tap.fd
        args += ["-netdev", f"tap,id=n1,fd={fd}",
                 "-device", f"virtio-net-pci,netdev=n1,mac={spec.tap.mac},romfile="]
    return args


def console_args(spec: VmSpec) -> list[str]:
    return ["-display", "none",
            "-chardev", f"file,id=serial0,path={opt_escape(serial_log_path(spec.run_dir))}",
            "-serial", "chardev:serial0"]


def qmp_args(spec: VmSpec) -> list[str]:
    """Two monitors: qmp1 connects to the launcher, which listens before QEMU starts
    (as QEMU's own machine.py does); qmp0 serves later czonectl processes."""
    sock = opt_escape(qmp_socket_path(spec.run_dir))
    launch = opt_escape(qmp_launch_socket_path(spec.run_dir))
    return ["-chardev", f"socket,id=qmp0,path={sock},server=on,wait=off",
            "-mon", "chardev=qmp0,mode=control",
            "-chardev", f"socket,id=qmp1,path={launch},server=off",
            "-mon", "chardev=qmp1,mode=control"]


def build_argv(spec: VmSpec) -> list[str]:
    return [
        str(spec.qemu),
        "-name", f"czone-{spec.name}",
        "-nodefaults", "-no-user-config", "-no-reboot",
        *firmware_args(spec),
        *machine_args(spec),
        *memory_args(spec),
        *memory_device_args(spec),
        *kernel_args(spec),
        *rootfs_args(spec),
        *net_args(spec),
        *console_args(spec),
        *qmp_args(spec),
        *incoming_args(spec),
        *spec.extra_args,
    ]
