"""Layered fixtures for tests that boot real VMs (after Firecracker's test suite).

``artifacts`` (session) -> ``microvm_factory`` (function; owns and kills every
VM it made, saves their logs when the test failed) -> ``booted_vm``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from czone import accel as accel_mod
from czone import artifacts as art
from czone.guest.ssh import SSHClient
from czone.net import free_port
from czone.qemu.cmdline import Accel, VmSpec, build_argv, qemu_log_path, serial_log_path
from czone.qemu.machine import Machine
from czone.state import StateDB, run_root
from czone.vmboot import boot_machine
from czone.vmspec import spec_for

if TYPE_CHECKING:
    from tests.vm.libvirtd import PrivateLibvirtd

REPO = Path(__file__).resolve().parents[2]
BOOT_TIMEOUT = float(os.environ.get("CZONE_TEST_BOOT_TIMEOUT", "60"))
TEST_APPEND = os.environ.get("CZONE_TEST_APPEND", "").strip()


@dataclass(frozen=True)
class Artifacts:
    kernel: art.Kernel
    image: art.Image
    qemu: Path
    accel: Accel
    accel_reason: str


@pytest.fixture(scope="session")
def artifacts() -> Artifacts:
    try:
        kernel, image, qemu = art.kernel(), art.image(), art.qemu_binary()
    except art.ArtifactMissing as e:
        # `make test` builds the artifacts first, so a missing one is a failure.
        pytest.fail(str(e), pytrace=False)
    accel, why = accel_mod.detect(kernel.release, kernel.vmlinux, image.rootfs, qemu,
                                  tuple(art.firmware_dirs()), run_root())
    print(f"\nczone vm tests: accelerator {accel} ({why})")
    return Artifacts(kernel, image, qemu, accel, why)


class MicrovmFactory:
    """Owns every VM a test makes: kills them all at the end, and keeps their
    evidence (argv, serial and QEMU logs, dmesg) when the test failed."""

    def __init__(self, artifacts: Artifacts):
        self.artifacts = artifacts
        self.specs: list[VmSpec] = []
        self.machines: list[Machine] = []

    def spec(self, name: str = "vm", memory_mib: int = 512, cpus: int = 1,
             ssh: bool = True, **extra: object) -> VmSpec:
        # Short run dirs under /tmp: the QMP socket path must fit AF_UNIX's 108 bytes.
        run_dir = Path(tempfile.mkdtemp(prefix=f"czone-{name}-"))
        a = self.artifacts
        # `make test-meminit`: every VM of the run boots with these options too
        if TEST_APPEND:
            extra["extra_append"] = f"{extra.get('extra_append', '')} {TEST_APPEND}".strip()
        spec = spec_for(name, run_dir, a.kernel, a.image, a.qemu, a.accel,
                        free_port() if ssh else None, memory_mib, cpus, **extra)
        self.specs.append(spec)
        return spec

    def build(self, name: str = "vm", **kw: object) -> Machine:
        """A VM not launched yet, for tests of the launch itself."""
        machine = Machine(self.spec(name, **kw), ssh_key=self.artifacts.image.ssh_key)
        self.machines.append(machine)
        return machine

    def boot(self, name: str = "vm", **kw: object) -> Machine:
        """A VM booted by the service layer's one boot sequence."""
        machine, _ = boot_machine(self.spec(name, **kw), self.artifacts.image.ssh_key,
                                  BOOT_TIMEOUT)
        self.machines.append(machine)
        return machine

    def save_logs(self, dest: Path) -> None:
        for spec in self.specs:
            d = dest / spec.run_dir.name
            d.mkdir(parents=True, exist_ok=True)
            (d / "argv.txt").write_text("\n".join(build_argv(spec)) + "\n")
            for f in (serial_log_path(spec.run_dir), qemu_log_path(spec.run_dir)):
                if f.exists():
                    shutil.copy(f, d / f.name)
        for m in self.machines:
            d = dest / m.run_dir.name
            if m.is_running() and m.ssh_port is not None:
                try:
                    with m.ssh() as ssh:
                        ssh.connect(timeout=5)
                        (d / "dmesg.txt").write_text(ssh.run("dmesg", timeout=15).stdout)
                except Exception as e:  # best effort: the test has already failed
                    (d / "dmesg.txt").write_text(f"dmesg unavailable: {e}\n")

    def kill_all(self) -> None:
        for m in self.machines:
            m.kill()
        for spec in self.specs:
            shutil.rmtree(spec.run_dir, ignore_errors=True)


@pytest.fixture
def microvm_factory(request: pytest.FixtureRequest,
                    artifacts: Artifacts) -> Iterator[MicrovmFactory]:
    factory = MicrovmFactory(artifacts)
    try:
        yield factory
    finally:
        if node_failed(request):
            factory.save_logs(REPO / "test-artifacts" / request.node.name)
        factory.kill_all()


def node_failed(request: pytest.FixtureRequest) -> bool:
    return any(getattr(getattr(request.node, f"rep_{w}", None), "failed", False)
               for w in ("setup", "call"))


# pid, state, wait channel, argv of every guest task (the image's ps is busybox's)
PS = ("for p in /proc/[0-9]*; do echo \"${p#/proc/} $(cut -d' ' -f3 $p/stat) "
      "$(cat $p/wchan) $(tr '\\0' ' ' < $p/cmdline)\"; done 2>/dev/null")


def save_state_evidence(db: StateDB, dest: Path) -> None:
    """The evidence of a service-layer test that failed: every VM's run
    directory (argv, serial and QEMU logs, libvirt XML) and, from the guests
    still up, dmesg and the process list."""
    for d in (db.root / "vms").glob("*"):
        shutil.copytree(d, dest / d.name, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("*.sock"))
    for rec in db.list():
        if rec.ssh_port is None or rec.ssh_key is None:
            continue
        out = dest / rec.name
        out.mkdir(parents=True, exist_ok=True)
        try:
            with SSHClient("127.0.0.1", rec.ssh_port, Path(rec.ssh_key)) as ssh:
                ssh.connect(timeout=5)
                ssh.run("echo w > /proc/sysrq-trigger", timeout=15)  # blocked tasks' stacks
                for name, cmd in (("dmesg.txt", "dmesg"),
                                  ("ps.txt", PS)):
                    (out / name).write_text(ssh.run(cmd, timeout=15).stdout)
        except Exception as e:  # best effort: the test has already failed
            (out / "dmesg.txt").write_text(f"guest unreachable: {e}\n")


@pytest.fixture
def booted_vm(microvm_factory: MicrovmFactory) -> Machine:
    return microvm_factory.boot()


class LibvirtdFactory:
    """Starts private libvirtds (tests/vm/libvirtd.py), each an independent
    host: its own directories, host UUID and migration ports.  Owns them: at
    the end every domain they still have is destroyed and undefined and they
    are stopped; their logs are kept if the test failed."""

    def __init__(self) -> None:
        self.daemons: dict[str, PrivateLibvirtd] = {}

    def __call__(self, name: str = "libvirtd", tcp: bool = False,
                 hide: tuple[str | Path, ...] = ()) -> PrivateLibvirtd:
        """A started daemon; ``tcp``: it also listens on 127.0.0.1 (its
        ``tcp_uri``); ``hide``: paths it sees as empty directories."""
        from tests.vm.libvirtd import PrivateLibvirtd  # noqa: PLC0415 (imports libvirt)

        if name in self.daemons:
            raise ValueError(f"a libvirtd named {name!r} was already started")
        daemon = PrivateLibvirtd(Path(tempfile.mkdtemp(prefix=f"czone-lvd-{name}-")),
                                 index=len(self.daemons),
                                 tcp_port=free_port() if tcp else None, hide=hide)
        self.daemons[name] = daemon
        daemon.start()
        return daemon

    def stop_all(self, evidence: Path | None) -> None:
        for name, daemon in self.daemons.items():
            if evidence is not None:
                daemon.save_logs(evidence / name)
            daemon.stop()


@pytest.fixture
def libvirtd_factory(request: pytest.FixtureRequest) -> Iterator[LibvirtdFactory]:
    if not shutil.which("libvirtd"):
        pytest.fail("libvirtd is not installed: run scripts/deps.sh", pytrace=False)
    factory = LibvirtdFactory()
    try:
        yield factory
    finally:
        # A daemon that failed to start fails the test's setup: its logs are kept.
        factory.stop_all(REPO / "test-artifacts" / request.node.name
                         if node_failed(request) else None)


@pytest.fixture
def libvirtd(libvirtd_factory: LibvirtdFactory) -> PrivateLibvirtd:
    """One private libvirtd, reached through its Unix socket (``uri``)."""
    return libvirtd_factory("libvirtd")
