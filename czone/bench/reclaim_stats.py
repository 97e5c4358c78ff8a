"""The reclaim benchmark's pure parts: sizes, the plan, samples and their summaries.

Nothing here boots a VM or touches memory (``shrink_steps`` gets its device,
RSS and clock as functions), so the unit tests cover it with fakes.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from czone.bench.report import median

MiB = 1 << 20
SIZES = (64, 256, 1024)
REPS = 3
LARGE_MIB = 1024
BLOCK_MIB = 2
SLACK_MIB = 256
CAP_SLACK_MIB = 4
SPEEDUP_TARGET = 20.0
RAW_FACTOR = 1.3
COMPLETE_TARGET = 0.99

# case -> row label, in table order
LABELS = {
    "czone": "CZone destroy",
    "czone_warm": "CZone destroy, the second in the VM",
    "vmem_shrink": "virtio-mem shrink by S",
    "vmem_until": "virtio-mem shrink until RSS fell by S",
    "fpr": "balloon free page reporting",
    "inflate": "balloon inflate by S",
    "memfd": "raw memfd punch, one hole, before the destroy",
    "memfd_after": "raw memfd punch, one hole, after the destroy",
    "memfd_2m": "raw memfd punch, 2 MiB holes, before the destroy",
    "memfd_2m_after": "raw memfd punch, 2 MiB holes, after the destroy",
    "anon": "raw anon MADV_DONTNEED",
}
RAW_CASES = ("memfd", "memfd_after", "memfd_2m", "memfd_2m_after", "anon")
NOTHING = 0.01          # returned less than this share of the container: nothing


@dataclass
class Sample:
    """One measured give-back: host RSS before and after, and how long it took."""

    latency_s: float
    before: int
    after: int
    resident: int                      # bytes the dying container touched
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.resident <= 0:
            raise ValueError(f"resident bytes must be positive, not {self.resident}")

    @property
    def returned(self) -> int:
        return self.before - self.after

    @property
    def completeness(self) -> float:
        return self.returned / self.resident

    def as_dict(self) -> dict[str, Any]:
        return {"latency_s": self.latency_s, "before": self.before, "after": self.after,
                "resident": self.resident, "returned": self.returned,
                "completeness": self.completeness, **self.extra}


def check_size(size_mib: int) -> int:
    if size_mib <= 0 or size_mib % BLOCK_MIB:
        raise ValueError(f"container size {size_mib} MiB must be a positive multiple "
                         f"of {BLOCK_MIB} MiB")
    return size_mib


def device_mib(size_mib: int) -> int:
    """Hot-pluggable memory for four containers plus slack."""
    return 4 * check_size(size_mib) + SLACK_MIB


def cap_mib(size_mib: int) -> int:
    """A CZone cap: the container, its stack and page-ins, in whole 2 MiB chunks."""
    return check_size(size_mib) + CAP_SLACK_MIB


def step_mib(size_mib: int) -> int:
    """virtio-mem shrink step: a quarter of the container, whole blocks, at least one."""
    quarter = check_size(size_mib) // 4
    return max(BLOCK_MIB, quarter - quarter % BLOCK_MIB)


def shrink_steps(start_mib: int, step: int, enough: Callable[[], bool],
                 resize: Callable[[int], bool], deadline: float,
                 clock: Callable[[], float] = time.monotonic) -> tuple[int, str]:
    """Lower a requested size by ``step`` until ``enough()``; returns (size, why it stopped).

    ``resize(mib)`` asks for a size and returns False if the device did not get there.
    """
    if step <= 0:
        raise ValueError(f"shrink step must be positive, not {step}")
    requested = start_mib
    while not enough():
        if requested == 0:
            return requested, "device empty"
        if clock() > deadline:
            return requested, "time limit"
        requested = max(0, requested - step)
        if not resize(requested):
            return requested, "device did not shrink"
    return requested, "reached"


def env_int(env: Mapping[str, str], name: str, default: int) -> int:
    text = env.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{name}={text!r} is not an integer") from None
    if value <= 0:
        raise ValueError(f"{name}={value} must be positive")
    return value


def plan(env: Mapping[str, str]) -> dict[int, int]:
    """Size (MiB) -> repetitions, from CZONE_RECLAIM_SIZES / _REPS / _LARGE_REPS."""
    text = env.get("CZONE_RECLAIM_SIZES", "").strip()
    try:
        sizes = [int(s) for s in text.split(",")] if text else list(SIZES)
    except ValueError:
        raise ValueError(f"CZONE_RECLAIM_SIZES={text!r}: want MiB like 64,256,1024") from None
    for s in sizes:
        check_size(s)
    reps = env_int(env, "CZONE_RECLAIM_REPS", REPS)
    large = min(reps, env_int(env, "CZONE_RECLAIM_LARGE_REPS", reps))
    return {s: large if s >= LARGE_MIB else reps for s in sizes}


# -- pure summaries ----------------------------------------------------------

def raw_budget(raw_s: float, fixed_s: float) -> float:
    """How long a destroy of the bytes a raw punch freed in ``raw_s`` may take."""
    return RAW_FACTOR * raw_s + fixed_s


def median_round(rounds: list[tuple[Sample, Sample, Sample]],
                 fixed_s: float) -> tuple[Sample, Sample, Sample]:
    """Of a repetition's warm rounds (destroy, one-hole punch before, after), the
    one whose excess over its own budget is the median: the upper middle one for
    an even count, so that a tie never favours the faster.  Its destroy keeps
    every round's figures in ``extra["rounds"]``."""
    if not rounds:
        raise ValueError("no warm rounds to choose from")
    table = []
    for warm, before, after in rounds:
        raw = (before.latency_s + after.latency_s) / 2
        budget = raw_budget(raw, fixed_s)
        table.append({"destroy_s": warm.latency_s, "raw_s": raw, "budget_s": budget,
                      "met": warm.latency_s <= budget})
    order = sorted(range(len(table)), key=lambda i: table[i]["destroy_s"] - table[i]["budget_s"])
    pick = order[len(order) // 2]
    warm, before, after = rounds[pick]
    warm.extra |= {"rounds": table, "median_round": pick}
    return warm, before, after


def rep_ratios(rep: Mapping[str, Sample]) -> dict[str, Any]:
    """The side-by-side comparisons of one repetition."""
    cz, warm, until = rep["czone"], rep["czone_warm"], rep["vmem_until"]
    # a CZone's chunks lie side by side: its bytes go back in one punch
    raw = (rep["memfd"].latency_s + rep["memfd_after"].latency_s) / 2
    # samples from before 2026-12-01 08:30 knew only the empty destroy
    fixed = cz.extra.get("one_chunk_destroy_s", cz.extra["empty_destroy_s"])
    budget = raw_budget(raw, fixed)
    return {
        # both cold: the first shrink and the first destroy in their VMs
        "speedup_vs_vmem": until.latency_s / cz.latency_s if cz.latency_s else float("inf"),
        "vmem_reached": until.extra.get("stopped") == "reached",
        "czone_vs_raw": warm.latency_s / raw if raw else float("inf"),
        "cold_vs_raw": cz.latency_s / raw if raw else float("inf"),
        "raw_s": raw,
        "raw_budget_s": budget,
        "over_raw_budget_s": warm.latency_s - budget,
        "raw_budget_met": warm.latency_s <= budget,
        "fixed_guest_s": fixed,
        "empty_destroy_s": cz.extra["empty_destroy_s"],
        "stat_round_trip_s": cz.extra["stat_round_trip_s"],
        "destroy_in_guest_s": warm.extra["destroy"]["ns"] / 1e9,
        "completeness": min(cz.completeness, warm.completeness),
        # samples from before the warm rounds had one round per repetition
        "rounds": len(warm.extra.get("rounds", [None])),
        "rounds_met": (sum(r["met"] for r in warm.extra["rounds"])
                       if "rounds" in warm.extra else int(warm.latency_s <= budget)),
    }


def summarize(reps: list[Mapping[str, Sample]]) -> dict[str, Any]:
    """Medians over repetitions of each case and of each per-repetition ratio."""
    if not reps:
        raise ValueError("no repetitions to summarize")
    out: dict[str, Any] = {"n": len(reps), "cases": {}, "ratios": {}}
    for case in LABELS:
        ss = [r[case] for r in reps]
        lat = [s.latency_s for s in ss]
        out["cases"][case] = {"latency_s": median(lat), "spread_s": (min(lat), max(lat)),
                              "returned": median([s.returned for s in ss]),
                              "completeness": median([s.completeness for s in ss])}
    ratios = [rep_ratios(r) for r in reps]
    out["per_rep"] = ratios
    for key, value in ratios[0].items():
        vals = [r[key] for r in ratios]
        # a flag holds only if it held in every repetition
        out["ratios"][key] = all(vals) if isinstance(value, bool) else median(vals)
    out["spread"] = {key: (min(r[key] for r in ratios), max(r[key] for r in ratios))
                     for key in ("speedup_vs_vmem", "czone_vs_raw")}
    out["met_reps"] = sum(r["raw_budget_met"] for r in ratios)
    out["met_rounds"] = sum(r["rounds_met"] for r in ratios)
    out["rounds"] = sum(r["rounds"] for r in ratios)
    out["notes"] = {case: notes(case, [r[case] for r in reps]) for case in LABELS}
    return out


def notes(case: str, ss: list[Sample]) -> str:
    """What a case's median hides: how virtio-mem stopped, what the guest reported."""
    x = [s.extra for s in ss]
    if case in ("czone", "czone_warm"):
        lo, hi = (f(e["destroy"]["released"] for e in x) for f in (min, max))
        text = (f"{median([e['destroy']['ns'] / 1e6 for e in x]):.1f} ms in the guest, "
                f"{lo if lo == hi else f'{lo}-{hi}'} chunks, "
                f"{sum(e['destroy']['migrated'] for e in x)} pages migrated")
        if all("unplug_requests" in e["destroy"] for e in x):
            reqs = "/".join(str(e["destroy"]["unplug_requests"]) for e in x)
            text += f", UNPLUG requests per repetition {reqs}"
        return text
    if case == "vmem_shrink":
        missed = sum(not e.get("reached", True) for e in x)
        return (f"device shrunk after {median([e['done_s'] * 1e3 for e in x]):.0f} ms"
                + (f"; did not reach the size in {missed} repetition(s)" if missed else ""))
    if case == "vmem_until":
        stops = sorted({e["stopped"] for e in x})
        text = (f"{'/'.join(stops)} at {statistics.median_low([e['requested_mib'] for e in x])}"
                f" MiB, steps of {x[0]['step_mib']} MiB")
        if all("steps" in e and "qmp_rtt_s" in e for e in x):
            # each step: a QMP request, then the size polled every 20 ms
            text += (f"; harness: {statistics.median_low([e['steps'] for e in x])} steps x "
                     f"(QMP {median([e['qmp_rtt_s'] * 1e3 for e in x]):.1f} ms + up to 20 ms "
                     "polling)")
        return text
    if case == "fpr":
        return f"watched for {x[0]['window_s']:.0f} s after the kill"
    if case == "inflate":
        return "after the reporting window, same VM"
    return (f"host process beside the CZone VM; the call returned after "
            f"{median([e['call_s'] * 1e3 for e in x]):.1f} ms")


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def case_rows(size: int, summary: Mapping[str, Any]) -> list[list[Any]]:
    """A case that gave nothing back has no latency: n/a, never 0.00."""
    rows = []
    for c, v in summary["cases"].items():
        gave = v["completeness"] >= NOTHING
        lo, hi = v["spread_s"]
        rows.append([size, LABELS[c], summary["n"], ms(v["latency_s"]) if gave else "n/a",
                     f"{ms(lo)}-{ms(hi)}" if gave else "n/a", v["returned"] / MiB,
                     v["completeness"] * 100, summary["notes"][c]])
    return rows


def ratio_row(size: int, summary: Mapping[str, Any]) -> list[Any]:
    r, sp = summary["ratios"], summary["spread"]
    lo, hi = sp["speedup_vs_vmem"]
    speedup = (f"{r['speedup_vs_vmem']:.1f} [{lo:.1f}-{hi:.1f}]"
               + ("" if r["vmem_reached"] else " (lower bound)"))
    lo, hi = sp["czone_vs_raw"]
    return [size, speedup, f"{r['czone_vs_raw']:.2f} [{lo:.2f}-{hi:.2f}]",
            f"{r['cold_vs_raw']:.2f}", summary["cases"]["czone_warm"]["latency_s"] * 1e3,
            r["raw_budget_s"] * 1e3, r["fixed_guest_s"] * 1e3, r["empty_destroy_s"] * 1e3,
            r["stat_round_trip_s"] * 1e3,
            r["destroy_in_guest_s"] * 1e3, r["completeness"] * 100]


def verdicts(summaries: Mapping[int, Mapping[str, Any]]) -> list[str]:
    out = []
    for size, s in summaries.items():
        r = s["ratios"]
        out.append(f"{size} MiB: speedup vs virtio-mem "
                   f"{'met' if r['speedup_vs_vmem'] >= SPEEDUP_TARGET else 'MISSED'}; "
                   f"within {RAW_FACTOR:g} x raw + fixed guest cost in every repetition "
                   f"{'met' if r['raw_budget_met'] else 'MISSED'} "
                   f"({s['met_reps']} of {s['n']}; single warm destroys "
                   f"{s['met_rounds']} of {s['rounds']}); "
                   f"completeness {'met' if r['completeness'] >= COMPLETE_TARGET else 'MISSED'}")
    return out
