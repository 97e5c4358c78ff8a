"""The guest's container agent (``czone-agentd``), reached over SSH.

The agent listens on the guest's loopback; we reach it through one SSH
``direct-tcpip`` channel and talk newline-delimited JSON (see
``guest-image/rootfs/usr/local/lib/czone-agent/agentd.py``).  Every reply
carries the guest-side timings under ``t``.
"""

from __future__ import annotations

import json
import time
from typing import Any

import paramiko

from czone.errors import CZoneError
from czone.guest.ssh import NET_ERRORS, SSHClient

AGENT_PORT = 7101
# Printed on the serial console by the agent once it listens.
AGENT_MARKER = "czone-agentd: listening"
MAX_REPLY = 32 << 20


class AgentError(CZoneError):
    """The agent answered ``ok: false``; ``errno_name`` says why."""

    def __init__(self, op: str, reply: dict[str, Any]):
        self.op = op
        self.errno_name = str(reply.get("errno", "EIO"))
        self.detail = str(reply.get("detail") or "")
        msg = f"{op}: {reply.get('error', 'failed')} ({self.errno_name})"
        if self.detail:
            msg += f"\n--- container log (last lines) ---\n{self.detail}"
        super().__init__(msg)


class AgentLost(CZoneError):
    """The channel to the agent broke or timed out: the VM or the agent may be gone."""


class RuntimeAgent:
    def __init__(self, ssh: SSHClient, timeout: float = 300.0):
        self.timeout = timeout
        self._chan: paramiko.Channel = ssh.forward(AGENT_PORT)
        self._chan.settimeout(timeout)
        self._buf = b""

    def _readline(self, op: str, timeout: float) -> bytes:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AgentLost(f"agent: no answer to {op!r} within {timeout:.0f}s")
            self._chan.settimeout(left)
            try:
                data = self._chan.recv(65536)
            except TimeoutError:
                continue
            except NET_ERRORS as e:
                raise AgentLost(f"agent: {op!r}: {type(e).__name__}: {e}") from None
            if not data:
                raise AgentLost(f"agent: connection closed during {op!r}")
            self._buf += data
            if len(self._buf) > MAX_REPLY:
                raise AgentLost(f"agent: reply to {op!r} over {MAX_REPLY >> 20} MiB")
        line, _, self._buf = self._buf.partition(b"\n")
        return line

    def call(self, op: str, wait: float | None = None, **args: Any) -> dict[str, Any]:
        """One request, answered within ``wait`` seconds; the reply without ``ok``."""
        try:
            self._chan.sendall(json.dumps({"op": op, **args}).encode() + b"\n")
        except NET_ERRORS as e:
            raise AgentLost(f"agent: cannot send {op!r}: {type(e).__name__}: {e}") from None
        line = self._readline(op, wait or self.timeout)
        try:
            reply = json.loads(line)
        except ValueError:
            raise AgentLost(f"agent: {op!r}: malformed reply {line[:200]!r}") from None
        if not isinstance(reply, dict):
            raise AgentLost(f"agent: {op!r}: malformed reply {line[:200]!r}")
        if not reply.pop("ok", False):
            raise AgentError(op, reply)
        return reply

    def hello(self) -> dict[str, Any]:
        return self.call("hello", wait=30)

    def start(self, ctr_id: str, fn: str, memory_mib: int,
              args: list[str] | None = None, czone: bool = True) -> dict[str, Any]:
        """Start a container; ``args`` replaces the function server's command;
        ``czone`` False starts it in no CZone (the MCPV baselines)."""
        extra: dict[str, Any] = {"args": args} if args else {}
        if not czone:
            extra["czone"] = False
        return self.call("start", id=ctr_id, fn=fn, memory_mib=memory_mib, **extra)

    def invoke(self, ctr_id: str, payload: Any = None,
               timeout: float | None = None) -> dict[str, Any]:
        """The function server's answer: ``ok``, ``result`` or ``error``, ``run_ms``, ``t``."""
        t = timeout or self.timeout
        return self.call("invoke", wait=t + 5, id=ctr_id, payload=payload, timeout=t)["reply"]

    def kill(self, ctr_id: str) -> dict[str, Any]:
        return self.call("kill", id=ctr_id)

    def stop(self, ctr_id: str) -> dict[str, Any]:
        return self.call("stop", id=ctr_id)

    def destroy(self, ctr_id: str) -> dict[str, Any]:
        return self.call("destroy", id=ctr_id)

    def reclaim(self, ctr_id: str | None = None, idle_for: float = 0) -> dict[str, Any]:
        return self.call("reclaim", id=ctr_id, idle_for=idle_for)["reclaimed"]

    def stats(self) -> dict[str, Any]:
        return self.call("stats")["containers"]

    def list(self) -> list[dict[str, Any]]:
        return self.call("list")["containers"]

    def close(self) -> None:
        self._chan.close()

    def __enter__(self) -> RuntimeAgent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
