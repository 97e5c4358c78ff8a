"""An SSH connection dropped mid-operation: one retry, then one clear error."""

from __future__ import annotations

import pytest

from czone import service as service_mod
from czone.guest.runtime import AgentLost
from czone.service import Service, ServiceError


class FlakyAgent:
    def __init__(self, failures: int):
        self.failures = failures
        self.calls = 0

    def list(self) -> list[str]:
        self.calls += 1
        if self.calls <= self.failures:
            raise AgentLost("agent: connection closed during 'list'")
        return ["c1"]


@pytest.fixture
def svc(monkeypatch: pytest.MonkeyPatch, tmp_path) -> Service:
    s = Service(db=service_mod.StateDB(tmp_path))
    monkeypatch.setattr(service_mod, "status", lambda rec: "running")
    monkeypatch.setattr(s.db, "get", lambda name: object())
    return s


def use(svc: Service, monkeypatch: pytest.MonkeyPatch, agent: FlakyAgent) -> list[str]:
    dropped: list[str] = []
    monkeypatch.setattr(svc, "agent", lambda vm: agent)
    monkeypatch.setattr(svc, "_drop_agent", dropped.append)
    return dropped


def test_a_dropped_connection_is_reopened_once(svc: Service,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    agent = FlakyAgent(failures=1)
    dropped = use(svc, monkeypatch, agent)
    assert svc.ask("vm1", lambda a: a.list()) == ["c1"]
    assert agent.calls == 2 and dropped == ["vm1"]


def test_a_second_drop_is_one_clear_error(svc: Service,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    agent = FlakyAgent(failures=2)
    use(svc, monkeypatch, agent)
    with pytest.raises(ServiceError, match="agent unreachable after a retry"):
        svc.ask("vm1", lambda a: a.list())
    assert agent.calls == 2


def test_no_retry_where_repeating_could_do_it_twice(svc: Service,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    agent = FlakyAgent(failures=1)
    use(svc, monkeypatch, agent)
    with pytest.raises(ServiceError, match="connection closed"):
        svc.ask("vm1", lambda a: a.list(), retry=False)
    assert agent.calls == 1
