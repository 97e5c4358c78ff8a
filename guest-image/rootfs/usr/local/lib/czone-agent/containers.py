"""Function containers: an OCI bundle run by crun inside a CZone of its own.

start:  CZONE_IOC_CREATE, write the bundle, then ``czone_exec --overlay ...
        ID crun run``: czone_exec's child is the container's first task,
        already in the CZone; it mounts the writable layer and the overlay
        root in a mount namespace of its own and execs ``crun run``, whose
        processes inherit the CZone.  The server prints ``ready`` on stdout
        once its socket listens.
stop:   ``crun kill`` (SIGTERM, then SIGKILL), wait for ``crun run`` to exit.
destroy: CZONE_IOC_DESTROY, remove the bundle.

A failed start returns crun's stderr and leaves nothing behind: no task, no
CZone, no bundle, no cgroup.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import select
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import bundle
from czonedev import CZoneDev, cap_for

CZONE_EXEC = "/usr/local/bin/czone_exec"
CRUN = "/usr/bin/crun"
START_TIMEOUT = 120.0
STOP_GRACE = 2.0
DESTROY_RETRY = 5.0
MAX_REPLY = 16 << 20
MIN_MIB, MAX_MIB = 16, 64 << 10


class AgentFault(Exception):
    """An error answered to the host: an errno name and one line."""

    def __init__(self, err: int, msg: str, detail: str = ""):
        super().__init__(msg)
        self.errno_name = errno.errorcode.get(err, "EIO")
        self.detail = detail


def ms(t0: float, t1: float) -> float:
    return round((t1 - t0) * 1000, 3)


@dataclass
class Container:
    id: str
    fn: str
    memory_mib: int
    czone: int
    launcher: subprocess.Popen | None
    started: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.monotonic)
    invocations: int = 0
    # Until the server said "ready": nobody else may stop or destroy it.
    starting: bool = True
    conn: socket.socket | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def dir(self) -> Path:
        return bundle.bundle_dir(self.id)

    def running(self) -> bool:
        return self.launcher is not None and self.launcher.poll() is None

    def pids(self) -> list[int]:
        try:
            text = Path(f"/sys/fs/cgroup{bundle.cgroup_path(self.id)}/cgroup.procs").read_text()
        except OSError:
            return []
        return [int(p) for p in text.split()]

    def describe(self) -> dict:
        state = ("starting" if self.starting else
                 "running" if self.running() else "exited")
        rc = None if self.launcher is None else self.launcher.poll()
        return {"id": self.id, "fn": self.fn, "memory_mib": self.memory_mib,
                "czone": self.czone, "state": state, "exit_status": rc,
                "launcher_pid": self.launcher.pid if self.launcher else None,
                "pids": self.pids(), "started": self.started,
                "idle_s": round(time.monotonic() - self.last_used, 3),
                "invocations": self.invocations}


def _log_tail(path: Path, limit: int = 4000) -> str:
    try:
        return path.read_bytes()[-limit:].decode(errors="replace").strip()
    except OSError:
        return ""


def _wait_ready(proc: subprocess.Popen, timeout: float) -> bool:
    """True once the server printed a ``ready`` line (a function may print
    before it); False if the launcher exited first."""
    assert proc.stdout is not None
    fd, buf = proc.stdout.fileno(), b""
    deadline = time.monotonic() + timeout
    while b"ready" not in buf.split(b"\n")[:-1]:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            data = os.read(fd, 4096)
            if not data:
                return False
            buf = (buf + data)[-65536:]
    return True


class Runtime:
    def __init__(self, dev: CZoneDev | None = None):
        self.dev = dev or CZoneDev()
        self.ctrs: dict[str, Container] = {}
        self.lock = threading.Lock()

    def get(self, ctr_id: str) -> Container:
        with self.lock:
            ctr = self.ctrs.get(ctr_id)
        if ctr is None:
            raise AgentFault(errno.ENOENT, f"no container {ctr_id!r}")
        return ctr

    # -- start ---------------------------------------------------------------

    def start(self, ctr_id: str, fn: str, memory_mib: int,
              args: list[str] | None = None, czone: bool = True) -> dict:
        if not bundle.ID_RE.fullmatch(ctr_id):
            raise AgentFault(errno.EINVAL, f"invalid container id {ctr_id!r}")
        if not bundle.FN_RE.fullmatch(fn) or \
                not (bundle.FNBASE / bundle.FN_DIR.lstrip("/") / f"{fn}.py").is_file():
            raise AgentFault(errno.ENOENT, f"unknown function {fn!r}")
        if not MIN_MIB <= memory_mib <= MAX_MIB:
            raise AgentFault(errno.EINVAL, f"memory {memory_mib} MiB outside "
                                           f"{MIN_MIB}..{MAX_MIB}")
        with self.lock:
            if ctr_id in self.ctrs or bundle.bundle_dir(ctr_id).exists():
                raise AgentFault(errno.EEXIST, f"container {ctr_id!r} exists")
            self.ctrs[ctr_id] = ctr = Container(ctr_id, fn, memory_mib, 0, None)
        try:
            return self._start(ctr, args, czone)
        except BaseException:
            self._cleanup(ctr)
            raise

    def _start(self, ctr: Container, args: list[str] | None, czone: bool) -> dict:
        """``czone`` False: no CZone, only the memcg (the MCPV baselines)."""
        t0 = time.monotonic()
        try:
            ctr.czone = self.dev.create(cap_for(ctr.memory_mib)) if czone else 0
        except OSError as e:
            raise AgentFault(e.errno or errno.EIO, f"CZONE_IOC_CREATE: {e.strerror}") from None
        t1 = time.monotonic()
        d = ctr.dir
        for sub in ("rootfs", "layer", "sock"):
            (d / sub).mkdir(parents=True)
        cfg = bundle.config(ctr.id, ctr.fn, ctr.memory_mib, d)
        if args:
            cfg["process"]["args"] = args
        (d / "config.json").write_text(json.dumps(cfg))
        (d / "meta.json").write_text(json.dumps(
            {"id": ctr.id, "fn": ctr.fn, "memory_mib": ctr.memory_mib, "czone": ctr.czone}))
        with open(d / "log", "wb") as log:
            ctr.launcher = subprocess.Popen(
                [CZONE_EXEC, "--overlay", str(bundle.FNBASE), str(d), f"{ctr.memory_mib}m",
                 str(ctr.czone), CRUN, "run", "--bundle", str(d), ctr.id],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
                close_fds=True)
        t2 = time.monotonic()
        try:
            ok = _wait_ready(ctr.launcher, START_TIMEOUT)
        except TimeoutError:
            raise AgentFault(errno.ETIMEDOUT, f"container {ctr.id!r} not ready after "
                             f"{START_TIMEOUT:.0f}s", _log_tail(d / "log")) from None
        finally:
            ctr.launcher.stdout.close()
        if not ok:
            try:
                rc = ctr.launcher.wait(STOP_GRACE)
            except subprocess.TimeoutExpired:
                rc = None  # the server lives on: _cleanup stops it
            raise AgentFault(errno.EIO, f"container {ctr.id!r} failed to start "
                             f"(crun run exited {rc})", _log_tail(d / "log"))
        t3 = time.monotonic()
        ctr.last_used = t3
        ctr.starting = False
        return {"czone": ctr.czone, "launcher_pid": ctr.launcher.pid,
                "t": {"czone_create_ms": ms(t0, t1), "bundle_ms": ms(t1, t2),
                      "crun_to_ready_ms": ms(t2, t3), "start_ms": ms(t0, t3)}}

    # -- invoke --------------------------------------------------------------

    def invoke(self, ctr_id: str, payload: object, timeout: float) -> dict:
        ctr = self.get(ctr_id)
        if not ctr.running():
            raise AgentFault(errno.ESRCH, f"container {ctr_id!r} is not running")
        line = json.dumps({"payload": payload}).encode() + b"\n"
        with ctr.lock:
            t0 = time.monotonic()
            try:
                if ctr.conn is None:
                    ctr.conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    ctr.conn.settimeout(timeout)
                    ctr.conn.connect(str(ctr.dir / "sock" / "fn.sock"))
                ctr.conn.settimeout(timeout)
                ctr.conn.sendall(line)
                reply = self._readline(ctr.conn)
            except (OSError, ValueError) as e:
                if ctr.conn is not None:
                    ctr.conn.close()
                    ctr.conn = None
                err = errno.ETIMEDOUT if isinstance(e, TimeoutError) else errno.EPIPE
                raise AgentFault(err, f"container {ctr_id!r}: {type(e).__name__}: {e}",
                                 _log_tail(ctr.dir / "log")) from None
            t1 = time.monotonic()
            ctr.invocations += 1
            ctr.last_used = t1
        try:
            answer = json.loads(reply)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise AgentFault(errno.EPROTO, f"container {ctr_id!r}: malformed answer "
                             f"{reply[:200]!r}")
        answer.setdefault("t", {})["invoke_ms"] = ms(t0, t1)
        return {"reply": answer}

    @staticmethod
    def _readline(conn: socket.socket) -> bytes:
        buf = bytearray()
        while not buf.endswith(b"\n"):
            data = conn.recv(65536)
            if not data:
                raise ValueError("the function server closed the connection")
            buf += data
            if len(buf) > MAX_REPLY:
                raise ValueError("reply longer than 16 MiB")
        return bytes(buf)

    # -- stop and destroy ------------------------------------------------------

    def _settled(self, ctr_id: str) -> Container:
        ctr = self.get(ctr_id)
        if ctr.starting:
            raise AgentFault(errno.EBUSY, f"container {ctr_id!r} is still starting")
        return ctr

    def stop(self, ctr_id: str) -> dict:
        ctr = self._settled(ctr_id)
        t0 = time.monotonic()
        self._stop(ctr)
        return {"exit_status": ctr.launcher.poll() if ctr.launcher else None,
                "t": {"stop_ms": ms(t0, time.monotonic())}}

    def _stop(self, ctr: Container) -> None:
        if ctr.conn is not None:
            ctr.conn.close()
            ctr.conn = None
        if not ctr.running():
            return
        for sig, grace in (("TERM", STOP_GRACE), ("KILL", STOP_GRACE)):
            with contextlib.suppress(subprocess.TimeoutExpired):
                subprocess.run([CRUN, "kill", ctr.id, sig], capture_output=True,
                               check=False, timeout=10)
            try:
                ctr.launcher.wait(grace)
                return
            except subprocess.TimeoutExpired:
                pass
        ctr.launcher.kill()
        try:
            ctr.launcher.wait(STOP_GRACE)
        except subprocess.TimeoutExpired:
            pass  # reaped later; destroy retries while its tasks exit

    def destroy(self, ctr_id: str) -> dict:
        ctr = self._settled(ctr_id)
        if ctr.running():
            raise AgentFault(errno.EBUSY, f"container {ctr_id!r} is running; stop it first")
        t0 = time.monotonic()
        res = self._cleanup(ctr)
        return {**res, "t": {"destroy_ms": ms(t0, time.monotonic())}}

    def kill(self, ctr_id: str) -> dict:
        ctr = self._settled(ctr_id)
        t0 = time.monotonic()
        self._stop(ctr)
        t1 = time.monotonic()
        res = self._cleanup(ctr)
        return {**res, "t": {"stop_ms": ms(t0, t1), "destroy_ms": ms(t1, time.monotonic())}}

    def _cleanup(self, ctr: Container) -> dict:
        """Stop what runs, destroy the CZone, remove crun state and the bundle."""
        self._stop(ctr)
        with contextlib.suppress(subprocess.TimeoutExpired):
            subprocess.run([CRUN, "delete", "--force", ctr.id], capture_output=True,
                           check=False, timeout=10)
        res: dict = {}
        if ctr.czone:
            deadline = time.monotonic() + DESTROY_RETRY
            while True:
                try:
                    res = self.dev.destroy(ctr.czone)
                    if not res["failed_pages"]:
                        break
                    # Pages still pinned: the CZone is dying; destroy again.
                    if time.monotonic() > deadline:
                        raise AgentFault(errno.EBUSY, f"CZone {ctr.czone}: "
                                         f"{res['failed_pages']} pages could not be "
                                         "migrated yet; destroy it again later")
                    time.sleep(0.05)
                except OSError as e:
                    # The last task may still be exiting: its mm goes a moment later.
                    if e.errno != errno.EBUSY or time.monotonic() > deadline:
                        raise AgentFault(e.errno or errno.EIO,
                                         f"CZONE_IOC_DESTROY {ctr.czone}: {e.strerror}") from None
                    time.sleep(0.01)
        shutil.rmtree(ctr.dir, ignore_errors=True)
        with self.lock:
            self.ctrs.pop(ctr.id, None)
        return res

    # -- memory ----------------------------------------------------------------

    def reclaim(self, ctr_id: str | None, idle_for: float) -> dict:
        if ctr_id:
            ctrs = [self.get(ctr_id)]
        else:
            with self.lock:
                ctrs = list(self.ctrs.values())
        now, out = time.monotonic(), {}
        for ctr in ctrs:
            if ctr.czone and now - ctr.last_used >= idle_for:
                try:
                    out[ctr.id] = self.dev.reclaim(ctr.czone)
                except OSError as e:
                    out[ctr.id] = {"error": f"CZONE_IOC_RECLAIM: {e.strerror}"}
        return {"reclaimed": out}

    def stats(self) -> dict:
        with self.lock:
            ctrs = list(self.ctrs.values())
        out = {}
        for ctr in ctrs:
            row = ctr.describe()
            try:
                row["czone_stat"] = self.dev.stat(ctr.czone) if ctr.czone else None
            except OSError as e:
                row["czone_stat"] = {"error": e.strerror}
            try:
                row["memory_current"] = int(Path(
                    f"/sys/fs/cgroup{bundle.cgroup_path(ctr.id)}/memory.current").read_text())
            except (OSError, ValueError):
                row["memory_current"] = None
            out[ctr.id] = row
        return {"containers": out}

    def list(self) -> dict:
        with self.lock:
            ctrs = list(self.ctrs.values())
        return {"containers": [c.describe() for c in ctrs]}

    def shutdown(self) -> None:
        with self.lock:
            ctrs = list(self.ctrs.values())
        for ctr in ctrs:
            try:
                self._cleanup(ctr)
            except AgentFault:
                pass
