"""results/: the report and the plots from scenario results (no VM)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from czone.bench import results, runtime

MiB = 1 << 20
PROV = {"date": "2026-11-30 08:00 UTC", "kernel": "k1", "qemu": "q1", "image": "i1",
        "accel": "tcg", "command": "make bench QUICK=1"}


def fake_results(tmp_path: Path) -> dict[str, Any]:
    log = tmp_path / "replay-mcpv-czone.jsonl"
    log.write_text("\n".join(json.dumps(r) for r in [
        {"kind": "inv", "cold": True, "ok": True, "startup_s": 0.5},
        {"kind": "inv", "cold": False, "ok": True}]))

    def summary(mt: float | None) -> dict[str, Any]:
        return {"invocations": 2, "failed": 0, "cold_fraction": 0.5, "memory_time_gib_s": mt,
                "e2e_p50_s": 0.1, "e2e_p99_s": 0.5}

    runtime_summary = runtime.summarize({"matmul": {"patched": [101.0, 110.0, 90.0],
                                                    "stock": [100.0, 100.0, 95.0, None]}})
    return {
        "runtime": {"kernels": {"patched": "p", "stock": "s"}, "provenance": PROV,
                    "summary": runtime_summary},
        "startup": {"fn": "float_operation", "k": 3, "provenance": PROV,
                    "modes": {"mcpv": [2.0, 0.1, 0.2], "scpv-template": [3.0, 1.0, 2.0],
                              "scpv-snapshot": [None, None, None]}},
        # JSON keys are strings
        "footprint": {"ns": [1, 2], "provenance": PROV, "modes": {
            "mcpv": {"1": {"vms": 1, "pss": 300 * MiB, "code_cache_pss": 50 * MiB},
                     "2": {"vms": 1, "pss": 400 * MiB, "code_cache_pss": 50 * MiB}},
            "scpv-template": {"1": {"vms": 1, "pss": 250 * MiB, "code_cache_pss": 50 * MiB},
                              "2": {"vms": 2, "pss": 800 * MiB, "code_cache_pss": 100 * MiB}}}},
        "replay": {"params": {"functions": 3, "minutes": 3, "speedup": 6.0, "keep_alive": 5.0},
                   "events": 2, "source": "synthetic",
                   "provenance": PROV, "modes": {
                       "mcpv-czone": {"summary": summary(1.0), "log": str(log),
                                      "memory": [[0, 1, 100 * MiB], [1, 1, 120 * MiB]],
                                      "cold_starts": [0.5]},
                       "scpv-template": {"summary": summary(4.0), "log": str(tmp_path / "no"),
                                         "memory": []},
                       "mcpv-balloon": {"summary": summary(2.0), "log": "", "memory": []},
                       "mcpv-virtio-mem": {"summary": summary(1.6), "log": "", "memory": []},
                       "scpv-snapshot": {"summary": summary(None), "log": "", "memory": []}}},
    }


def test_ratios(tmp_path: Path) -> None:
    r = fake_results(tmp_path)
    ratio, per_k = results.startup_ratio(r["startup"])
    assert ratio == pytest.approx(0.15 / 1.5) and per_k == pytest.approx([0.1, 0.1])
    assert results.footprint_ratio(r["footprint"], 2) == pytest.approx(0.5)
    assert results.footprint_ratio(r["footprint"], 2, code=False) == pytest.approx(350 / 700)
    assert results.footprint_ratio(r["footprint"], 16) is None
    assert results.replay_ratio(r["replay"], "mcpv-czone", "scpv-template") == 0.25
    assert results.replay_ratio(r["replay"], "scpv-snapshot", "scpv-template") is None
    assert results.startup_ratio({"modes": {"mcpv": [1.0]}}) is None


def test_report_states_what_it_measured_and_what_it_did_not(tmp_path: Path) -> None:
    r = fake_results(tmp_path)
    pngs = results.plots(tmp_path, r)
    assert {p.name for p in pngs} == {"memory-over-time.png", "startup-cdf.png",
                                      "footprint.png", "runtime-overhead.png"}
    assert all(p.stat().st_size > 1000 for p in pngs)
    text = results.report(tmp_path, r, PROV, pngs).read_text()
    assert "accelerator **tcg**" in text and "`make bench QUICK=1`" in text
    assert "| MCPV startup into a running VM / scpv-template | <= 0.10x | 0.18x | 0.100" in text
    assert "| footprint at N = 2 / scpv-template | <= 0.08x | about 0.10x | 0.500 (0.500" in text
    assert "| memory-time in the replay / scpv-template | <= 0.25x | - | 0.250 |" in text
    # the best other MCPV mode is the one with the least memory-time
    assert "| memory-time in the replay / best other MCPV mode | <= 0.7x | - | 0.625 " \
        "(against mcpv-virtio-mem) |" in text
    assert "| run-time overhead, patched / stock kernel | <= 1.02x median, <= 1.05x p99 | - | " \
        "1.010 median, 1.100 p99 |" in text
    assert "| matmul | 101.0 | 100.0 | 1.010 | 110.0 | 100.0 | 1.100 | 3 | 1 |" in text
    # a mode whose every start failed says so; no number stands in for it
    assert "| scpv-snapshot | failed | n/a | n/a | 0 (3 failed) |" in text
    assert "| scpv-snapshot | 2 | 0 | 50.0 | n/a | n/a |" in text
    # each footprint row against scpv-template is that row's own mode
    assert "| scpv-template | 2 | 2 | 800 | 700 | 1.000 |" in text
    assert "| mcpv | 2 | 1 | 400 | 350 | 0.500 |" in text
    assert "Scenarios not run: reclaim." in text
    # CZone against each baseline; what was not measured is n/a
    assert "| scpv-template | 0.100 | 0.500 | 0.250 |" in text
    assert "| mcpv-virtio-mem | n/a | n/a | 0.625 |" in text
    assert "| scpv-snapshot | n/a | n/a | n/a |" in text
    assert "![startup-cdf](startup-cdf.png)" in text
    assert text.count("Run 2026-11-30 08:00 UTC, kernel `k1`") == 4


def test_report_of_nothing_says_nothing_was_measured(tmp_path: Path) -> None:
    text = results.report(tmp_path, {}, PROV, []).read_text()
    assert text.count("not measured") == 5, text
    assert "Scenarios not run: startup, footprint, reclaim, runtime, replay." in text


def test_runtime_summary_counts_failures_and_takes_ratios_per_function() -> None:
    s = runtime.summarize({"f": {"patched": [10.0, 12.0, None], "stock": [10.0, 10.0]},
                           "g": {"patched": [None], "stock": [5.0]}})
    f, g = s["functions"]["f"], s["functions"]["g"]
    assert f["patched"] == {"median_ms": 11.0, "p99_ms": 12.0, "n": 2, "failed": 1}
    assert f["median_ratio"] == pytest.approx(1.1) and f["p99_ratio"] == pytest.approx(1.2)
    assert g["median_ratio"] is None, "a function that never answered has no ratio"
    assert s["median_ratio"] == pytest.approx(1.1) and s["spread"] == (1.1, 1.1)


def test_replay_params_from_the_environment() -> None:
    from czone.bench import replay
    assert replay.from_env({}) == replay.FULL
    p = replay.from_env({"CZONE_REPLAY_MINUTES": "10", "CZONE_REPLAY_SPEEDUP": "4"})
    assert (p.minutes, p.speedup, p.functions) == (10, 4.0, 20)
    with pytest.raises(ValueError, match="not a number"):
        replay.from_env({"CZONE_REPLAY_FUNCTIONS": "many"})
    with pytest.raises(ValueError, match="must be positive"):
        replay.from_env({"CZONE_REPLAY_SPEEDUP": "0"})
