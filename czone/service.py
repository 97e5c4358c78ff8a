"""The service layer: the only code that boots, reuses and stops VMs and
function containers.  The CLI, the demo, the benchmarks and the tests call it.

Durable state is the SQLite store (``czone.state``): a VM or container record
is written *before* the slow work it describes, with the pid of the
``czonectl`` process that owns that work.  A record whose owner died in the
middle is repaired by ``reconcile()`` against the real QEMU processes and the
guest agents' lists, which every command runs first.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import psutil

from czone import accel as accel_mod
from czone import (
    artifacts,
    bridge,
    endpoint,
    fleet,
    hostmem,
    libvirt_backend,
    libvirt_migrate,
    migrate,
    netplan,
    recovery,
    template,
)
from czone.errors import CZoneError
from czone.functions import FUNCTIONS, memory_for
from czone.guest.runtime import AgentError, AgentLost, RuntimeAgent
from czone.guest.ssh import SSHClient, SshError
from czone.libvirt_backend import LibvirtMachine
from czone.libvirt_xml import UnsupportedSpec, build_xml, check_spec, device_id
from czone.locking import LockTimeout, flock_within
from czone.net import check_port_free, free_port
from czone.placement import MCPV_MODES, Mode, NoFit, VmView, place, round_up
from czone.qemu import qmp
from czone.qemu.cmdline import (
    DEVICE_MEMFD,
    LINUX_MEMORY_BLOCK_MIB,
    MEMORY_DEVICE_ID,
    TapNic,
    VmSpec,
    build_argv,
    migration_destination,
    qmp_socket_path,
)
from czone.qemu.machine import Machine, kill_strays, tail
from czone.state import (
    CtrRecord,
    HostRecord,
    StateDB,
    VmRecord,
    ctr_insert,
    ctrs_in,
    host_of,
    pid_matches,
    process_start,
    status,
    vm_insert,
    vms_in,
)
from czone.template import guest_id
from czone.vmboot import BOOT_TIMEOUT, boot_machine
from czone.vmspec import load_spec, save_spec, spec_for

RUN_MODES: tuple[Mode, ...] = ("mcpv", "mcpv-virtio-mem", "mcpv-balloon", "scpv-template",
                               "scpv-snapshot")
RESIZE_TIMEOUT = 120.0
RESIZE_POLL = 0.02
# ZONE_MOVABLE beyond the container's cap in an SCPV VM: page cache and the
# agent share the zone, and a chunk needs a whole free 2 MiB pageblock.
SCPV_MOVABLE_SLACK_MIB = 64
# An MCPV VM: boot memory for the guest OS and agent, and the CZone device's
# maximum, which bounds how far placement may grow it.
VM_BOOT_MIB = 512
# 2560 MiB: twenty containers of 128 MiB.  The guest writes a struct page for
# every 4 KiB of the device (16 MiB per GiB) when it adds the region.
MCPV_DEVICE_MIB = 2560
BLOCK_MIB = 2
WAIT_VM_TIMEOUT = 300.0
CONNECT_TIMEOUT = 120.0
TEMPLATE_LOCK_TIMEOUT = 600.0
MIGRATE_TIMEOUT = 600.0
# After the hand-over: the guest's SSH through the destination's forward.
MIGRATE_SSH_TIMEOUT = 120.0
DEVICE = MEMORY_DEVICE_ID["czone"]
LIBVIRT_MIGRATES_TO = "a libvirt VM migrates to another host: --to HOST"
PLAIN_MIGRATES_HERE = ("--to HOST is for libvirt VMs (this one migrates into a new QEMU "
                       "process on this host)")

Progress = Callable[[str], None]


class ServiceError(CZoneError):
    pass


@dataclass
class RunResult:
    id: str
    vm: str
    fn: str
    czone: int
    startup_s: float
    booted: bool
    guest: dict[str, Any] = field(default_factory=dict)
    warmup: dict[str, Any] = field(default_factory=dict)


@dataclass
class MigrateResult:
    vm: str
    src_pid: int
    dst_pid: int
    ssh_port: int | None
    run_dir: str
    total_s: float
    # QEMU's own account of the migration (the source's query-migrate).
    total_time_ms: int | None
    downtime_ms: int | None
    ram: dict[str, Any]
    # The device memory's RSS (its memfd) from the host's view: the source
    # before and after (paused, before it quits), the destination after.
    src_device_rss: int | None
    src_device_rss_after: int | None
    dst_device_rss: int | None
    # A libvirt VM's endpoints (None under plain QEMU).
    src_uri: str | None = None
    dst_uri: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class KillResult:
    id: str
    vm: str
    returned_bytes: int | None
    guest: dict[str, Any] = field(default_factory=dict)


def _lock(f: Any, timeout: float, what: str) -> None:
    """flock(LOCK_EX) with a deadline: another czonectl may be building."""
    try:
        flock_within(f, timeout, poll=0.2)
    except LockTimeout as e:
        raise ServiceError(f"{what} {e}") from None


def _new_id(prefix: str) -> str:
    return f"{prefix[:24].replace('_', '-').rstrip('-')}-{secrets.token_hex(3)}"


class Service:
    def __init__(self, db: StateDB | None = None, qemu: str | os.PathLike | None = None,
                 progress: Progress | None = None, cpus: int = 1,
                 tb_size_mib: int | None = None, templates: Path | None = None,
                 kernel: artifacts.Kernel | None = None, netns: str | None = None,
                 backend: str = "qemu", uri: str | None = None, host: str | None = None):
        """``netns``: the network namespace of bridged VMs (default
        $CZONE_NETNS, else ``czone-net``); tests pass a name of their own.
        ``backend``: how this Service boots VMs, "qemu" (a QEMU process of
        ours) or "libvirt": a domain at ``uri``, or on registered ``host``,
        or else on the host of the fleet with the most headroom (czone/fleet.py;
        qemu:///system if no host is registered).  Each record keeps its
        own, and later commands follow the record."""
        if backend not in libvirt_backend.BACKENDS:
            raise ServiceError(f"unknown backend {backend!r} (use "
                               f"{' or '.join(libvirt_backend.BACKENDS)})")
        if (uri is not None or host is not None) and backend != "libvirt":
            raise ServiceError("--connect and --host are for --backend libvirt")
        if uri is not None and host is not None:
            raise ServiceError("--connect and --host both say where; give one")
        self.backend = backend
        self.db = db or StateDB()
        # pinned: one endpoint (None: the fleet's choice, per VM booted)
        self._pinned = self.db.host(host) if host is not None else \
            HostRecord(uri, uri, 0.0) if uri is not None else None
        self._kernel_override = kernel
        self._netns = netns
        # keyed by build and VM shape, so run roots may share them
        self.templates = templates or self.db.root / "templates"
        self._qemu_override = qemu
        self.progress: Progress = progress or (lambda _msg: None)
        self.cpus = cpus
        self.tb_size_mib = tb_size_mib
        self._agents: dict[str, tuple[SSHClient, RuntimeAgent]] = {}
        self._accel: tuple[str, str] | None = None

    # -- artifacts ---------------------------------------------------------

    @functools.cached_property
    def builds(self) -> tuple[artifacts.Kernel, artifacts.Image, Path]:
        """Resolved once per Service, so that a rebuild meanwhile cannot mix builds."""
        return (self._kernel_override or artifacts.kernel(), artifacts.image(),
                artifacts.qemu_binary(self._qemu_override))

    def accel(self, probe: bool = True) -> tuple[str, str]:
        if self._accel is not None:
            return self._accel
        kernel, image, qemu = self.builds
        if not probe:
            return accel_mod.cached_or_tcg(kernel.release, kernel.vmlinux, qemu, self.db.root)
        if accel_mod.will_probe(kernel.release, kernel.vmlinux, qemu, self.db.root):
            self.progress(f"probing KVM with a test boot (up to {accel_mod.PROBE_TIMEOUT:.0f}s)")
        self._accel = accel_mod.detect(kernel.release, kernel.vmlinux, image.rootfs, qemu,
                                       tuple(artifacts.firmware_dirs()), self.db.root)
        return self._accel

    # -- networks ------------------------------------------------------------

    @property
    def netns(self) -> str:
        return netplan.netns_name(self._netns)

    def _namespace(self, name: str | None = None) -> bridge.Namespace:
        return bridge.Namespace(name or self.netns, self.db.root)

    def _bridge_assign(self, vms: list[VmRecord]) -> dict[str, Any]:
        """The record's network values for a new bridged VM: the lowest address
        no record in our namespace holds (dead ones too, until `vm down`)."""
        nic = netplan.allocate(v.net_addr for v in vms
                               if v.net == "bridge" and v.netns == self.netns and v.net_addr)
        return {"net": "bridge", "netns": self.netns, "net_addr": nic.address,
                "tap": netplan.tap_name(nic.address)}

    def _open_tap(self, spec: VmSpec) -> VmSpec:
        """The namespace and bridge made if need be, the VM's tap created on it:
        ``spec`` with the tap's descriptor, which the caller closes."""
        assert spec.tap is not None
        ns = self._namespace()
        with ns.locked():
            ns.ensure()
            fd = ns.open_tap(spec.tap)
        return replace(spec, tap=replace(spec.tap, fd=fd))

    def _stage_tap(self, spec: VmSpec) -> None:
        """A libvirt VM's tap, made in the host's namespace for libvirtd to
        open (with the namespace and bridge it will move to)."""
        assert spec.tap is not None
        ns = self._namespace()
        with ns.locked():
            ns.ensure()
        bridge.stage_tap(netplan.staging_tap_name(spec.run_dir))

    def _adopt_tap(self, spec: VmSpec) -> None:
        assert spec.tap is not None
        ns = self._namespace()
        with ns.locked():
            ns.ensure()
            ns.adopt_tap(netplan.staging_tap_name(spec.run_dir), netplan.tap_name(spec.tap.address))

    def _delete_tap(self, netns: str | None, tap: str | None) -> None:
        """Before the record goes: its address, and so its tap's name, is
        still reserved, so the tap is that VM's and no other's."""
        if netns and tap:
            ns = self._namespace(netns)
            with ns.locked():
                ns.delete_tap(tap)

    def _drop_netns_if_unused(self, netns: str | None) -> bool:
        """Remove namespace ``netns`` (and its bridge) if no record uses it."""
        if not netns:
            return False
        ns = self._namespace(netns)
        with ns.locked():
            if any(v.net == "bridge" and v.netns == netns for v in self.db.list()):
                return False
            return ns.remove()

    # -- VMs -----------------------------------------------------------------

    def vm_spec(self, name: str, memory_mib: int = VM_BOOT_MIB, cpus: int | None = None,
                ssh_port: int | None = None, probe: bool = True, net: str = "user",
                **extra: Any) -> VmSpec:
        """The spec of VM ``name`` on the current builds (ValueError if invalid).
        A bridged VM shows the address it would get now; ``vm_up`` allocates
        it for good when it reserves the name."""
        kernel, image, qemu = self.builds
        if netplan.check_net_mode(net) == "bridge" and "tap" not in extra:
            extra["tap"] = netplan.nic_at(self._bridge_assign(self.db.list())["net_addr"])
        accel, _ = self.accel(probe)
        if ssh_port is not None:
            check_port_free(ssh_port)
        extra.setdefault("tb_size_mib", self.tb_size_mib)
        return spec_for(name, self.db.vm_dir(name), kernel, image, qemu, accel,  # type: ignore[arg-type]
                        ssh_port or free_port(), memory_mib, cpus or self.cpus, **extra)

    def hosts(self) -> list[HostRecord]:
        """Where this Service may boot a libvirt VM (see ``__init__``)."""
        if self._pinned is not None:
            return [self._pinned]
        return self.db.hosts() or [HostRecord(libvirt_backend.DEFAULT_URI,
                                              libvirt_backend.DEFAULT_URI, 0.0)]

    def boot_uri(self, net: str = "user") -> str | None:
        """The libvirt URI a new VM boots at (None: a QEMU process of ours);
        a bridged one only on this machine, where the bridge is."""
        if self.backend != "libvirt":
            return None
        hosts = self.hosts()
        if net == "bridge" and self._pinned is None:
            hosts = [h for h in hosts if not endpoint.is_remote(h.uri)]
            if not hosts:
                raise ServiceError("--net bridge needs a host on this machine (the bridge is "
                                   "here); the fleet has none")
        try:
            return fleet.boot_host(self.db, hosts, self.progress).uri
        except CZoneError as e:
            raise ServiceError(str(e)) from None

    def host_add(self, name: str, uri: str) -> dict[str, Any]:
        """Register libvirt endpoint ``uri`` as host ``name``; it must answer."""
        info = libvirt_backend.node_info(uri)
        return {**self.db.add_host(name, uri).to_dict(), **info}

    def host_list(self) -> list[dict[str, Any]]:
        return [fleet.describe(self.db, h) for h in self.db.hosts()]

    def host_rm(self, name: str) -> HostRecord:
        return self.db.remove_host(name)

    def vm_up(self, spec: VmSpec, boot_timeout: float = BOOT_TIMEOUT,
              fn: str | None = None, mode: str | None = None) -> VmRecord:
        """Reserve ``spec.name``, boot it and wait for SSH (and the agent)."""
        self.db.ensure_free(spec.name)
        self.check_backend(spec)
        uri = self.boot_uri(spec.net)
        self.check_domain_free(spec, uri)
        self.check_net_at(spec.net, uri)
        if spec.tap is not None:
            bridge.preflight()
        self.reconcile_net()
        rec = self.db.reserve_launch(
            spec.name, assign=self._bridge_assign if spec.tap is not None else None,
            qmp_socket=self._qmp_socket(spec), ssh_port=spec.ssh_port,
            ssh_key=str(self.builds[1].ssh_key), run_dir=str(spec.run_dir), accel=spec.accel,
            memory_mib=spec.memory_mib, cpus=spec.cpus, fn=fn, mode=mode,
            memory_mode=spec.memory_mode, device_mib=spec.device_memory_mib,
            requested_mib=spec.requested_mib, backend=self.backend, uri=uri)
        if rec.net_addr is not None:
            spec = replace(spec, tap=netplan.nic_at(rec.net_addr))
        self._boot(spec, boot_timeout)
        return self.db.get(rec.name)

    def _qmp_socket(self, spec: VmSpec) -> str:
        """The record's QMP socket: none of ours for a domain (libvirt's monitor)."""
        return "" if self.backend == "libvirt" else str(qmp_socket_path(spec.run_dir))

    def check_backend(self, spec: VmSpec) -> None:
        """Before anything is reserved: the libvirt backend can run ``spec``
        (one line of error otherwise)."""
        if self.backend != "libvirt":
            return
        try:
            check_spec(spec)
        except UnsupportedSpec as e:
            raise ServiceError(str(e)) from None

    @staticmethod
    def check_net_at(net: str, uri: str | None) -> None:
        """The bridge is a namespace on this machine: a remote host's VM
        cannot be on it."""
        if net == "bridge" and endpoint.is_remote(uri):
            raise ServiceError(f"--net bridge is a bridge on this machine; {uri} is another "
                               "host (use --net user there)")

    @staticmethod
    def check_domain_free(spec: VmSpec, uri: str | None) -> None:
        """No domain at ``uri`` has ``spec``'s name: ours or not, it is refused."""
        if uri is None:
            return
        dom = libvirt_backend.lookup(uri, spec.name)
        if dom is not None:
            whose = ("ours, but no record here has it" if libvirt_backend.is_ours(dom)
                     else "not ours: no CZone metadata")
            raise ServiceError(f"a domain named {dom.name()} already exists at {uri} "
                               f"({whose}); refusing to touch it")

    def _new_machine(self, spec: VmSpec, rec: VmRecord) -> Machine:
        """The Machine that boots ``spec`` on its record's backend."""
        if rec.backend != "libvirt":
            return Machine(spec, ssh_key=self.builds[1].ssh_key)
        assert rec.uri is not None
        return LibvirtMachine(spec, rec.uri, self.builds[1].ssh_key, fn=rec.fn, mode=rec.mode,
                              on_started=(lambda: self._adopt_tap(spec)) if spec.tap else None)

    def _boot(self, spec: VmSpec, boot_timeout: float = BOOT_TIMEOUT,
              tpl: template.Template | None = None) -> None:
        """Boot the VM whose record this process reserved, and mark it up once
        SSH and the agent answer; on failure, stop QEMU and remove the record.

        The record stays ``starting`` (owned by this process) until then, so
        other processes wait for it, and a boot cut short is found by
        ``reconcile`` and its QEMU killed.
        """
        if tpl is not None:
            spec = template.clone_spec(spec, tpl)
        self.progress(f"{'cloning' if tpl else 'booting'} {spec.name} ({spec.accel}, "
                      f"{spec.memory_mib} MiB"
                      + (f", {spec.memory_mode} device up to {spec.device_memory_mib} MiB"
                         if spec.memory_mode != "none" else "") + ")")
        shutil.rmtree(spec.run_dir, ignore_errors=True)
        tap = spec.tap and netplan.tap_name(spec.tap.address)
        rec = self.db.get(spec.name)
        staged = tap and rec.backend == "libvirt"
        try:
            if staged:
                self._stage_tap(spec)
            elif spec.tap is not None:
                spec = self._open_tap(spec)
            try:
                machine, times = boot_machine(spec, self.builds[1].ssh_key, boot_timeout, tpl,
                                              machine=self._new_machine(spec, rec))
            finally:
                if spec.tap is not None and spec.tap.fd is not None:
                    os.close(spec.tap.fd)  # QEMU has its own copy, or failed
        except BaseException:
            with contextlib.suppress(CZoneError, OSError):
                self._delete_tap(self.netns if tap else None, tap)
            if staged:
                with contextlib.suppress(CZoneError, OSError):
                    bridge.unstage_tap(netplan.staging_tap_name(spec.run_dir))
            self.db.remove(spec.name)
            with contextlib.suppress(CZoneError, OSError):
                self._drop_netns_if_unused(self.netns if tap else None)
            logs = [f for f in ("serial.log", "qemu.log") if (spec.run_dir / f).exists()]
            if logs:
                self.progress(f"czonectl: the logs of the failed boot are kept in "
                              f"{spec.run_dir}/ ({', '.join(logs)})")
            raise
        # Let go of the launch monitor before the record says "up".
        machine.close()
        save_spec(spec)
        self.db.mark_up(spec.name, machine.pid, machine.proc_start)  # type: ignore[arg-type]
        self.progress(f"{spec.name} is up after {times['ssh_ready_s']:.1f}s")

    def machine(self, rec: VmRecord) -> Machine:
        if rec.backend == "libvirt":
            assert rec.uri is not None
            return LibvirtMachine.attach_domain(
                rec.uri, rec.name, Path(rec.run_dir), rec.pid, rec.proc_start, rec.ssh_port,
                Path(rec.ssh_key) if rec.ssh_key else None)
        return Machine.attach(Path(rec.run_dir), rec.pid, rec.proc_start, rec.ssh_port,
                              Path(rec.ssh_key) if rec.ssh_key else None)

    def vm_down(self, name: str, timeout: float = 10.0) -> str:
        """Stop VM ``name``, forget it and its containers; says what happened."""
        self.reconcile_net()
        rec = self.db.get(name)
        st = status(rec)
        if st == "starting":
            raise ServiceError(f"VM {name!r} is still starting (czonectl pid {rec.pid}); "
                               "wait for it or stop that process")
        if st == "unknown":
            raise ServiceError(f"VM {name!r} is at {rec.uri}, which does not answer; it may "
                               "still run, so its record stays: try again when it answers")
        self._drop_agent(name)
        if st == "running":
            machine = self.machine(rec)
            machine.shutdown(timeout)
            if machine.is_running():
                raise ServiceError(f"QEMU pid {rec.pid} of VM {name!r} did not exit")
            what = "stopped"
        else:
            what = "was dead; record removed" + self._remove_leftovers(rec)
        if rec.net == "bridge":
            self._delete_tap(rec.netns, rec.tap)
        with self.db.transaction() as conn:
            conn.execute("DELETE FROM containers WHERE vm=?", (name,))
            conn.execute("DELETE FROM vms WHERE name=?", (name,))
        shutil.rmtree(rec.run_dir, ignore_errors=True)
        if rec.net == "bridge" and self._drop_netns_if_unused(rec.netns):
            what += f"; network namespace {rec.netns} removed (no bridged VM left)"
        return what

    @staticmethod
    def _remove_leftovers(rec: VmRecord) -> str:
        """A dead VM's remains: a launch killed midway can leave QEMU running
        under a dead record; a libvirt domain destroyed behind our back is
        still defined."""
        if rec.backend == "libvirt" and rec.uri:
            what = libvirt_backend.remove_domain(rec.uri, rec.name)
            return f" (its domain {what})" if what != "no domain" else ""
        strays = kill_strays(Path(rec.run_dir))
        return f" (killed {strays} stray QEMU process(es))" if strays else ""

    def migration_plan(self, name: str) -> tuple[VmRecord, VmSpec, VmSpec]:
        """VM ``name``'s record, the spec its QEMU runs, and the spec of a
        destination to migrate it to: the same, with ``-incoming defer``, a
        run dir and an SSH port of its own (``vm migrate --dry-run``)."""
        rec = self.db.running(name)
        if rec.backend == "libvirt":
            raise ServiceError(f"VM {name!r} is a libvirt domain at {rec.uri}; "
                               f"{LIBVIRT_MIGRATES_TO}")
        spec = self._migrating_spec(rec)
        try:
            proc = psutil.Process(rec.pid)
            live, exe = proc.cmdline(), proc.exe()
        except psutil.Error as e:
            raise ServiceError(f"VM {name!r}: cannot read QEMU pid {rec.pid}: {e}") from None
        if live != build_argv(spec):
            raise ServiceError(f"VM {name!r}: QEMU pid {rec.pid} does not run the command "
                               f"line of {rec.run_dir}/spec.json; not migrating")
        # The destination must run the very build the source runs.
        if not spec.qemu.exists() or not os.path.samefile(exe, spec.qemu):
            raise ServiceError(f"VM {name!r}: its QEMU build {spec.qemu} is gone or was "
                               f"replaced since the VM started ({exe}); the destination "
                               "cannot run it")
        return rec, spec, migration_destination(spec, self._migration_dir(name), free_port())

    @staticmethod
    def _migrating_spec(rec: VmRecord) -> VmSpec:
        """The saved spec of a VM that may migrate (an MCPV or plain VM)."""
        if rec.mode not in (None, "mcpv"):
            raise ServiceError(f"VM {rec.name!r} is an SCPV VM ({rec.mode}); only MCPV and "
                               "plain VMs migrate")
        spec = load_spec(Path(rec.run_dir))
        if spec is None:
            raise ServiceError(f"VM {rec.name!r} was booted by a czonectl that kept no spec "
                               f"of it (no {rec.run_dir}/spec.json); it cannot migrate")
        return spec

    def _migration_dir(self, name: str) -> Path:
        return self.db.vm_dir(name).with_name(f"{name}.{secrets.token_hex(3)}")

    def libvirt_migration_plan(self, name: str, to_uri: str) -> tuple[VmRecord, VmSpec, VmSpec]:
        """A libvirt VM's record, its spec, and the spec of its domain at
        ``to_uri``: the same, with a run dir and an SSH port of its own (the
        source's forward and log files stay in use until the hand-over);
        ``build_xml`` of it is the destination's XML."""
        rec = self.db.running(name)
        if rec.backend != "libvirt":
            raise ServiceError(f"VM {name!r} runs under plain QEMU; {PLAIN_MIGRATES_HERE}")
        if to_uri == rec.uri:
            raise ServiceError(f"VM {name!r} already runs at {to_uri}")
        if rec.net == "bridge":
            raise ServiceError(f"VM {name!r} is on this machine's bridge (its tap is in "
                               f"network namespace {rec.netns}); a bridged VM does not "
                               "migrate")
        spec = self._migrating_spec(rec)
        return rec, spec, replace(spec, run_dir=self._migration_dir(name),
                                  ssh_port=None if spec.ssh_port is None else free_port())

    def libvirt_migration_xml(self, name: str, to_uri: str) -> str:
        """The domain XML a libvirt VM would have at ``to_uri`` (``vm migrate
        --to HOST --dry-run``): its spec's, with a run dir and SSH port of its
        own, the source domain's UUID and CZone records."""
        rec, _spec, dst_spec = self.libvirt_migration_plan(name, to_uri)
        return libvirt_migrate.destination_xml(
            self._domain(rec), build_xml(dst_spec, rec.fn, rec.mode, endpoint.is_remote(to_uri)))

    @staticmethod
    def _domain(rec: VmRecord) -> Any:
        """A libvirt VM's domain at its record's URI."""
        assert rec.uri is not None
        dom = libvirt_backend.lookup(rec.uri, rec.name)
        if dom is None:
            raise ServiceError(f"VM {rec.name!r} has no domain at {rec.uri}")
        return dom

    def vm_migrate(self, name: str, timeout: float = MIGRATE_TIMEOUT,
                   max_bandwidth: int = migrate.MAX_BANDWIDTH,
                   to_uri: str | None = None) -> MigrateResult:
        """Live-migrate VM ``name`` at up to ``max_bandwidth`` bytes/s: a plain
        QEMU VM into a new QEMU process on this host, a libvirt VM to the
        libvirt endpoint ``to_uri``.  Its record (pid, run dir, SSH port; QMP
        socket or URI) follows.  A migration that fails leaves the source
        running the guest and nothing at the destination."""
        self.reconcile()
        rec = self.db.running(name)
        if rec.backend == "libvirt":
            if to_uri is None:
                raise ServiceError(f"VM {name!r} is a libvirt domain at {rec.uri}; "
                                   f"{LIBVIRT_MIGRATES_TO}")
            rec, spec, dst_spec = self.libvirt_migration_plan(name, to_uri)
            libvirt_backend.connect(to_uri)  # an unreachable URI fails before anything
            extra = {"backend": "libvirt", "src_uri": rec.uri, "dst_uri": to_uri,
                     "uuid": self._domain(rec).UUIDString(), "dst_ssh_port": dst_spec.ssh_port}
        elif to_uri is not None:
            raise ServiceError(f"VM {name!r} runs under plain QEMU; {PLAIN_MIGRATES_HERE}")
        else:
            rec, spec, dst_spec = self.migration_plan(name)
            extra = {}
        marker = self.db.migration_marker(name)
        marker.parent.mkdir(parents=True, exist_ok=True)
        me = os.getpid()
        tmp = marker.with_suffix(f".{me}.tmp")
        tmp.write_text(json.dumps({"owner_pid": me, "owner_start": process_start(me),
                                   "src_run_dir": rec.run_dir,
                                   "dst_run_dir": str(dst_spec.run_dir), **extra}))
        try:
            # Complete and exclusive: one migration of a VM at a time
            # (reconcile has removed a dead owner's marker).
            os.link(tmp, marker)
        except FileExistsError:
            raise ServiceError(f"VM {name!r} is being migrated by another czonectl "
                               f"({marker})") from None
        finally:
            tmp.unlink()
        if to_uri is None:
            try:
                return self._migrate(name, rec, spec, dst_spec, timeout, max_bandwidth)
            finally:
                marker.unlink(missing_ok=True)
        # libvirt: an outcome not known (an interrupt, a job that outlived its
        # abort, a host that did not answer) keeps the marker, for reconcile.
        result = self._migrate_libvirt(name, rec, to_uri, timeout, max_bandwidth,
                                       spec=spec, dst_spec=dst_spec)
        marker.unlink(missing_ok=True)
        return result

    def _migrate_libvirt(self, name: str, rec: VmRecord, dst_uri: str, timeout: float,
                         max_bandwidth: int, *, spec: VmSpec | None = None,
                         dst_spec: VmSpec | None = None) -> MigrateResult:
        """libvirt's migration of VM ``name``'s domain to ``dst_uri``
        (czone/libvirt_migrate.py); then the record follows the domain."""
        if spec is None or dst_spec is None:
            rec, spec, dst_spec = self.libvirt_migration_plan(name, dst_uri)
        assert rec.uri is not None
        self.progress(f"migrating {name} from {rec.uri} to {dst_uri}")
        # Its SSH connection goes with the source's user network.
        self._drop_agent(name)
        src_rss = self._measure(self._device_rss, rec) if spec.memory_mode == "czone" else None
        dst_spec.run_dir.mkdir(parents=True, exist_ok=True)
        save_spec(dst_spec)  # before: a czonectl killed after the hand-over leaves it right
        t0 = time.monotonic()
        try:
            done = libvirt_migrate.migrate(
                name, rec.uri, dst_uri,
                build_xml(dst_spec, rec.fn, rec.mode, endpoint.is_remote(dst_uri)), timeout,
                max_bandwidth, str(spec.qemu), "kvm" if spec.accel == "kvm" else "qemu")
        except libvirt_migrate.MigrationUndecided as e:
            raise ServiceError(f"VM {name!r}: the migration's outcome is not known yet ({e}); "
                               "the next czonectl command settles it") from None
        except CZoneError as e:
            shutil.rmtree(dst_spec.run_dir, ignore_errors=True)
            self.db.migration_marker(name).unlink(missing_ok=True)
            raise ServiceError(f"VM {name!r} did not migrate and runs on at {rec.uri}: "
                               f"{e}") from None
        total = time.monotonic() - t0
        # The hand-over: the record follows the domain.
        self.db.set_vm(name, uri=dst_uri, run_dir=str(dst_spec.run_dir),
                       ssh_port=dst_spec.ssh_port)
        if endpoint.is_remote(dst_uri):
            dst_pid = 0  # no process of it here (czone/endpoint.py)
            self.db.set_vm(name, pid=0, proc_start=0.0)
        else:
            dst = self._migrated_qemu(name, done.uuid, dst_spec.run_dir)
            dst_pid = dst.pid
            self.db.set_vm(name, pid=dst.pid, proc_start=dst.create_time())
        self._wait_exit(rec)
        shutil.rmtree(rec.run_dir, ignore_errors=True)
        new = self.db.get(name)
        machine = self.machine(new)
        try:
            if new.ssh_port is not None and new.ssh_key:
                machine.wait_ssh(MIGRATE_SSH_TIMEOUT).close()
        finally:
            machine.close()
        dst_rss = self._measure(self._device_rss, new) if src_rss is not None else None
        self.progress(f"{name} migrated to {dst_uri} (QEMU pid {dst_pid}) in {total:.1f}s")
        # The source's QEMU has quit when libvirt returns: no "after" figure.
        return MigrateResult(name, rec.pid, dst_pid, dst_spec.ssh_port, str(dst_spec.run_dir),
                             total, done.total_time_ms, done.downtime_ms, done.ram, src_rss,
                             None, dst_rss, src_uri=rec.uri, dst_uri=dst_uri)

    @staticmethod
    def _migrated_qemu(name: str, uuid: str, run_dir: Path) -> psutil.Process:
        """The destination's QEMU process: the domain's UUID on its command
        line and its new run dir (the source's may not have quit yet)."""
        deadline = time.monotonic() + libvirt_backend.PID_TIMEOUT
        while True:
            procs = [p for p in libvirt_backend.qemu_processes(uuid)
                     if any(str(run_dir) in a for a in p.cmdline())]
            if len(procs) == 1:
                return procs[0]
            if time.monotonic() > deadline:
                raise ServiceError(f"VM {name!r} migrated, but {len(procs)} QEMU processes "
                                   f"of its domain run here with {run_dir}, expected one "
                                   "(a destination on another host?)")
            time.sleep(0.1)

    @staticmethod
    def _wait_exit(rec: VmRecord) -> None:
        """Until the source's QEMU is gone (libvirt stops it after the hand-over)."""
        with contextlib.suppress(psutil.Error):
            if pid_matches(rec.pid, rec.proc_start):
                psutil.Process(rec.pid).wait(libvirt_migrate.SOURCE_EXIT_TIMEOUT)

    def _migrate(self, name: str, rec: VmRecord, spec: VmSpec, dst_spec: VmSpec,
                 timeout: float, max_bandwidth: int) -> MigrateResult:
        self.progress(f"migrating {name} from QEMU pid {rec.pid} to a new QEMU in "
                      f"{dst_spec.run_dir}")
        # Its SSH connection goes with the source's user network.
        self._drop_agent(name)
        src = self.machine(rec)
        dst = Machine(dst_spec, ssh_key=Path(rec.ssh_key) if rec.ssh_key else None)
        src_rss = self._measure(self._device_rss, rec) if spec.memory_mode == "czone" else None
        t0 = time.monotonic()
        try:
            dst.launch()
            info = migrate.run(src, dst, migrate.start_incoming(dst), timeout, max_bandwidth)
            src_after = (hostmem.mapping_rss(rec.pid, DEVICE_MEMFD)
                         if src_rss is not None else None)
            save_spec(dst_spec)
        except BaseException as e:
            self._migration_failed(name, rec, src, dst, e)
            raise
        # The hand-over: the record follows the destination, then the source goes.
        assert dst.pid is not None and dst.proc_start is not None
        self.db.set_vm(name, pid=dst.pid, proc_start=dst.proc_start,
                       qmp_socket=str(qmp_socket_path(dst_spec.run_dir)),
                       run_dir=str(dst_spec.run_dir), ssh_port=dst_spec.ssh_port)
        total = time.monotonic() - t0
        src.shutdown(timeout=10.0)
        shutil.rmtree(rec.run_dir, ignore_errors=True)
        try:
            if dst_spec.ssh_port is not None and rec.ssh_key:
                dst.wait_ssh(MIGRATE_SSH_TIMEOUT).close()
        finally:
            dst.close()
        new = self.db.get(name)
        dst_rss = self._measure(self._device_rss, new) if src_rss is not None else None
        self.progress(f"{name} migrated to QEMU pid {dst.pid} in {total:.1f}s")
        return MigrateResult(name, rec.pid, dst.pid, dst_spec.ssh_port, str(dst_spec.run_dir),
                             total, info.get("total-time"), info.get("downtime"),
                             info.get("ram", {}), src_rss,
                             src_after, dst_rss)

    @staticmethod
    def _device_rss(pid: int) -> int:
        return hostmem.stable_mapping_rss(pid, DEVICE_MEMFD)

    def _migration_failed(self, name: str, rec: VmRecord, src: Machine, dst: Machine,
                          err: BaseException) -> None:
        """Kill the destination, make sure the source runs on; raise what the
        user needs to know if the error was ours (others propagate as they are)."""
        dst.kill()
        said = [line for line in tail(dst.qemu_log, 5).splitlines() if line.strip()]
        why = f"{err}" + (f"; the destination said: {said[-1].strip()}" if said else "")
        shutil.rmtree(dst.run_dir, ignore_errors=True)
        try:
            migrate.rescue_source(src)
        except CZoneError as e:
            raise ServiceError(f"VM {name!r}: the migration failed ({why}) and the source, "
                               f"QEMU pid {rec.pid}, did not resume: {e}") from None
        finally:
            src.close()
        if isinstance(err, CZoneError):
            raise ServiceError(f"VM {name!r} did not migrate and runs on in QEMU pid "
                               f"{rec.pid}: {why}") from None

    # -- the agent in a VM ---------------------------------------------------

    def agent(self, vm: str) -> RuntimeAgent:
        """This process's connection to ``vm``'s agent (opened once, reused)."""
        if vm in self._agents:
            return self._agents[vm][1]
        rec = self.db.running(vm)
        if rec.ssh_port is None or rec.ssh_key is None:
            raise ServiceError(f"VM {vm!r} has no SSH forward")
        ssh = endpoint.guest_ssh(rec.uri if rec.backend == "libvirt" else None, rec.ssh_port,
                                 Path(rec.ssh_key))
        # dropbear drops handshakes beyond a few at once from one address
        # (all of ours come through QEMU's user network): back off and retry.
        deadline = time.monotonic() + CONNECT_TIMEOUT
        while True:
            try:
                ssh.connect(timeout=30.0)
                agent = RuntimeAgent(ssh)
                agent.hello()
                break
            except (SshError, AgentLost) as e:
                ssh.close()
                if time.monotonic() > deadline or status(self.db.get(vm)) != "running":
                    raise ServiceError(f"VM {vm!r}: cannot reach the agent: {e}") from None
                time.sleep(random.uniform(0.1, 1.0))
            except BaseException:
                ssh.close()
                raise
        self._agents[vm] = (ssh, agent)
        return agent

    def _drop_agent(self, vm: str) -> None:
        ssh_agent = self._agents.pop(vm, None)
        if ssh_agent:
            ssh_agent[1].close()
            ssh_agent[0].close()

    def ask(self, vm: str, op: Callable[[RuntimeAgent], Any], retry: bool = True) -> Any:
        """``op`` on ``vm``'s agent; a dropped connection is reopened once."""
        try:
            return op(self.agent(vm))
        except (AgentLost, SshError) as e:
            self._drop_agent(vm)
            if not retry or status(self.db.get(vm)) != "running":
                raise ServiceError(f"VM {vm!r}: {e}") from None
        try:
            return op(self.agent(vm))
        except (AgentLost, SshError) as e:
            self._drop_agent(vm)
            raise ServiceError(f"VM {vm!r}: agent unreachable after a retry: {e}") from None

    def close(self) -> None:
        for vm in list(self._agents):
            self._drop_agent(vm)

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- containers ----------------------------------------------------------

    def run(self, fn: str, mode: Mode = "mcpv", memory_mib: int | None = None,
            payload: Any = None, net: str = "user",
            args: list[str] | None = None) -> RunResult:
        """Start a container of ``fn``; its startup latency runs from this call
        to the first answer of a warm-up invocation.  ``net="bridge"`` puts it
        in a bridged VM of its function (booting one if there is none).
        ``args`` replaces the container's command (which must end up serving
        ``fn``; not with scpv-snapshot, whose container is already running)."""
        t0 = time.monotonic()
        if fn not in FUNCTIONS:
            raise ServiceError(f"unknown function {fn!r} (known: {', '.join(FUNCTIONS)})")
        if mode not in RUN_MODES:
            raise ServiceError(f"mode {mode!r} is not available (use one of "
                               f"{', '.join(RUN_MODES)})")
        if netplan.check_net_mode(net) == "bridge":
            if mode not in MCPV_MODES:
                raise ServiceError(f"--net bridge is for MCPV VMs, not {mode}: every clone of "
                                   "a template would wake up with the template's address")
            bridge.preflight()
        if self.backend == "libvirt" and mode not in MCPV_MODES:
            raise ServiceError(f"{mode} VMs are cloned from templates, which the libvirt "
                               "backend does not do yet; use an MCPV mode")
        if args and mode == "scpv-snapshot":
            raise ServiceError("an scpv-snapshot container runs its snapshot's command")
        memory_mib = memory_mib or memory_for(fn)
        self.accel()  # a first-time KVM probe must not run under the store's lock
        self.reconcile()
        uri = self.boot_uri(net)  # only a new VM needs it; a host that fails fails here
        self.check_net_at(net, uri)
        ctr_id, vm, boot_spec = self._place(fn, mode, memory_mib, net, uri)
        booted = boot_spec is not None
        gid = guest_id(mode, ctr_id)
        try:
            if mode in MCPV_MODES:
                if boot_spec is not None:
                    self._boot(boot_spec)
                else:
                    self._wait_up(vm)
                self._apply_requested(vm)
            elif boot_spec is None:
                raise ServiceError(f"placement put an SCPV container into VM {vm!r}")
            else:
                tpl = self.template(boot_spec, fn, memory_mib, warm=mode == "scpv-snapshot")
                self._boot(boot_spec, tpl=tpl)
            if mode == "scpv-snapshot":
                guest = {"czone": self.ask(vm, lambda a: a.list())[0]["czone"]}
            else:
                guest = self.ask(vm, lambda a: a.start(gid, fn, memory_mib, args,
                                                       czone=mode == "mcpv"), retry=False)
            warm = self.ask(vm, lambda a: a.invoke(gid, payload))
        except BaseException:
            self._forget_failed(ctr_id, vm, mode, gid)
            raise
        startup = time.monotonic() - t0
        self.db.set_ctr(ctr_id, state="running", czone=guest["czone"], startup_s=startup)
        self._sync_records(vm)
        if not warm.get("ok"):
            self.progress(f"warning: the warm-up invocation of {ctr_id} failed: "
                          f"{warm.get('error')}")
        return RunResult(ctr_id, vm, fn, guest["czone"], startup, booted, guest, warm)

    def _place(self, fn: str, mode: Mode, memory_mib: int, net: str = "user",
               uri: str | None = None) -> tuple[str, str, VmSpec | None]:
        """Decide and record, atomically: the container's record, and the new
        VM's record or the grown VM's requested size."""
        me = os.getpid()
        spec = None
        # Asking libvirt (maybe another machine) must not hold the store's lock.
        seen = {v.name: status(v) for v in self.db.list()}
        with self.db.transaction() as conn:
            fleet_uris = [r[0] for r in conn.execute("SELECT uri FROM hosts")]
            if uri is not None and self._pinned is None and fleet_uris and \
                    uri not in fleet_uris:  # a `host rm` since boot_uri() chose it
                raise ServiceError(f"the fleet changed meanwhile ({uri} is no host of it); "
                                   "try again")
            vms, ctrs = vms_in(conn), ctrs_in(conn)
            views = [VmView(v.name, v.fn, v.mode, v.requested_mib, v.device_mib,  # type: ignore[arg-type]
                            sum(c.memory_mib for c in ctrs if c.vm == v.name
                                and c.state != "lost"),
                            seen.get(v.name, "starting") not in ("dead", "unknown"), v.net)
                     for v in vms if v.fn]
            max_mib = MCPV_DEVICE_MIB if mode in MCPV_MODES else \
                round_up(memory_mib, LINUX_MEMORY_BLOCK_MIB)
            try:
                d = place(fn, memory_mib, mode, views, max_mib, BLOCK_MIB, net)
            except NoFit as e:
                raise ServiceError(str(e)) from None
            if d.action == "boot":
                name = _new_id(f"{mode}-{fn}")
                nets = self._bridge_assign(vms) if net == "bridge" else {}
                tap = netplan.nic_at(nets["net_addr"]) if nets else None
                spec = self.vm_spec_for(name, mode, max_mib, d.requested_mib, tap)
                rec = VmRecord(name=name, state="starting", pid=me, proc_start=process_start(me),
                               qmp_socket=self._qmp_socket(spec),
                               ssh_port=spec.ssh_port, ssh_key=str(self.builds[1].ssh_key),
                               run_dir=str(spec.run_dir), accel=spec.accel,
                               memory_mib=spec.memory_mib, cpus=spec.cpus, created=time.time(),
                               fn=fn, mode=mode, memory_mode=spec.memory_mode,
                               device_mib=max_mib, requested_mib=d.requested_mib,
                               backend="libvirt" if uri else "qemu", uri=uri, **nets)
                vm_insert(conn, rec)
            else:
                name = d.vm or ""
                conn.execute("UPDATE vms SET requested_mib=? WHERE name=?",
                             (d.requested_mib, name))
            ctr_id = _new_id(fn)
            ctr_insert(conn, CtrRecord(ctr_id, name, fn, memory_mib, "starting", me,
                                       process_start(me), None, None, time.time()))
        return ctr_id, name, spec

    def vm_spec_for(self, name: str, mode: str, max_mib: int, requested_mib: int,
                    tap: TapNic | None = None) -> VmSpec:
        """MCPV: boot memory plus the CZone device, which placement grows (the
        baselines: a virtio-mem device, or all the memory behind a balloon).
        SCPV: one container's memory as ZONE_MOVABLE boot memory, the layout
        its templates were built with (a template is a migration stream of a
        VM without the device).  All report free pages to the host (a
        balloon that never inflates), the fastest way any of them has to
        give free boot memory back."""
        if mode in ("mcpv", "mcpv-virtio-mem"):
            return self.vm_spec(name, memory_mode="czone" if mode == "mcpv" else "virtio-mem",
                                device_memory_mib=max_mib, requested_mib=requested_mib,
                                free_page_reporting=True, tap=tap)
        if mode == "mcpv-balloon":
            # all the memory at boot, the balloon holds back what is not requested
            return self.vm_spec(name, memory_mib=VM_BOOT_MIB + max_mib, memory_mode="balloon",
                                tap=tap)
        movable = max_mib + SCPV_MOVABLE_SLACK_MIB
        return self.vm_spec(name, memory_mib=VM_BOOT_MIB + movable,
                            extra_append=f"movablecore={movable}M", free_page_reporting=True)

    def template(self, spec: VmSpec, fn: str, memory_mib: int, warm: bool) -> template.Template:
        """The template for VMs shaped like ``spec``, built once (under a lock)."""
        key = template.template_key(spec, fn, memory_mib, warm)
        tpl = template.Template(self.templates / key, warm)
        if tpl.ready():
            return tpl
        tpl.dir.parent.mkdir(parents=True, exist_ok=True)
        with open(tpl.dir.parent / f"{key}.lock", "w") as lock:
            _lock(lock, TEMPLATE_LOCK_TIMEOUT, f"the template lock of {fn}")
            if not tpl.ready():
                self.progress(f"building the {'snapshot' if warm else 'template'} of {fn} "
                              f"(once per build and VM shape)")
                name = f"tpl-{key}"
                tspec = replace(spec, name=name, run_dir=self.templates.parent / "tpl-run" / key,
                                ssh_port=free_port())
                # A build cut short (czonectl killed) left its QEMU behind.
                kill_strays(tspec.run_dir)
                tspec = template.template_spec(tspec, tpl)
                try:
                    machine, _ = boot_machine(tspec, self.builds[1].ssh_key, BOOT_TIMEOUT)
                    with machine:
                        template.save(machine, tpl, fn, memory_mib)
                finally:
                    shutil.rmtree(tspec.run_dir, ignore_errors=True)
        return tpl

    def _wait_up(self, vm: str, timeout: float = WAIT_VM_TIMEOUT) -> None:
        """Wait for a VM that another process is booting (its record is the
        only thing two czonectl processes share, so this polls it)."""
        deadline = time.monotonic() + timeout
        said = False
        while (st := status(self.db.get(vm))) == "starting":
            if time.monotonic() > deadline:
                raise ServiceError(f"VM {vm!r} still booting after {timeout:.0f}s")
            if not said:
                self.progress(f"waiting for {vm}, which another czonectl is booting")
                said = True
            time.sleep(0.2)
        if st == "dead":
            raise ServiceError(f"VM {vm!r} died while another czonectl was booting it")

    def _apply_requested(self, vm: str, wait: bool = True) -> bool:
        """Set the VM's memory device to the record's requested size, under the
        store's lock: concurrent growers can never lower it.  The CZone device
        plugs on demand; virtio-mem and the balloon (the MCPV baselines) are
        waited for, outside the lock, as an operator would.  False if the
        device did not get there in time."""
        with self.db.transaction() as conn:
            recs = [v for v in vms_in(conn) if v.name == vm]
            if not recs:
                raise ServiceError(f"VM {vm!r} is gone")
            rec = recs[0]
            machine = self.machine(rec)
            try:
                want = self._set_requested(machine, rec)
            finally:
                machine.close()
        if want is None or not wait:
            return True
        machine = self.machine(rec)
        try:
            # QEMU sends the size and balloon events at most once a second:
            # poll, or every baseline start would wait for the next event
            if rec.memory_mode == "balloon":
                qmp.wait_balloon(machine, want, RESIZE_TIMEOUT, poll=RESIZE_POLL)
            else:
                qmp.wait_size(machine, self._device(rec), want, RESIZE_TIMEOUT,
                              poll=RESIZE_POLL)
        except qmp.QmpTimeout:
            self.progress(f"warning: {vm} did not reach {want >> 20} MiB in "
                          f"{RESIZE_TIMEOUT:.0f}s")
            return False
        finally:
            machine.close()
        return True

    @staticmethod
    def _set_requested(machine: Machine, rec: VmRecord) -> int | None:
        """Ask the device for the record's size; the bytes to wait for, if any."""
        want = rec.requested_mib << 20
        if rec.memory_mode == "balloon":
            want += VM_BOOT_MIB << 20
        if isinstance(machine, LibvirtMachine) and rec.memory_mode in ("virtio-mem", "balloon"):
            machine.resize(rec.memory_mode, want)
            return want
        if rec.memory_mode == "balloon":
            qmp.balloon_target(machine, want)
            return want
        dev = Service._device(rec)
        if qmp.requested_size(machine, dev) != want:
            qmp.set_requested_size(machine, dev, want)
        return None if rec.memory_mode == "czone" else want

    @staticmethod
    def _device(rec: VmRecord) -> str:
        """The QOM id of the VM's memory device (libvirt names its own)."""
        if rec.backend == "libvirt":
            return device_id(rec.memory_mode)
        return MEMORY_DEVICE_ID[rec.memory_mode]

    def _forget_failed(self, ctr_id: str, vm: str, mode: str, gid: str) -> None:
        """A run that failed or was interrupted after the record was written:
        whatever the guest may still hold of the container is killed (a failed
        start already left nothing; a failed warm-up did not), an SCPV VM goes
        with its one container, and the record goes.  Best effort: the
        original error is what the user sees."""
        with contextlib.suppress(CZoneError, OSError):
            rec = self.db.get(vm) if vm in {v.name for v in self.db.list()} else None
            if mode not in MCPV_MODES and rec is not None:
                if status(rec) == "starting":  # ours: its template never came up
                    kill_strays(Path(rec.run_dir))
                    self.db.remove(vm)
                else:
                    self.vm_down(vm, timeout=5)
            elif rec is not None and status(rec) == "running":
                self.ask(vm, lambda a: self.kill_in_guest(a, gid), retry=False)
        self.db.remove_ctr(ctr_id)

    def _owned(self, ctr_id: str) -> CtrRecord:
        rec = self.db.ctr(ctr_id)
        if rec.state == "lost":
            raise ServiceError(f"container {ctr_id!r} is lost (its VM {rec.vm!r} died); "
                               f"`czonectl kill {ctr_id}` removes the record")
        if rec.state != "running":
            raise ServiceError(f"container {ctr_id!r} is {rec.state}")
        return rec

    def invoke(self, ctr_id: str, payload: Any = None,
               timeout: float | None = None) -> tuple[dict[str, Any], float]:
        """The function's answer, and the host-side latency in seconds."""
        self.reconcile()
        rec = self._owned(ctr_id)
        t0 = time.monotonic()
        gid = guest_id(self.db.get(rec.vm).mode or "mcpv", ctr_id)
        reply = self.ask(rec.vm, lambda a: a.invoke(gid, payload, timeout))
        return reply, time.monotonic() - t0

    def kill(self, ctr_id: str) -> KillResult:
        """Stop the container and destroy its CZone; SCPV stops its VM; the
        MCPV baselines shrink their VM by the container (virtio-mem's
        requested size, or the balloon).  The bytes returned are the drop of
        the QEMU process's RSS (of the device's memory where there is one)."""
        self.reconcile()
        rec = self.db.ctr(ctr_id)
        if rec.state in ("starting", "stopping") and rec.owner_alive():
            raise ServiceError(f"container {ctr_id!r} is {rec.state} (czonectl pid "
                               f"{rec.owner_pid}); try again when that is done")
        vm = self.db.get(rec.vm) if rec.vm in {v.name for v in self.db.list()} else None
        if vm is not None and vm.mode not in MCPV_MODES:
            # SCPV: the VM is the container's; it goes, lost or not.
            before = self._measure(hostmem.stable_rss, vm)
            if status(vm) != "starting":
                self.vm_down(vm.name)
            self.db.remove_ctr(ctr_id)
            return KillResult(ctr_id, vm.name, before)
        if vm is not None and status(vm) == "unknown":
            raise ServiceError(f"container {ctr_id!r} is in VM {vm.name!r} at {vm.uri}, which "
                               "does not answer; try again when it answers")
        if rec.state == "lost" or vm is None or status(vm) != "running":
            self.db.remove_ctr(ctr_id)
            return KillResult(ctr_id, rec.vm, None)
        me = os.getpid()
        self.db.set_ctr(ctr_id, state="stopping", owner_pid=me, owner_start=process_start(me))
        # The guest memory the host backs, without TCG's code cache and
        # QEMU's own allocations, which move for reasons of their own.
        def device(pid: int) -> int:
            if vm.memory_mode == "balloon":   # guest RAM itself: no device memory
                return hostmem.stable_rss(pid)
            if vm.backend == "libvirt" and vm.memory_mode == "virtio-mem":
                raise ServiceError("libvirt backs virtio-mem with anonymous RAM, which the "
                                   "host cannot tell from the rest")
            return hostmem.stable_mapping_rss(pid, DEVICE_MEMFD)

        before = self._measure(device, vm)
        guest = self.ask(vm.name, lambda a: self.kill_in_guest(a, ctr_id))
        self.db.remove_ctr(ctr_id)
        self._sync_records(vm.name)
        if vm.mode != "mcpv":
            self._shrink(vm.name)
        after = self._measure(device, vm)
        returned = None if before is None or after is None else max(0, before - after)
        return KillResult(ctr_id, vm.name, returned, guest)

    def _sync_records(self, vm: str) -> None:
        """A libvirt VM's domain carries its CZone records (the store stays
        the source of truth for czonectl; the domain tells anyone who asks
        libvirt).  Best effort: the operation has happened."""
        rec = self.db.get(vm)
        if rec.backend != "libvirt" or rec.uri is None:
            return
        ctrs = [{"id": c.id, "fn": c.fn, "czone": c.czone, "memory_mib": c.memory_mib,
                 "state": c.state} for c in self.db.ctrs() if c.vm == vm]
        try:
            libvirt_backend.set_records(rec.uri, vm, rec.fn, rec.mode, rec.memory_mode, ctrs)
        except CZoneError as e:
            self.progress(f"warning: the domain of {vm} does not list its containers: {e}")

    def _shrink(self, vm: str) -> None:
        """An MCPV baseline after a kill: the requested size falls to what the
        remaining containers may use, in whole blocks."""
        with self.db.transaction() as conn:
            placed = sum(c.memory_mib for c in ctrs_in(conn)
                         if c.vm == vm and c.state != "lost")
            conn.execute("UPDATE vms SET requested_mib=? WHERE name=?",
                         (round_up(placed, BLOCK_MIB), vm))
        self._apply_requested(vm)

    def _measure(self, read: Callable[[int], int], vm: VmRecord) -> int | None:
        """A host-side measurement that must not fail the operation around it.
        On a remote host (czone/endpoint.py) no process of the VM is here:
        QEMU's whole RSS as libvirt reports it stands in."""
        if vm.backend == "libvirt" and endpoint.is_remote(vm.uri):
            assert vm.uri is not None
            return libvirt_backend.domain_rss(vm.uri, vm.name)
        try:
            return read(vm.pid)
        except (CZoneError, OSError) as e:
            self.progress(f"warning: cannot measure the memory of {vm.name}: {e}")
            return None

    @staticmethod
    def kill_in_guest(agent: RuntimeAgent, ctr_id: str) -> dict[str, Any]:
        try:
            return agent.kill(ctr_id)
        except AgentError as e:
            if e.errno_name == "ENOENT":  # already gone (a retried kill)
                return {}
            raise

    def ps(self) -> list[dict[str, Any]]:
        """The containers, each with the host its VM runs on."""
        self.reconcile()
        hosts, vms = self.db.hosts(), {v.name: v for v in self.db.list()}
        return [{**r.to_dict(), "host": host_of(vms[r.vm], hosts) if r.vm in vms else None}
                for r in self.db.ctrs()]

    def running_vms(self, mode: str | None = "mcpv") -> Iterator[VmRecord]:
        for v in self.db.list():
            if v.fn and status(v) == "running" and (mode is None or v.mode == mode):
                yield v

    def vm_reclaim(self, name: str, czone: int = 0, idle_for: float = 0.0,
                   timeout: float = 60.0) -> dict[str, int]:
        """Host-initiated reclaim in VM ``name``, through its czone-virtio
        device and no SSH: CZone ``czone``, or with 0 every CZone that handed
        out no page for ``idle_for`` seconds.  Returns the guest's report
        (``seq``, ``czones``, ``bytes``) and the host's ``rss_drop_bytes``."""
        rec = self.db.running(name)
        if rec.memory_mode != "czone":
            raise ServiceError(f"VM {name!r} has no virtio-czone device "
                               f"(memory mode {rec.memory_mode})")
        machine = self.machine(rec)
        try:
            before = self._measure(self._device_rss, rec)
            res = qmp.reclaim(machine, DEVICE, timeout, czone, round(idle_for * 1000))
            after = self._measure(self._device_rss, rec)
        finally:
            machine.close()
        return {**res, "rss_drop_bytes": None if before is None or after is None
                else before - after}

    def reclaim(self, idle_for: float = 0.0) -> dict[str, dict[str, Any]]:
        """Idle reclaim in every MCPV VM: the free memory of CZones that handed
        out no page for ``idle_for`` seconds goes back to the host.  A VM that
        fails says why under ``error``; the others are reclaimed all the same."""
        self.reconcile()
        out: dict[str, dict[str, Any]] = {}
        for vm in self.running_vms():
            try:
                out[vm.name] = self.vm_reclaim(vm.name, idle_for=idle_for)
            except CZoneError as e:
                out[vm.name] = {"error": str(e)}
        return out

    def stats(self) -> dict[str, Any]:
        """Per VM: host RSS and PSS, the device's plugged size, and the agent's
        per-container counters."""
        self.reconcile()
        out = {}
        hosts = self.db.hosts()
        for vm in self.running_vms(mode=None):
            machine = self.machine(vm)
            try:
                if vm.memory_mode in ("czone", "virtio-mem"):
                    plugged = qmp.device_size(machine, self._device(vm))
                elif vm.memory_mode == "balloon":
                    plugged = qmp.balloon_actual(machine)
                else:
                    plugged = None
            finally:
                machine.close()
            out[vm.name] = {"fn": vm.fn, "mode": vm.mode, "pid": vm.pid,
                            "host": host_of(vm, hosts),
                            "rss_bytes": self._measure(hostmem.rss_bytes, vm),
                            "pss_bytes": None if endpoint.is_remote(vm.uri)
                            else hostmem.pss_bytes(vm.pid),
                            "plugged_bytes": plugged, "requested_mib": vm.requested_mib,
                            "containers": self.ask(vm.name, lambda a: a.stats())}
        return out

    # -- recovery ------------------------------------------------------------

    def reconcile(self) -> list[str]:
        """Repair what a czonectl that died midway left behind (czone/recovery.py)."""
        return recovery.reconcile(self)

    def reconcile_net(self) -> list[str]:
        """Only the network part of ``reconcile`` (for the ``vm`` commands, which
        touch no container): taps of dead VMs, namespaces nobody uses."""
        done = recovery.reconcile_net(self)
        for line in done:
            self.progress(f"reconcile: {line}")
        return done
