"""The trace replay: its keep-alive pool, its summary, and its driver against
a fake service (no VM: the VM tests drive the real one)."""

from __future__ import annotations

import io
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from czone import replay as rp
from czone.errors import CZoneError
from czone.replay_policy import GiB, WarmPool, memory_time, percentile, summarize
from czone.state import StateDB
from czone.trace import Invocation


def test_pool_reuses_the_most_recent_idle_container_of_the_function() -> None:
    p = WarmPool(keep_alive=10)
    assert p.acquire("f") is None
    p.add_busy("a", "f", now=0)
    p.add_busy("b", "f", now=1)
    assert p.acquire("f") is None, "both busy"
    p.release("a", now=2)
    p.release("b", now=3)
    assert p.acquire("g") is None, "another function's container is no use"
    assert p.acquire("f") == "b"
    assert p.acquire("f") == "a"
    with pytest.raises(ValueError):
        p.add_busy("a", "f", now=4)


def test_pool_expires_only_idle_containers_after_keep_alive() -> None:
    p = WarmPool(keep_alive=10)
    p.add_busy("a", "f", now=0)
    p.add_busy("b", "f", now=0)
    p.release("a", now=1)
    assert p.next_expiry() == 11
    assert p.expire(10.9) == []
    assert p.expire(11) == ["a"]
    assert p.expire(100) == [], "b is busy: never expired"
    assert p.all() == ["b"]
    p.drop("b")
    assert p.all() == [] and p.next_expiry() is None
    with pytest.raises(ValueError):
        WarmPool(-1)


def test_memory_time_is_the_area_under_the_samples() -> None:
    assert memory_time([(0, GiB), (2, 2 * GiB), (3, 0)]) == pytest.approx(4.0)
    assert memory_time([(0, GiB)]) == 0


def test_percentile_and_summary_count_failures_and_say_nothing_for_nothing() -> None:
    assert percentile([], 50) is None
    assert percentile([3, 1, 2], 50) == 2
    assert percentile(list(range(1, 101)), 99) == 99
    inv = [{"ok": True, "cold": True, "e2e_s": 2.0, "startup_s": 1.5, "run_ms": 10},
           {"ok": True, "cold": False, "e2e_s": 0.1, "run_ms": 12},
           {"ok": False, "cold": True, "e2e_s": 9.0}]
    s = summarize(inv, [(0, GiB), (10, GiB)])
    assert s["invocations"] == 3 and s["failed"] == 1 and s["cold"] == 2
    assert s["cold_fraction"] == pytest.approx(2 / 3)
    assert s["e2e_p50_s"] == 0.1 and s["e2e_p99_s"] == 2.0, "the failure is not a latency"
    assert s["memory_time_gib_s"] == pytest.approx(10)
    empty = summarize([], [])
    assert empty["e2e_p50_s"] is None and empty["memory_time_gib_s"] is None


@pytest.mark.parametrize("kw, match", [
    ({"mode": "nope"}, "unknown mode"),
    ({"mode": "mcpv-czone", "keep_alive": -1}, "negative"),
    ({"mode": "scpv-template", "reclaim_idle_after": 5}, "needs CZones"),
    ({"mode": "mcpv-balloon", "reclaim_idle_after": 5}, "needs CZones"),
    ({"mode": "mcpv-czone", "workers": 0}, "at least 1"),
])
def test_options_refuse_bad_input(kw: dict[str, Any], match: str) -> None:
    with pytest.raises(rp.ReplayError, match=match):
        rp.Options(**kw)


# -- the driver, against a fake service -------------------------------------

@dataclass
class FakeRun:
    id: str
    vm: str
    startup_s: float
    booted: bool
    warmup: dict[str, Any] = field(default_factory=dict)


@dataclass
class FakeKill:
    returned_bytes: int


class FakeService:
    """Records what the replay asks; a run or invoke takes ``serve_s``."""

    calls: list[tuple[str, str]] = []
    lock = threading.Lock()
    n = 0

    def __init__(self, root: Path, serve_s: float = 0.02, fail_fn: str = ""):
        self.db = StateDB(root)
        self.serve_s, self.fail_fn = serve_s, fail_fn

    def _log(self, op: str, arg: str) -> None:
        with self.lock:
            self.calls.append((op, arg))

    def accel(self) -> tuple[str, str]:
        return "tcg", "fake"

    def run(self, fn: str, mode: str) -> FakeRun:
        self._log("run", fn)
        if fn == self.fail_fn:
            raise CZoneError(f"{fn} would not start")
        time.sleep(self.serve_s)
        with self.lock:
            FakeService.n += 1
            ctr = f"{fn}-{FakeService.n}"
        return FakeRun(ctr, "vm1", self.serve_s, False, {"ok": True, "run_ms": 1.0})

    def invoke(self, ctr: str) -> tuple[dict[str, Any], float]:
        self._log("invoke", ctr)
        time.sleep(self.serve_s)
        return {"ok": True, "run_ms": 1.0}, self.serve_s

    def kill(self, ctr: str) -> FakeKill:
        self._log("kill", ctr)
        return FakeKill(1 << 20)

    def reclaim(self, idle_for: float = 0.0) -> dict[str, Any]:
        self._log("reclaim", str(idle_for))
        return {}

    def close(self) -> None:
        pass


def run_fake(tmp_path: Path, events: list[Invocation], keep_alive: float,
             **kw: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    FakeService.calls = []
    out = io.StringIO()
    fail = kw.pop("fail_fn", "")
    opts = rp.Options("mcpv-czone", keep_alive=keep_alive, sample_interval=0.05, **kw)
    summary = rp.Replay(lambda: FakeService(tmp_path, fail_fn=fail), opts,  # type: ignore
                        out).run(events)
    return summary, [json.loads(line) for line in out.getvalue().splitlines()]


def test_replay_starts_cold_reuses_warm_and_kills_after_keep_alive(tmp_path: Path) -> None:
    ev = [Invocation(0.0, "t1", "matmul"), Invocation(0.2, "t1", "matmul"),
          Invocation(0.25, "t2", "pyaes"), Invocation(0.9, "t1", "matmul")]
    summary, lines = run_fake(tmp_path, ev, keep_alive=0.4)
    inv = [r for r in lines if r["kind"] == "inv"]
    cold = {(r["t"], r["fn"]): r["cold"] for r in inv}
    assert cold == {(0.0, "matmul"): True, (0.2, "matmul"): False, (0.25, "pyaes"): True,
                    (0.9, "matmul"): True}, "the matmul container expired after 0.4 s idle"
    kills = [r for r in lines if r["kind"] == "kill"]
    assert len(kills) == 3 and all(k["returned_bytes"] == 1 << 20 for k in kills)
    assert summary["invocations"] == 4 and summary["cold"] == 3 and summary["failed"] == 0
    assert all(r["e2e_s"] >= 0.02 for r in inv)
    assert any(r["kind"] == "mem" for r in lines) and lines[-1]["kind"] == "summary"


def test_replay_counts_a_failed_start_and_goes_on(tmp_path: Path) -> None:
    ev = [Invocation(0.0, "t1", "matmul"), Invocation(0.05, "t2", "pyaes")]
    summary, lines = run_fake(tmp_path, ev, keep_alive=0.1, fail_fn="matmul")
    bad = [r for r in lines if r["kind"] == "inv" and not r["ok"]]
    assert len(bad) == 1 and "would not start" in bad[0]["error"]
    assert summary["failed"] == 1 and summary["invocations"] == 2


def test_replay_reclaims_idle_czones_periodically(tmp_path: Path) -> None:
    ev = [Invocation(0.0, "t1", "matmul"), Invocation(0.5, "t1", "matmul")]
    run_fake(tmp_path, ev, keep_alive=0.1, reclaim_idle_after=0.2)
    assert sum(1 for op, _ in FakeService.calls if op == "reclaim") >= 3
