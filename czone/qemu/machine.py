"""One QEMU process: launch, wait for boot, QMP, staged shutdown.

Modelled on QEMU's ``python/qemu/machine``.  A ``Machine`` is either
launched by this process (``launch()``) or re-attached from a durable record
by another process (``Machine.attach``): the CLI's ``vm down`` runs in a
different process than the ``vm up`` that started QEMU, so everything
``shutdown`` needs is the pid, its start time and the QMP socket.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import psutil
from qemu.qmp import QMPError

from czone.artifacts import Image, Kernel, firmware_dirs
from czone.errors import CZoneError
from czone.guest.ssh import SSHClient, SshTimeout
from czone.qemu.cmdline import (
    READY_MARKER,
    Accel,
    VmSpec,
    build_argv,
    qemu_log_path,
    qmp_socket_path,
    serial_log_path,
)
from czone.qemu.qmp import QmpSession
from czone.state import live_process

TAIL_LINES = 25
# sun_path is 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107


class VmLaunchError(CZoneError):
    """QEMU failed to start or to boot; carries argv and the log tails."""

    def __init__(self, msg: str, argv: list[str] | None = None,
                 qemu_log: str = "", serial_log: str = ""):
        self.argv, self.qemu_log, self.serial_log = argv or [], qemu_log, serial_log
        parts = [msg]
        if qemu_log.strip():
            parts.append(f"--- QEMU output (last lines) ---\n{qemu_log.rstrip()}")
        if serial_log.strip():
            parts.append(f"--- serial console (last lines) ---\n{serial_log.rstrip()}")
        super().__init__("\n".join(parts))


class QmpCommandError(CZoneError):
    pass


def tail(path: Path, lines: int = TAIL_LINES) -> str:
    try:
        data = path.read_bytes()[-64 * 1024:]
    except OSError:
        return ""
    return "\n".join(data.decode(errors="replace").splitlines()[-lines:])


class Machine:
    def __init__(self, spec: VmSpec, ssh_key: Path | None = None):
        self.spec: VmSpec | None = spec
        self._setup(spec.run_dir, spec.ssh_port, ssh_key)
        self.argv = build_argv(spec)

    def _setup(self, run_dir: Path, ssh_port: int | None, ssh_key: Path | None) -> None:
        self.run_dir = run_dir
        self.ssh_port = ssh_port
        self.ssh_key = ssh_key
        self.qmp_socket = qmp_socket_path(run_dir)
        self.serial_log = serial_log_path(run_dir)
        self.qemu_log = qemu_log_path(run_dir)
        self.argv: list[str] = []
        self._popen: subprocess.Popen[bytes] | None = None
        self._proc: psutil.Process | None = None
        self._qmp: QmpSession | None = None
        self.qmp_timeout: float | None = 30.0

    @classmethod
    def attach(cls, run_dir: Path, pid: int, proc_start: float,
               ssh_port: int | None = None, ssh_key: Path | None = None) -> Machine:
        """A handle on a QEMU started by another process; a reused pid is never touched."""
        m = cls.__new__(cls)
        m.spec = None
        m._setup(run_dir, ssh_port, ssh_key)
        m._proc = live_process(pid, proc_start)
        return m

    # -- process state -------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def proc_start(self) -> float | None:
        try:
            return self._proc.create_time() if self._proc else None
        except psutil.Error:
            return None

    def is_running(self) -> bool:
        if self._popen is not None:
            return self._popen.poll() is None
        if self._proc is None:
            return False
        try:
            return self._proc.is_running() and self._proc.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def _wait_exit(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.is_running():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    def _signal(self, sig: signal.Signals) -> None:
        if self._proc is not None and self.is_running():
            try:
                self._proc.send_signal(sig)
            except psutil.Error:
                pass

    def _launch_error(self, msg: str) -> VmLaunchError:
        return VmLaunchError(msg, self.argv, tail(self.qemu_log), tail(self.serial_log))

    def check_alive(self) -> None:
        """Raise VmLaunchError with QEMU's output if the process has exited."""
        if not self.is_running():
            rc = self._popen.returncode if self._popen is not None else None
            how = f" with status {rc}" if rc is not None else ""
            raise self._launch_error(f"QEMU exited{how}")

    # -- lifecycle -----------------------------------------------------

    def launch(self, qmp_timeout: float = 15.0) -> None:
        if self.spec is None:
            raise CZoneError("an attached Machine cannot be launched")
        if self._popen is not None:
            raise CZoneError(f"VM {self.spec.name} was already launched")
        if len(str(self.qmp_socket)) > MAX_SOCKET_PATH:
            raise VmLaunchError(f"QMP socket path too long for AF_UNIX: {self.qmp_socket}",
                                self.argv)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for f in (self.qmp_socket, self.serial_log):
            f.unlink(missing_ok=True)
        try:
            with open(self.qemu_log, "wb") as log:
                # Own session and no stdio from us: QEMU outlives `czonectl vm up`.
                self._popen = subprocess.Popen(
                    self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True, close_fds=True)
        except OSError as e:
            raise VmLaunchError(f"cannot execute QEMU: {e}", self.argv) from e
        self._proc = psutil.Process(self._popen.pid)
        try:
            self._connect_qmp(qmp_timeout)
        except BaseException:
            self.shutdown(timeout=3.0)
            raise

    def _connect_qmp(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            self.check_alive()
            if self.qmp_socket.exists():
                session = QmpSession(self.qmp_socket)
                try:
                    session.connect(timeout=max(0.5, deadline - time.monotonic()))
                    self._qmp = session
                    return
                except (TimeoutError, QMPError, OSError) as e:
                    session.close()
                    last = e
            time.sleep(0.05)
        self.check_alive()
        raise self._launch_error(f"QMP socket {self.qmp_socket} not ready after {timeout:.0f}s"
                                 + (f" ({last})" if last else ""))

    def wait_for_console(self, marker: str, timeout: float) -> None:
        """Wait until ``marker`` appears on the serial console."""
        deadline = time.monotonic() + timeout
        needle = marker.encode()
        while True:
            try:
                if needle in self.serial_log.read_bytes():
                    return
            except FileNotFoundError:
                pass
            self.check_alive()
            if time.monotonic() >= deadline:
                raise self._launch_error(
                    f"guest did not print {marker!r} within {timeout:.0f}s")
            time.sleep(0.1)

    def wait_boot(self, timeout: float = 60.0) -> None:
        self.wait_for_console(READY_MARKER, timeout)

    def ssh(self) -> SSHClient:
        if self.ssh_port is None or self.ssh_key is None:
            raise CZoneError("this VM has no SSH port or key")
        return SSHClient("127.0.0.1", self.ssh_port, self.ssh_key)

    def wait_ssh(self, timeout: float = 60.0) -> SSHClient:
        client = self.ssh()
        try:
            client.wait_ready(timeout, check=self.check_alive)
        except SshTimeout as e:
            raise SshTimeout(f"{e}\n--- serial console (last lines) ---\n"
                             f"{tail(self.serial_log)}") from None
        return client

    def _ensure_qmp(self) -> QmpSession:
        if self._qmp is None:
            if not self.is_running():
                raise CZoneError("QEMU is not running")
            session = QmpSession(self.qmp_socket)
            try:
                session.connect()
            except (TimeoutError, QMPError, OSError) as e:
                session.close()
                raise CZoneError(f"cannot connect to QMP at {self.qmp_socket}: {e}") from e
            self._qmp = session
        return self._qmp

    def qmp(self, cmd: str, /, **args: Any) -> Any:
        """Run a QMP command and return its ``return`` value (``qmp_timeout`` applies)."""
        session = self._ensure_qmp()
        try:
            return session.execute(cmd, args, self.qmp_timeout)
        except QMPError as e:
            raise QmpCommandError(f"QMP {cmd} failed: {e}") from e

    def wait_event(self, name: str, timeout: float, **match: Any) -> dict[str, Any]:
        """The next QMP event ``name`` whose data has every ``match`` item."""
        return self._ensure_qmp().wait_event(name, timeout, match)

    def _close_qmp(self) -> None:
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = None

    def _try_quit(self, timeout: float) -> bool:
        """Send QMP quit; False if QMP could not even be reached."""
        try:
            session = self._ensure_qmp()
        except CZoneError:
            return False
        try:
            session.execute("quit", None, min(timeout, 5.0))
        except (TimeoutError, QMPError, OSError, EOFError):
            pass  # QEMU may hang up before it answers quit
        return True

    def shutdown(self, timeout: float = 10.0) -> None:
        """QMP quit, then SIGTERM, then SIGKILL; idempotent."""
        if self.is_running():
            exited = self._try_quit(timeout) and self._wait_exit(timeout)
            if not exited:
                self._signal(signal.SIGTERM)
                if not self._wait_exit(timeout):
                    self._signal(signal.SIGKILL)
                    self._wait_exit(5.0)
        self._close_qmp()
        if self._popen is not None:
            try:
                self._popen.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                pass

    def close(self) -> None:
        """Drop our QMP connection but leave QEMU running (``vm up`` exits after this)."""
        self._close_qmp()

    def kill(self) -> None:
        """Immediate SIGKILL, for cleanup paths that must not wait."""
        self._signal(signal.SIGKILL)
        self._wait_exit(5.0)
        self.shutdown(timeout=1.0)

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def spec_for(name: str, run_dir: Path, kernel: Kernel, image: Image, qemu: Path, accel: Accel,
             ssh_port: int | None, memory_mib: int = 512, cpus: int = 1,
             **extra: Any) -> VmSpec:
    """A VmSpec for our kernel and image, with Debian's firmware dirs."""
    return VmSpec(name=name, memory_mib=memory_mib, cpus=cpus, kernel=kernel.vmlinux,
                  rootfs=image.rootfs, fnbase=image.fnbase, qemu=qemu, accel=accel,
                  ssh_port=ssh_port, run_dir=run_dir, firmware_dirs=tuple(firmware_dirs()), **extra)


def own_qemu_processes(run_dir: Path) -> list[psutil.Process]:
    """QEMU processes whose command line mentions a path inside ``run_dir``."""
    needle = f"{run_dir}/"
    found = []
    for p in psutil.process_iter(["cmdline", "pid"]):
        try:
            cmd = p.info["cmdline"] or []
        except psutil.Error:
            continue
        if p.pid != os.getpid() and cmd and "qemu" in Path(cmd[0]).name \
                and any(needle in a for a in cmd):
            found.append(p)
    return found


def kill_strays(run_dir: Path, timeout: float = 5.0) -> int:
    """SIGKILL QEMU processes left running in ``run_dir``; returns how many there were."""
    procs = own_qemu_processes(run_dir)
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=timeout)
    return len(procs)
