"""Commands in the guest over SSH (paramiko).

The guest's host key is not verified: the guest is reached only through
QEMU's user-mode forward on 127.0.0.1, every VM of an image shares that
image's throw-away host key, and a known_hosts file would only go stale
as ports get reused.  Keys live in memory (``AutoAddPolicy``) and are never
saved.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shlex
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import paramiko

from czone.errors import CZoneError

Sink = Callable[[bytes], object]
NET_ERRORS = (paramiko.SSHException, OSError, EOFError)

# Retries while the guest boots make paramiko log tracebacks; keep them off stderr.
logging.getLogger("paramiko").addHandler(logging.NullHandler())


class SshError(CZoneError):
    """The SSH connection failed (refused, reset, handshake or auth error)."""


class SshTimeout(SshError):
    pass


class GuestTimeout(CZoneError, TimeoutError):
    pass


class GuestCommandError(CZoneError):
    def __init__(self, cmd: str, result: Result):
        self.cmd, self.result = cmd, result
        msg = f"guest command {cmd!r} exited with status {result.rc}"
        for name, text in (("stdout", result.stdout), ("stderr", result.stderr)):
            if text.strip():
                msg += f"\n--- {name} ---\n{text.rstrip()[-4000:]}"
        super().__init__(msg)


@dataclass(frozen=True)
class Result:
    rc: int
    stdout: str
    stderr: str


def _pump(src: BinaryIO, chan: paramiko.Channel) -> None:
    """Copy ``src`` into the channel's stdin, then close it (EOF for the command)."""
    try:
        while data := src.read1(65536) if hasattr(src, "read1") else src.read(65536):
            chan.sendall(data)
    except (OSError, paramiko.SSHException):
        pass  # the command ended first, or the channel broke: run() reports that
    finally:
        with contextlib.suppress(OSError, paramiko.SSHException):
            chan.shutdown_write()


class SSHClient:
    def __init__(self, host: str, port: int, key_path: Path, user: str = "root",
                 sock: Callable[[], socket.socket] | None = None):
        """``sock``: makes the TCP connection instead of paramiko (e.g. one opened
        inside a network namespace, to reach a guest on the bridge)."""
        self.host, self.port, self.key_path, self.user = host, port, Path(key_path), user
        self._sock = sock
        self._client: paramiko.SSHClient | None = None

    def _load_key(self) -> paramiko.PKey:
        try:
            return paramiko.Ed25519Key.from_private_key_file(str(self.key_path))
        except (OSError, paramiko.SSHException) as e:
            raise CZoneError(f"cannot load SSH key {self.key_path}: {e}") from e

    def connect(self, timeout: float = 10.0) -> None:
        self.close()
        client = paramiko.SSHClient()
        client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
        try:
            client.connect(self.host, self.port, username=self.user, pkey=self._load_key(),
                           timeout=timeout, banner_timeout=timeout, auth_timeout=timeout,
                           allow_agent=False, look_for_keys=False,
                           sock=self._sock() if self._sock else None)
        except NET_ERRORS as e:
            client.close()
            raise SshError(f"cannot connect to {self.user}@{self.host}:{self.port}: "
                           f"{type(e).__name__}: {e}") from e
        except BaseException:
            client.close()
            raise
        self._client = client

    def wait_ready(self, timeout: float = 60.0,
                   check: Callable[[], None] | None = None) -> None:
        """Retry until a command runs; ``check`` may raise to abort early (e.g. VM died)."""
        deadline = time.monotonic() + timeout
        last: BaseException | None = None
        while True:
            if check:
                check()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                self.connect(timeout=min(10.0, max(1.0, remaining)))
                if self.run("true", timeout=min(10.0, max(1.0, remaining))).rc == 0:
                    return
            except (SshError, GuestTimeout) as e:
                last = e
                self.close()
            time.sleep(0.5)
        why = f" (last error: {last})" if last else ""
        raise SshTimeout(f"SSH to {self.user}@{self.host}:{self.port} not ready "
                         f"after {timeout:.0f}s{why}")

    def _transport(self) -> paramiko.Transport:
        if self._client is None:
            self.connect()
        assert self._client is not None
        transport = self._client.get_transport()
        if transport is None or not transport.is_active():
            self.connect()
            transport = self._client.get_transport()
        assert transport is not None
        return transport

    def run(self, cmd: str, timeout: float | None = 60.0,
            on_stdout: Sink | None = None, on_stderr: Sink | None = None,
            stdin: BinaryIO | None = None) -> Result:
        """Run ``cmd``; output is collected, and also passed to the sinks as it
        arrives.  ``stdin`` is streamed to the command until its end, as ssh does."""
        try:
            return self._run(cmd, timeout, on_stdout, on_stderr, stdin)
        except GuestTimeout:
            raise
        except NET_ERRORS as e:
            self.close()
            raise SshError(f"SSH session to {self.host}:{self.port} failed while running "
                           f"{cmd!r}: {type(e).__name__}: {e}") from e

    def _run(self, cmd: str, timeout: float | None, on_stdout: Sink | None,
             on_stderr: Sink | None, stdin: BinaryIO | None = None) -> Result:
        chan = self._transport().open_session(timeout=10.0)
        try:
            chan.exec_command(cmd)
            if stdin is None:
                chan.shutdown_write()
            else:
                threading.Thread(target=_pump, args=(stdin, chan), daemon=True).start()
            out, err = bytearray(), bytearray()
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                idle = True
                while chan.recv_ready():
                    data = chan.recv(65536)
                    out += data
                    if on_stdout:
                        on_stdout(data)
                    idle = False
                while chan.recv_stderr_ready():
                    data = chan.recv_stderr(65536)
                    err += data
                    if on_stderr:
                        on_stderr(data)
                    idle = False
                if idle and chan.exit_status_ready() and not chan.recv_ready() \
                        and not chan.recv_stderr_ready():
                    break
                if deadline is not None and time.monotonic() > deadline:
                    raise GuestTimeout(f"guest command {cmd!r} still running after "
                                         f"{timeout:.0f}s")
                if idle:
                    time.sleep(0.01)
            rc = chan.recv_exit_status()
        finally:
            chan.close()
        return Result(rc, out.decode(errors="replace"), err.decode(errors="replace"))

    def session(self, cmd: str) -> paramiko.Channel:
        """Start ``cmd`` on a channel of its own, for a conversation over stdin/stdout."""
        try:
            chan = self._transport().open_session(timeout=10.0)
            chan.exec_command(cmd)
        except NET_ERRORS as e:
            self.close()
            raise SshError(f"SSH session to {self.host}:{self.port} could not start "
                           f"{cmd!r}: {type(e).__name__}: {e}") from e
        return chan

    def forward(self, port: int, timeout: float = 10.0) -> paramiko.Channel:
        """A ``direct-tcpip`` channel to ``127.0.0.1:port`` in the guest."""
        try:
            return self._transport().open_channel(
                "direct-tcpip", ("127.0.0.1", port), ("127.0.0.1", 0), timeout=timeout)
        except NET_ERRORS as e:
            self.close()
            raise SshError(f"SSH forward to guest port {port} via {self.host}:{self.port} "
                           f"failed: {type(e).__name__}: {e}") from e

    def put(self, data: bytes | BinaryIO, path: str, mode: str = "0755") -> None:
        """Write ``data`` (bytes or a binary file) to ``path`` in the guest (the
        image has no SFTP server)."""
        q = shlex.quote(path)
        src = io.BytesIO(data) if isinstance(data, bytes) else data
        res = self.run(f"cat > {q} && chmod {mode} {q}", timeout=600, stdin=src)
        if res.rc != 0:
            raise GuestCommandError(f"write {path}", res)

    def check(self, cmd: str, timeout: float | None = 60.0) -> Result:
        result = self.run(cmd, timeout)
        if result.rc != 0:
            raise GuestCommandError(cmd, result)
        return result

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def __enter__(self) -> SSHClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
