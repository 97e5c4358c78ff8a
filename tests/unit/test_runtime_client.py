"""czone.guest.runtime.RuntimeAgent against a scripted peer on a socketpair."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from czone.guest.runtime import AgentError, AgentLost, RuntimeAgent


class FakeSsh:
    def __init__(self, chan: socket.socket):
        self.chan = chan

    def forward(self, port: int) -> socket.socket:
        assert port == 7101
        return self.chan


def peer(replies: list[bytes | None]) -> tuple[RuntimeAgent, list[dict]]:
    """An agent whose peer answers each request with the next reply (None: hang up)."""
    ours, theirs = socket.socketpair()
    seen: list[dict] = []

    def serve() -> None:
        f = theirs.makefile("rb")
        for reply in replies:
            line = f.readline()
            if not line:
                break
            seen.append(json.loads(line))
            if reply is None:
                break
            # In two pieces: a reply is a line, however the stream cuts it.
            try:
                theirs.sendall(reply[:7])
                time.sleep(0.01)
                if reply[7:]:
                    theirs.sendall(reply[7:])
            except OSError:  # the client gave up on a bad reply
                break
        theirs.close()

    threading.Thread(target=serve, daemon=True).start()
    return RuntimeAgent(FakeSsh(ours), timeout=5), seen  # type: ignore[arg-type]


def test_a_reply_comes_back_without_ok_and_requests_carry_their_arguments() -> None:
    agent, seen = peer([b'{"ok": true, "czone": 3, "t": {"agent_ms": 1.5}}\n'])
    assert agent.start("c1", "matmul", 128) == {"czone": 3, "t": {"agent_ms": 1.5}}
    assert seen == [{"op": "start", "id": "c1", "fn": "matmul", "memory_mib": 128}]


def test_a_reply_split_over_several_packets_is_one_reply() -> None:
    agent, _ = peer([b'{"ok": true, "containers": [1, 2]}\n', b'{"ok": true, "x": 1}\n'])
    assert agent.list() == [1, 2]
    assert agent.call("hello") == {"x": 1}


def test_an_error_reply_raises_with_errno_and_detail() -> None:
    agent, _ = peer([b'{"ok": false, "errno": "EIO", "error": "failed to start", '
                     b'"detail": "crun: bad config"}\n'])
    with pytest.raises(AgentError) as e:
        agent.start("c1", "matmul", 64)
    assert e.value.errno_name == "EIO"
    assert "crun: bad config" in str(e.value) and "failed to start" in str(e.value)


@pytest.mark.parametrize("reply, text", [
    (None, "connection closed"),
    (b"not json\n", "malformed reply"),
    (b"[1]\n", "malformed reply"),
])
def test_a_broken_peer_is_agent_lost(reply: bytes | None, text: str) -> None:
    agent, _ = peer([reply])
    with pytest.raises(AgentLost, match=text):
        agent.list()


def test_a_silent_peer_times_out() -> None:
    ours, theirs = socket.socketpair()
    agent = RuntimeAgent(FakeSsh(ours), timeout=0.3)  # type: ignore[arg-type]
    with pytest.raises(AgentLost, match="no answer"):
        agent.list()
    theirs.close()
