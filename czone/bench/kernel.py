"""CZone kernel: page-fault cost inside vs outside a CZone, destroy vs stock offline."""

from __future__ import annotations

from typing import Any

from czone.bench.guestvm import booted, run, samples
from czone.bench.report import median, table

FAULT_MIB = 256
DESTROY_MIB = (64, 256, 1024)
ROUNDS = 7


def fault(vm: Any) -> tuple[dict[str, Any], str]:
    rows = samples(run(vm, f"czone_bench fault {FAULT_MIB} {ROUNDS}"), "fault")
    out = median([r["outside_ns"] for r in rows])
    warm = median([r["warm_ns"] for r in rows])
    cold = median([r["cold_ns"] for r in rows])
    text = (f"page faults: touching {FAULT_MIB} MiB in 4 KiB pages, {len(rows)} rounds, "
            "medians (ratio = inside / outside, target <= 1.05)\n" + table(
                ["case", "time (ms)", "ratio"],
                [["outside a CZone", out / 1e6, 1.0],
                 ["inside, chunks already in the CZone", warm / 1e6, warm / out],
                 ["inside, chunks taken on demand", cold / 1e6, cold / out]]))
    return {"samples": rows, "ratio_warm": warm / out, "ratio_cold": cold / out}, text


def destroy(vm: Any) -> tuple[dict[str, Any], str]:
    result: dict[str, Any] = {}
    rows = []
    for mib in DESTROY_MIB:
        s = samples(run(vm, f"czone_bench destroy {mib} {ROUNDS}"), "destroy")
        cz = median([r["czone_ns"] for r in s])
        off = median([r["offline_ns"] for r in s])
        blocks = median([r["offline_blocks"] for r in s])
        # a block the stock path could not offline is a failure, shown, never averaged in
        failed = sum(r.get("offline_failed", 0) for r in s)
        result[str(mib)] = {"samples": s, "ratio": cz / off, "offline_failed": failed}
        rows.append([mib, cz / 1e6, median([r["migrated"] for r in s]), off / 1e6,
                     f"{blocks:.0f} x {s[0]['block_mib']} MiB", failed, cz / off])
    text = ("give back a dead container's memory: CZone destroy vs stock offline of the "
            "memory blocks it used, medians\n" + table(
                ["MiB", "CZone destroy (ms)", "pages migrated", "stock offline (ms)",
                 "blocks offlined", "blocks that failed to offline", "ratio"], rows))
    return result, text


def run_all() -> dict[str, Any]:
    with booted("kernel-bench", 2560, "movablecore=1536M") as (vm, accel):
        f, ftext = fault(vm)
        d, dtext = destroy(vm)
    print(f"CZone kernel benchmarks ({accel})\n\n{ftext}\n\n{dtext}")
    return {"accel": accel, "fault": f, "destroy": d}
