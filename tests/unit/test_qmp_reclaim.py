"""``qmp.reclaim`` against a fake monitor: which report answers a request."""

from __future__ import annotations

from typing import Any

import pytest

from czone.qemu import qmp


class FakeMonitor:
    def __init__(self, seq: int, events: list[dict[str, Any]]):
        self.seq, self.events, self.sets = seq, events, []

    def qmp(self, cmd: str, /, **args: Any) -> Any:
        if cmd == "qom-set":
            self.sets.append(args["value"])
            return {}
        return {"seq": self.seq, "czone": 0, "idle-ms": 0}

    def wait_event(self, name: str, timeout: float, **match: Any) -> dict[str, Any]:
        if not self.events:
            raise qmp.QmpTimeout(f"no QMP event {name}")
        return {"event": name, "data": self.events.pop(0)}


def report(seq: int, czones: int = 1) -> dict[str, Any]:
    return {"id": "czdev0", "seq": seq, "czones": czones, "bytes": 4096 * seq}


def test_an_older_report_is_skipped_and_a_newer_one_covers_ours() -> None:
    m = FakeMonitor(2, [report(1), report(3, czones=2)])
    assert qmp.reclaim(m, "czdev0", 5, idle_ms=1500) == {"seq": 3, "czones": 2,
                                                          "bytes": 3 * 4096}
    assert m.sets == [{"czone": 0, "idle-ms": 1500}]


def test_no_report_is_a_timeout() -> None:
    with pytest.raises(qmp.QmpTimeout):
        qmp.reclaim(FakeMonitor(1, [report(0)]), "czdev0", 1)
