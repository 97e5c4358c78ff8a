"""Scenario (e): one sampled trace replayed in every mode, side by side.

The trace is ``$CZONE_TRACE`` (a directory of the Azure 2019 files or a 2021
CSV), else a synthetic diurnal one written in the real formats.  Each mode
runs the same events in a run root of its own, one mode after the other.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from czone import replay as rp
from czone import trace as tr
from czone.bench.report import table
from czone.bench.startup import TB_SIZE_MIB
from czone.bench.startup import _service as bench_service
from czone.service import Service


@dataclass(frozen=True)
class Params:
    functions: int = 20
    minutes: int = 30
    speedup: float = 2.0
    keep_alive: float = 60.0
    reclaim_idle_after: float | None = 30.0
    workers: int = 16
    seed: int = 0
    # serve every trace function with this one of ours (the smoke test: its
    # SCPV templates are the startup scenario's, built once)
    only: str | None = None


def from_env(env: dict[str, str] | None = None) -> Params:
    """FULL, or shortened by CZONE_REPLAY_FUNCTIONS / _MINUTES / _SPEEDUP / _KEEP_ALIVE."""
    e = dict(os.environ if env is None else env)
    kw: dict[str, Any] = {}
    for name, field, cast in (("FUNCTIONS", "functions", int), ("MINUTES", "minutes", int),
                              ("SPEEDUP", "speedup", float), ("KEEP_ALIVE", "keep_alive", float)):
        if text := e.get(f"CZONE_REPLAY_{name}", "").strip():
            try:
                kw[field] = cast(text)
            except ValueError:
                raise ValueError(f"CZONE_REPLAY_{name}={text!r} is not a number") from None
            if kw[field] <= 0:
                raise ValueError(f"CZONE_REPLAY_{name}={text} must be positive")
    return Params(**kw)


FULL = Params()
QUICK = Params(functions=3, minutes=2, speedup=6.0, keep_alive=5.0, reclaim_idle_after=None,
               workers=4, only="float_operation")


def trace_path(work: Path, p: Params) -> tuple[Path, str]:
    if given := os.environ.get("CZONE_TRACE"):
        return Path(given), f"$CZONE_TRACE={given}"
    path = work / "trace"
    tr.generate(path, "diurnal", max(p.functions * 3, 10), p.minutes, p.seed, "2019")
    return path, f"synthetic diurnal, {max(p.functions * 3, 10)} functions, seed {p.seed}"


def run(p: Params | None = None, out_dir: Path | None = None) -> dict[str, Any]:
    p = p or from_env()
    with tempfile.TemporaryDirectory(prefix="czb-replay-") as d:
        work = Path(d)
        path, source = trace_path(work, p)
        plan = tr.plan(path, p.functions, p.seed, p.speedup, 0, p.minutes, "rank")
        events = [e._replace(function=p.only) for e in plan.events] if p.only else plan.events
        print(f"replay: {len(plan.events)} invocations of {len(plan.functions)} functions "
              f"from {source}, {p.minutes} trace-minutes at speedup {p.speedup:g}", flush=True)
        result: dict[str, Any] = {"params": p.__dict__, "source": source,
                                  "events": len(plan.events), "tb_size_mib": TB_SIZE_MIB,
                                  "modes": {}}
        for mode in rp.MODES:
            root = work / mode

            def make(root: Path = root) -> Service:
                return bench_service(root)

            log = (out_dir or work) / f"replay-{mode}.jsonl"
            log.parent.mkdir(parents=True, exist_ok=True)
            log.unlink(missing_ok=True)
            reclaim = p.reclaim_idle_after if mode == "mcpv-czone" else None
            opts = rp.Options(mode, p.keep_alive, reclaim, p.workers)
            summary = rp.replay(make, opts, events, log)
            result["accel"] = make().accel()[0]
            result["modes"][mode] = {"summary": summary, "log": str(log),
                                     "memory": _memory(log), "cold_starts": _cold(log)}
            print(f"  {mode}: {json.dumps(summary, default=str)}", flush=True)
    _print(result)
    return result


def _memory(log: Path) -> list[tuple[float, int, int]]:
    """(t, rss, pss) samples from a replay log, for the plots."""
    out = []
    for line in log.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("kind") == "mem":
            out.append((rec["t"], rec["rss"], rec["pss"]))
    return out


def _cold(log: Path) -> list[float]:
    """Startup latencies of the cold starts that answered, for the CDF."""
    out = []
    for line in log.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("kind") == "inv" and rec.get("cold") and rec.get("ok"):
            out.append(rec["startup_s"])
    return out


def fmt(x: float | None, scale: float = 1.0, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x * scale:.{digits}f}"


def _print(result: dict[str, Any]) -> None:
    rows = []
    for mode, r in result["modes"].items():
        s = r["summary"]
        rows.append([mode, s["invocations"], s["failed"], fmt(s["cold_fraction"], 100, 1),
                     fmt(s["memory_time_gib_s"]), fmt(s["e2e_p50_s"], 1e3, 0),
                     fmt(s["e2e_p99_s"], 1e3, 0)])
    print(table(["mode", "invocations", "failed", "cold (%)", "memory-time (GiB*s)",
                 "e2e p50 (ms)", "e2e p99 (ms)"], rows))
