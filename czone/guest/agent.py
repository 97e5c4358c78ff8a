"""The in-guest container agent (guest-image/tools/czone_agent.c), driven over SSH.

One ``czone_agent`` process per ``GuestAgent`` talks a line protocol on its
stdin/stdout: every command gets one ``ok ...`` or ``err ERRNO what`` line.
Containers are child tasks of the agent, cloned into a CZone (or none).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import paramiko

from czone.errors import CZoneError
from czone.guest.ssh import SSHClient

AGENT_PATH = "/usr/local/bin/czone_agent"


class AgentError(CZoneError):
    """The agent answered ``err``, or the conversation broke."""

    def __init__(self, command: str, answer: str):
        super().__init__(f"czone_agent: {command!r} -> {answer!r}")
        self.command = command
        self.answer = answer
        self.errno_name = answer.split()[1] if answer.startswith("err ") else ""


def parse_fields(words: list[str]) -> dict[str, int]:
    """``["released=3", "ns=12"]`` -> ``{"released": 3, "ns": 12}``."""
    out = {}
    for w in words:
        key, sep, value = w.partition("=")
        if not sep:
            raise ValueError(f"not key=value: {w!r}")
        out[key] = int(value)
    return out


@dataclass(frozen=True)
class Ctr:
    name: str
    czone: int
    pid: int


class GuestAgent:
    def __init__(self, ssh: SSHClient, path: str = AGENT_PATH, timeout: float = 300.0):
        self.timeout = timeout
        self._chan: paramiko.Channel = ssh.session(path)
        self._chan.settimeout(timeout)
        self._buf = b""
        if (hello := self._readline("<start>")) != "ready":
            raise AgentError("<start>", hello)

    def _readline(self, command: str) -> str:
        deadline = time.monotonic() + self.timeout
        while b"\n" not in self._buf:
            if time.monotonic() > deadline:
                raise AgentError(command, f"no answer within {self.timeout:.0f}s")
            try:
                data = self._chan.recv(4096)
            except TimeoutError:
                raise AgentError(command, f"no answer within {self.timeout:.0f}s") from None
            if not data:
                err = self._chan.recv_stderr(4096).decode(errors="replace")
                raise AgentError(command, f"agent exited {err.strip()!r}")
            self._buf += data
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode(errors="replace").strip()

    def ask(self, command: str) -> list[str]:
        """Send one command; return the words after ``ok`` or raise AgentError."""
        self._chan.sendall(command.encode() + b"\n")
        answer = self._readline(command)
        if answer != "ok" and not answer.startswith("ok "):
            raise AgentError(command, answer)
        return answer.split()[1:]

    def create(self, cap_mib: int) -> int:
        return int(self.ask(f"create {cap_mib}")[0])

    def spawn(self, name: str, czone: int, max_mib: int, thp: bool = True) -> Ctr:
        words = self.ask(f"spawn {name} {czone} {max_mib}{'' if thp else ' nothp'}")
        return Ctr(name, czone, int(words[0]))

    def touch(self, name: str, mib: int) -> int:
        """Touch ``mib`` more; returns the KiB touched in all."""
        return int(self.ask(f"touch {name} {mib}")[0])

    def interleave(self, names: list[str], mib: int, step_kib: int = 64) -> None:
        self.ask(f"interleave {step_kib} {mib} {' '.join(names)}")

    def free(self, name: str, mib: int) -> int:
        """Drop the top ``mib`` of what was touched; returns the KiB still touched."""
        return int(self.ask(f"free {name} {mib}")[0])

    def punch(self, name: str, step_kib: int) -> int:
        """Free every other ``step_kib`` of what was touched; returns the KiB freed."""
        return int(self.ask(f"punch {name} {step_kib}")[0])

    def verify(self, name: str) -> int:
        """Check every touched page; returns their number."""
        return int(self.ask(f"verify {name}")[0])

    def kill(self, name: str) -> None:
        self.ask(f"kill {name}")

    def destroy(self, czone: int) -> dict[str, int]:
        return parse_fields(self.ask(f"destroy {czone}"))

    def reclaim(self, czone: int) -> dict[str, int]:
        return parse_fields(self.ask(f"reclaim {czone}"))

    def stat(self, czone: int) -> dict[str, int]:
        return parse_fields(self.ask(f"stat {czone}"))

    def close(self) -> None:
        """Ask the agent to quit (it kills its containers); idempotent."""
        if self._chan.closed:
            return
        try:
            self._chan.sendall(b"quit\n")
            self._chan.shutdown_write()
            self._chan.status_event.wait(10)
        except (OSError, paramiko.SSHException):
            pass
        finally:
            self._chan.close()

    def __enter__(self) -> GuestAgent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
