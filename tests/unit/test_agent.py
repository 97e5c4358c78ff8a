"""GuestAgent's line protocol, against a fake SSH channel."""

from __future__ import annotations

import pytest

from czone.guest.agent import AgentError, GuestAgent, parse_fields


class FakeChannel:
    def __init__(self, answers: dict[str, str]):
        self.answers = answers
        self.sent: list[str] = []
        self.out = b"ready\n"
        self.closed = False

    def settimeout(self, t: float) -> None:
        pass

    def sendall(self, data: bytes) -> None:
        line = data.decode().strip()
        self.sent.append(line)
        if line in self.answers:
            self.out += self.answers[line].encode() + b"\n"

    def recv(self, n: int) -> bytes:
        if not self.out:
            raise TimeoutError
        data, self.out = self.out[:n], self.out[n:]
        return data

    def recv_stderr(self, n: int) -> bytes:
        return b""

    def shutdown_write(self) -> None:
        pass

    class status_event:  # noqa: N801 - mirrors paramiko's attribute
        @staticmethod
        def wait(t: float) -> bool:
            return True

    def close(self) -> None:
        self.closed = True


class FakeSSH:
    def __init__(self, chan: FakeChannel):
        self.chan = chan

    def session(self, cmd: str) -> FakeChannel:
        return self.chan


def agent(answers: dict[str, str]) -> tuple[GuestAgent, FakeChannel]:
    chan = FakeChannel(answers)
    return GuestAgent(FakeSSH(chan), timeout=0.5), chan  # type: ignore[arg-type]


def test_commands_and_answers() -> None:
    ag, chan = agent({"create 256": "ok 7", "spawn c 7 256 nothp": "ok 123",
                      "touch c 200": "ok 204800", "punch c 64": "ok 102400",
                      "destroy 7": "ok released=100 migrated=0 failed=0 ns=5"})
    assert ag.create(256) == 7
    assert ag.spawn("c", 7, 256, thp=False).pid == 123
    assert ag.touch("c", 200) == 204800
    assert ag.punch("c", 64) == 102400
    assert ag.destroy(7) == {"released": 100, "migrated": 0, "failed": 0, "ns": 5}
    ag.close()
    assert chan.sent[-1] == "quit" and chan.closed


def test_err_answers_raise_with_the_errno() -> None:
    ag, _ = agent({"destroy 9": "err ENOENT CZONE_IOC_DESTROY"})
    with pytest.raises(AgentError, match="destroy 9") as e:
        ag.destroy(9)
    assert e.value.errno_name == "ENOENT"


def test_silence_is_a_timeout() -> None:
    ag, _ = agent({})
    with pytest.raises(AgentError, match="no answer"):
        ag.stat(1)


def test_parse_fields_rejects_junk() -> None:
    assert parse_fields(["a=1", "b=22"]) == {"a": 1, "b": 22}
    with pytest.raises(ValueError, match="not key=value"):
        parse_fields(["a"])
