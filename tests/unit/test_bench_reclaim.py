"""The reclaim benchmark's pure parts, its raw host discard, and its report (no VM)."""

from __future__ import annotations

import itertools
import mmap
import time

import pytest

from czone.bench import reclaim, reclaim_raw
from czone.bench.reclaim_stats import (
    LABELS,
    MiB,
    Sample,
    cap_mib,
    device_mib,
    median_round,
    plan,
    rep_ratios,
    shrink_steps,
    step_mib,
    summarize,
    verdicts,
)


def test_sizes() -> None:
    assert device_mib(64) == 4 * 64 + 256
    assert cap_mib(256) == 260 and cap_mib(256) % 2 == 0
    assert step_mib(1024) == 256
    assert step_mib(64) == 16
    assert step_mib(4) == 2       # at least one 2 MiB block
    assert step_mib(12) == 2      # a quarter rounded down to whole blocks
    for bad in (0, -2, 3):
        with pytest.raises(ValueError, match="multiple of 2 MiB"):
            device_mib(bad)


def test_plan_defaults_and_overrides() -> None:
    assert plan({}) == {64: 3, 256: 3, 1024: 3}
    assert plan({"CZONE_RECLAIM_REPS": "2"}) == {64: 2, 256: 2, 1024: 2}
    assert plan({"CZONE_RECLAIM_LARGE_REPS": "1"}) == {64: 3, 256: 3, 1024: 1}
    # the large sizes never get more repetitions than the others
    assert plan({"CZONE_RECLAIM_REPS": "1", "CZONE_RECLAIM_LARGE_REPS": "5"})[1024] == 1
    assert plan({"CZONE_RECLAIM_SIZES": "64, 2048"}) == {64: 3, 2048: 3}


@pytest.mark.parametrize("env, match", [
    ({"CZONE_RECLAIM_REPS": "three"}, "not an integer"),
    ({"CZONE_RECLAIM_REPS": "0"}, "must be positive"),
    ({"CZONE_RECLAIM_SIZES": "64,big"}, "want MiB like"),
    ({"CZONE_RECLAIM_SIZES": "65"}, "multiple of 2 MiB"),
])
def test_plan_rejects_bad_input(env: dict[str, str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        plan(env)


def test_sample_figures() -> None:
    s = Sample(0.5, before=1000 * MiB, after=900 * MiB, resident=100 * MiB, extra={"x": 1})
    assert s.returned == 100 * MiB and s.completeness == 1.0
    assert s.as_dict()["x"] == 1 and s.as_dict()["returned"] == 100 * MiB
    with pytest.raises(ValueError, match="resident"):
        Sample(0.1, 1, 1, 0)


class FakeDevice:
    """A virtio-mem device whose RSS falls only below ``floor`` MiB of requested size."""

    def __init__(self, floor: int, stuck_at: int = -1):
        self.size, self.floor, self.stuck_at, self.asked = 1000, floor, stuck_at, []

    def resize(self, mib: int) -> bool:
        self.asked.append(mib)
        if mib < self.stuck_at:
            return False
        self.size = mib
        return True

    def dropped(self) -> int:
        return max(0, self.floor - self.size)


def test_shrink_steps_until_enough() -> None:
    dev = FakeDevice(floor=900)
    got = shrink_steps(1000, 50, enough=lambda: dev.dropped() >= 100, resize=dev.resize,
                       deadline=10, clock=lambda: 0)
    assert got == (800, "reached")
    assert dev.asked == [950, 900, 850, 800]


def test_shrink_steps_stops_honestly() -> None:
    dev = FakeDevice(floor=900, stuck_at=920)
    assert shrink_steps(1000, 50, lambda: dev.dropped() >= 100, dev.resize, 10,
                        lambda: 0) == (900, "device did not shrink")
    ticks = itertools.count()
    dev = FakeDevice(floor=0)
    assert shrink_steps(1000, 50, lambda: False, dev.resize, deadline=3,
                        clock=lambda: next(ticks)) == (800, "time limit")
    assert shrink_steps(60, 50, lambda: False, FakeDevice(0).resize, 10,
                        lambda: 0) == (0, "device empty")
    assert shrink_steps(1000, 50, lambda: True, dev.resize, 10, lambda: 0) == (1000, "reached")
    with pytest.raises(ValueError, match="step"):
        shrink_steps(1000, 0, lambda: False, dev.resize, 10, lambda: 0)


def fake_rep(czone_s: float = 0.02, until_s: float = 2.0, memfd_s: float = 0.005,
             stopped: str = "reached") -> dict[str, Sample]:
    def s(lat: float, returned_mib: int, **extra: object) -> Sample:
        return Sample(lat, 1000 * MiB, (1000 - returned_mib) * MiB, 64 * MiB,
                      {"done_s": lat, **extra})
    rep = {case: s(0.01, 64) for case in LABELS}
    rep["czone"] = s(czone_s, 64, stat_round_trip_s=0.0005, empty_destroy_s=0.001,
                     destroy={"released": 33, "migrated": 0, "failed": 0, "ns": 25_000_000})
    rep["czone_warm"] = s(czone_s, 64, stat_round_trip_s=0.0005, empty_destroy_s=0.001,
                          destroy={"released": 33, "migrated": 0, "failed": 0,
                                   "ns": 15_000_000})
    rep["vmem_shrink"] = s(0.1, 0, requested_mib=448)
    rep["vmem_until"] = s(until_s, 64, requested_mib=192, stopped=stopped, step_mib=16)
    rep["fpr"] = s(0.0, 0, window_s=20.0)
    rep["memfd_2m"] = s(0.001, 64, call_s=0.004)
    for case in ("memfd", "memfd_after", "memfd_2m_after", "anon"):
        rep[case] = s(memfd_s, 64, call_s=memfd_s)
    return rep


def test_rep_ratios() -> None:
    rep = fake_rep()
    # raw is the mean of the one-hole punches that bracket the destroy
    rep["memfd"] = Sample(0.004, 1000 * MiB, 936 * MiB, 64 * MiB, {"call_s": 0.004})
    rep["memfd_after"] = Sample(0.006, 1000 * MiB, 936 * MiB, 64 * MiB, {"call_s": 0.006})
    r = rep_ratios(rep)
    assert r["speedup_vs_vmem"] == pytest.approx(100)
    assert r["cold_vs_raw"] == pytest.approx(4)
    # the budget is the second destroy's; the speedup is the first's
    rep["czone"] = Sample(0.04, 1000 * MiB, 936 * MiB, 64 * MiB, rep["czone"].extra)
    assert rep_ratios(rep)["raw_budget_met"] is False
    assert rep_ratios(rep)["speedup_vs_vmem"] == pytest.approx(50)
    rep["czone_warm"] = Sample(0.007, 1000 * MiB, 936 * MiB, 64 * MiB, rep["czone_warm"].extra)
    assert rep_ratios(rep)["raw_budget_met"] is True
    rep["czone"] = Sample(0.02, 1000 * MiB, 936 * MiB, 64 * MiB, rep["czone"].extra)
    rep["czone_warm"] = Sample(0.02, 1000 * MiB, 936 * MiB, 64 * MiB, rep["czone_warm"].extra)
    assert r["czone_vs_raw"] == pytest.approx(4)
    assert r["raw_budget_s"] == pytest.approx(0.0075)
    assert r["over_raw_budget_s"] == pytest.approx(0.0125)
    assert r["raw_budget_met"] is False
    assert r["destroy_in_guest_s"] == pytest.approx(0.015)
    # the fixed cost is the one-chunk destroy's where it was measured
    rep["czone"].extra["one_chunk_destroy_s"] = 0.003
    r2 = rep_ratios(rep)
    assert r2["raw_budget_s"] == pytest.approx(1.3 * 0.005 + 0.003)
    assert (r2["fixed_guest_s"], r2["empty_destroy_s"]) == (0.003, 0.001)
    assert r["completeness"] == 1.0 and r["vmem_reached"]


def warm(lat: float) -> Sample:
    return Sample(lat, 1000 * MiB, 936 * MiB, 64 * MiB, {"destroy": {"ns": 1}})


def test_median_round_takes_the_median_excess_over_each_round_s_own_budget() -> None:
    # (destroy, raw before, raw after): budgets 1.3 x 10 + 1 = 14, 1.3 x 20 + 1 = 27, 14
    rounds = [(warm(0.020), warm(0.010), warm(0.010)),     # excess +6 ms, the slowest
              (warm(0.025), warm(0.018), warm(0.022)),     # -2 ms, the median
              (warm(0.010), warm(0.010), warm(0.010))]     # -4 ms
    got, before, after = median_round(rounds, 0.001)
    assert got is rounds[1][0] and (before, after) == rounds[1][1:]
    assert got.extra["median_round"] == 1
    assert [r["met"] for r in got.extra["rounds"]] == [False, True, True]
    assert got.extra["rounds"][1]["budget_s"] == pytest.approx(0.027)
    # an even count takes the upper middle: a tie never favours the faster round
    got, _, _ = median_round(rounds[:2], 0.001)
    assert got is rounds[0][0]
    rep = fake_rep()
    rep["czone_warm"], rep["memfd"], rep["memfd_after"] = median_round(
        [(rep["czone_warm"], rep["memfd"], rep["memfd_after"]),
         (warm(0.5), warm(0.005), warm(0.005))], 0.001)
    r = rep_ratios(rep)
    assert (r["rounds"], r["rounds_met"], r["raw_budget_met"]) == (2, 0, False)
    with pytest.raises(ValueError, match="no warm rounds"):
        median_round([], 0.001)


def test_summary_takes_medians_and_keeps_flags_strict() -> None:
    reps = [fake_rep(czone_s=0.02), fake_rep(czone_s=0.04, stopped="time limit"),
            fake_rep(czone_s=0.01)]
    s = summarize(reps)
    assert s["n"] == 3
    assert s["cases"]["czone"]["latency_s"] == pytest.approx(0.02)
    assert s["ratios"]["speedup_vs_vmem"] == pytest.approx(100)
    assert s["ratios"]["vmem_reached"] is False
    assert "reached/time limit at 192 MiB" in s["notes"]["vmem_until"]
    assert "harness" not in s["notes"]["vmem_until"], "older samples: no harness figure"
    for r in reps:
        r["vmem_until"].extra |= {"steps": 4, "qmp_rtt_s": 0.002}
    assert summarize(reps)["notes"]["vmem_until"].endswith(
        "; harness: 4 steps x (QMP 2.0 ms + up to 20 ms polling)")
    assert s["notes"]["vmem_shrink"] == "device shrunk after 100 ms"
    assert s["notes"]["czone"] == "25.0 ms in the guest, 33 chunks, 0 pages migrated"
    assert s["notes"]["czone_warm"] == "15.0 ms in the guest, 33 chunks, 0 pages migrated"
    reps[0]["czone"].extra["destroy"] = {**reps[0]["czone"].extra["destroy"], "released": 32}
    assert "32-33 chunks" in summarize(reps)["notes"]["czone"]
    for n, r in enumerate(reps):
        r["czone_warm"].extra["destroy"] = {**r["czone_warm"].extra["destroy"],
                                            "unplug_requests": n + 1}
    assert summarize(reps)["notes"]["czone_warm"].endswith(
        ", UNPLUG requests per repetition 1/2/3")
    reps[1]["vmem_shrink"].extra["reached"] = False
    assert "did not reach the size in 1 repetition(s)" in summarize(reps)["notes"]["vmem_shrink"]
    with pytest.raises(ValueError):
        summarize([])


def test_verdicts_and_report_table() -> None:
    good = summarize([fake_rep(czone_s=0.007)])
    slow = summarize([fake_rep(czone_s=0.5, until_s=1.0)])
    v = verdicts({64: good, 1024: slow})
    assert v[0] == ("64 MiB: speedup vs virtio-mem met; within 1.3 x raw + fixed guest cost "
                    "in every repetition met (1 of 1; single warm destroys 1 of 1); "
                    "completeness met")
    assert "speedup vs virtio-mem MISSED" in v[1] and "every repetition MISSED" in v[1]
    # one repetition over the budget is a miss, whatever the median says
    mixed = summarize([fake_rep(czone_s=0.007), fake_rep(czone_s=0.007), fake_rep(czone_s=0.009)])
    assert mixed["ratios"]["over_raw_budget_s"] < 0
    assert "every repetition MISSED (2 of 3; single warm destroys 2 of 3)" in verdicts(
        {64: mixed})[0]
    text = reclaim.render("tcg", "KVM probe failed", {64: 3, 1024: 1}, {64: good, 1024: slow})
    assert "1024 MiB: 1 repetition(s)" in text
    assert "| 64 | CZone destroy | 1 | 7.00 | 7.00-7.00 | 64.00 | 100.00 |" in text
    # free page reporting gave nothing back in the fake: no latency, not 0.00
    assert "| 64 | balloon free page reporting | 1 | n/a | n/a | 0.00 | 0.00 |" in text
    assert "| 64 | 285.7 [285.7-285.7] | 1.40 [1.40-1.40] |" in text
    assert "(lower bound)" not in text


def test_raw_discards_give_back_what_was_touched() -> None:
    for sample in (reclaim_raw.memfd_punch(8), reclaim_raw.memfd_punch(8, 2),
                   reclaim_raw.anon_dontneed(8)):
        assert sample.resident == 8 * MiB
        assert sample.completeness > 0.95
    with pytest.raises(ValueError, match="piece_mib"):
        reclaim_raw.memfd_punch(8, -2)


def test_raw_latency_is_until_rss_stopped_moving() -> None:
    """The VM cases' definition: a discard that frees late is timed until it freed."""
    spans: list[float] = []

    with mmap.mmap(-1, 64 * MiB, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS) as m:
        def discard() -> None:
            t = time.monotonic()
            time.sleep(0.05)
            m.madvise(mmap.MADV_DONTNEED)
            spans.append(time.monotonic() - t)

        sample = reclaim_raw.timed(64 * MiB, discard, m)
    assert sample.returned >= 60 * MiB
    assert 0.05 <= sample.latency_s <= spans[0] + 0.02, (sample.latency_s, spans)
    assert sample.extra["call_s"] >= spans[0]
