"""One QEMU process: launch, wait for boot, QMP, staged shutdown.

Modelled on QEMU's ``python/qemu/machine``.  A ``Machine`` is either
launched by this process (``launch()``) or re-attached from a durable record
by another process (``Machine.attach``): the CLI's ``vm down`` runs in a
different process than the ``vm up`` that started QEMU, so everything
``shutdown`` needs is the pid, its start time and the QMP socket.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import psutil
from qemu.qmp import ExecuteError, QMPError

from czone.errors import CZoneError
from czone.guest.ssh import SSHClient, SshTimeout
from czone.qemu.cmdline import (
    READY_MARKER,
    VmSpec,
    build_argv,
    qemu_log_path,
    qmp_launch_socket_path,
    qmp_socket_path,
    serial_log_path,
)
from czone.qemu.qmp import QmpClient, QmpCommandError, QmpTimeout

TAIL_LINES = 25
# sun_path is 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107
# What a QMP connection raises when QEMU hangs, dies or hangs up.
QMP_FAILURES = (QMPError, TimeoutError, EOFError, OSError)
# psutil derives start times from /proc/stat's btime, which can drift by a second.
START_TOLERANCE = 1.0


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


def tail(path: Path, lines: int = TAIL_LINES) -> str:
    try:
        data = path.read_bytes()[-64 * 1024:]
    except OSError:
        return ""
    return "\n".join(data.decode(errors="replace").splitlines()[-lines:])


def live_process(pid: int, proc_start: float) -> psutil.Process | None:
    """The process ``pid`` if it is alive and is the one that started at ``proc_start``."""
    try:
        proc = psutil.Process(pid)
        if (abs(proc.create_time() - proc_start) < START_TOLERANCE
                and proc.status() != psutil.STATUS_ZOMBIE):
            return proc
    except psutil.Error:
        pass
    return None


class LogFollower:
    """A growing log file, read from where the last read stopped."""

    def __init__(self, path: Path):
        self.path = path
        self.data = bytearray()
        self._file: Any = None

    def read(self) -> None:
        if self._file is None:
            try:
                self._file = open(self.path, "rb")  # noqa: SIM115 (kept open while following)
            except FileNotFoundError:
                return
        self.data += self._file.read()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self.data.clear()


class Machine:
    qmp_timeout: float | None = 30.0

    def __init__(self, spec: VmSpec | None, ssh_key: Path | None = None, *,
                 run_dir: Path | None = None, ssh_port: int | None = None,
                 proc: psutil.Process | None = None):
        """A VM to launch from ``spec``; or, with ``spec=None``, a handle on the
        running QEMU ``proc`` whose files are in ``run_dir`` (see ``attach``)."""
        if spec is not None:
            run_dir, ssh_port = spec.run_dir, spec.ssh_port
        elif run_dir is None:
            raise ValueError("a Machine needs a spec or a run_dir")
        self.spec = spec
        self.argv = build_argv(spec) if spec is not None else []
        self.run_dir, self.ssh_port, self.ssh_key = run_dir, ssh_port, ssh_key
        self.qmp_socket = qmp_socket_path(run_dir)
        self.qmp_launch_socket = qmp_launch_socket_path(run_dir)
        self.serial_log = serial_log_path(run_dir)
        self.qemu_log = qemu_log_path(run_dir)
        self._proc = proc
        self._launched = False
        self._qmp: QmpClient | None = None
        self._console = LogFollower(self.serial_log)
        # The shutdown stage that ended QEMU: "quit", "SIGTERM" or "SIGKILL".
        self.stopped_by: str | None = None

    @classmethod
    def attach(cls, run_dir: Path, pid: int, proc_start: float,
               ssh_port: int | None = None, ssh_key: Path | None = None) -> Machine:
        """A handle on a QEMU started by another process; a reused pid is never touched."""
        return cls(None, ssh_key, run_dir=run_dir, ssh_port=ssh_port,
                   proc=live_process(pid, proc_start))

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

    @property
    def returncode(self) -> int | None:
        """QEMU's exit status once it has exited, if this process may collect it."""
        if self._proc is None or self.is_running():
            return None
        try:
            return self._proc.wait(0)
        except psutil.Error:
            return None

    def is_running(self) -> bool:
        if self._proc is None:
            return False
        try:
            return self._proc.is_running() and self._proc.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def _wait_exit(self, timeout: float) -> bool:
        if self._proc is None:
            return True
        try:
            self._proc.wait(timeout)
        except psutil.TimeoutExpired:
            return False
        except psutil.Error:
            pass
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
            rc = self.returncode
            how = f" with status {rc}" if rc is not None else ""
            raise self._launch_error(f"QEMU exited{how}")

    # -- lifecycle -----------------------------------------------------

    def launch(self, qmp_timeout: float = 15.0) -> None:
        if self.spec is None:
            raise CZoneError("an attached Machine cannot be launched")
        if self._launched:
            raise CZoneError(f"VM {self.spec.name} was already launched")
        for path in (self.qmp_socket, self.qmp_launch_socket):
            if len(str(path)) > MAX_SOCKET_PATH:
                raise VmLaunchError(f"QMP socket path too long for AF_UNIX: {path}", self.argv)
        if self.spec.tap is not None and self.spec.tap.fd is None:
            raise VmLaunchError("the bridged NIC has no tap descriptor: the service layer "
                                "opens the tap before the launch", self.argv)
        self._launched = True
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for f in (self.qmp_socket, self.qmp_launch_socket, self.serial_log):
            f.unlink(missing_ok=True)
        qmp = QmpClient(str(self.qmp_launch_socket), server=True, nickname=self.spec.name)
        try:
            with open(self.qemu_log, "wb") as log:
                # Own session and no stdio from us: QEMU outlives `czonectl vm up`.
                # The bridged NIC's tap (opened by czonectl) is the one descriptor
                # QEMU inherits; the argv names it by number.
                fds = (self.spec.tap.fd,) if self.spec.tap and self.spec.tap.fd is not None \
                    else ()
                self._proc = psutil.Popen(
                    self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True, close_fds=True, pass_fds=fds)
        except OSError as e:
            _close(qmp)
            raise VmLaunchError(f"cannot execute QEMU: {e}", self.argv) from e
        try:
            self._accept_qmp(qmp, qmp_timeout)
        except BaseException:
            self.shutdown(timeout=3.0)
            raise

    def _accept_qmp(self, qmp: QmpClient, timeout: float) -> None:
        pending = threading.Event()
        pending.set()
        threading.Thread(target=self._wake_accept_on_exit, args=(pending, timeout),
                         daemon=True).start()
        try:
            qmp.accept(timeout)
        except QMP_FAILURES as e:
            _close(qmp)
            self.check_alive()
            why = "" if isinstance(e, TimeoutError) else f" ({str(e) or type(e).__name__})"
            raise self._launch_error(f"QEMU did not connect to QMP at {self.qmp_launch_socket} "
                                     f"within {timeout:.0f}s{why}") from None
        finally:
            pending.clear()
            self.qmp_launch_socket.unlink(missing_ok=True)
        self._qmp = qmp

    def _wake_accept_on_exit(self, pending: threading.Event, timeout: float) -> None:
        """A QEMU that exits before it connects would leave accept() waiting out its
        timeout; connecting once makes accept() fail at once instead."""
        assert self.pid is not None
        pidfd = os.pidfd_open(self.pid)
        try:
            exited = select.select([pidfd], [], [], timeout)[0]
        finally:
            os.close(pidfd)
        if exited and pending.is_set():
            with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as s:
                s.connect(str(self.qmp_launch_socket))

    def wait_for_console(self, marker: str, timeout: float) -> None:
        """Wait until ``marker`` appears on the serial console (read incrementally)."""
        deadline = time.monotonic() + timeout
        needle = marker.encode()
        start = 0
        while True:
            self._console.read()
            if needle in self._console.data[start:]:
                return
            start = max(0, len(self._console.data) - len(needle) + 1)
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

    def _ensure_qmp(self, timeout: float | None = None) -> QmpClient:
        if self._qmp is None:
            if not self.is_running():
                raise CZoneError("QEMU is not running")
            timeout = timeout or self.qmp_timeout
            qmp = QmpClient(str(self.qmp_socket))
            try:
                qmp.connect(timeout=timeout)
            except QMP_FAILURES as e:
                _close(qmp)
                raise QmpCommandError(f"cannot connect to QMP at {self.qmp_socket}: "
                                      f"{_why(e, timeout)}") from None
            self._qmp = qmp
        return self._qmp

    def qmp(self, cmd: str, /, **args: Any) -> Any:
        """Run a QMP command and return its ``return`` value (``qmp_timeout`` applies)."""
        qmp = self._ensure_qmp()
        qmp.settimeout(self.qmp_timeout)
        try:
            return qmp.cmd(cmd, **args)
        except ExecuteError as e:
            raise QmpCommandError(f"QMP {cmd} failed: {e}") from None
        except QMP_FAILURES as e:
            self._close_qmp()
            raise QmpCommandError(f"QMP {cmd} to QEMU pid {self.pid} failed: "
                                  f"{_why(e, self.qmp_timeout)}") from None

    def wait_event(self, name: str, timeout: float, **match: Any) -> dict[str, Any]:
        """The next QMP event ``name`` whose data has every ``match`` item."""
        qmp = self._ensure_qmp()
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                event = qmp.pull_event(wait=float(left))
            except TimeoutError:
                break
            except QMP_FAILURES as e:
                raise QmpCommandError(f"waiting for QMP event {name}: {_why(e, left)}") from None
            data = event.get("data", {}) if event else {}
            if event and event["event"] == name and all(data.get(k) == v
                                                        for k, v in match.items()):
                return event
        raise QmpTimeout(f"no QMP event {name} {match or ''} within {timeout:.0f}s")

    def _close_qmp(self) -> None:
        if self._qmp is not None:
            _close(self._qmp)
            self._qmp = None

    def _try_quit(self, timeout: float) -> bool:
        """Send QMP quit; False if QMP could not even be reached."""
        try:
            qmp = self._ensure_qmp(min(timeout, 5.0))
        except CZoneError:
            return False
        qmp.settimeout(min(timeout, 5.0))
        with contextlib.suppress(*QMP_FAILURES):
            qmp.cmd("quit")  # QEMU may hang up before it answers quit
        return True

    def shutdown(self, timeout: float = 10.0) -> None:
        """QMP quit, then SIGTERM, then SIGKILL; idempotent."""
        if self.is_running():
            if self._try_quit(timeout) and self._wait_exit(timeout):
                self.stopped_by = "quit"
            else:
                self._signal(signal.SIGTERM)
                self.stopped_by = "SIGTERM"
                if not self._wait_exit(timeout):
                    self._signal(signal.SIGKILL)
                    self.stopped_by = "SIGKILL"
                    self._wait_exit(5.0)
        self._close_qmp()
        self._console.close()
        if self._launched:
            self._wait_exit(5.0)  # reap our child

    def close(self) -> None:
        """Drop our QMP connection but leave QEMU running (``vm up`` exits after this)."""
        self._close_qmp()
        self._console.close()

    def kill(self) -> None:
        """Immediate SIGKILL, for cleanup paths that must not wait."""
        self._signal(signal.SIGKILL)
        self._wait_exit(5.0)
        self.shutdown(timeout=1.0)

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def _why(e: BaseException, timeout: float | None) -> str:
    if isinstance(e, TimeoutError):
        return f"no answer within {timeout or 0:g}s (QEMU hung?)"
    return f"connection lost ({str(e) or type(e).__name__})"


def _close(qmp: QmpClient) -> None:
    # disconnect() re-raises whatever broke the connection; we are done with it anyway.
    with contextlib.suppress(*QMP_FAILURES):
        qmp.close()


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
