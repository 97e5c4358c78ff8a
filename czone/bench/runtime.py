"""Scenario (d): the functions' own run time inside CZones on the patched
kernel, against containers in no CZone on the stock kernel (``make
kernel-stock``: the same source and config without the series).

For each function, one VM per kernel with one container each, both up at
once; invocations alternate between them, so that whatever else the
machine does falls on both alike.  The figure is the function's own
``run_ms`` as its server measures it, not the round trip.
"""

from __future__ import annotations

import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from czone import artifacts
from czone.bench.report import table
from czone.bench.startup import _service as bench_service
from czone.errors import CZoneError
from czone.functions import FUNCTIONS
from czone.replay_policy import percentile
from czone.service import Service

# kernel -> the mode its containers run in
KERNELS = {"patched": "mcpv", "stock": "mcpv-virtio-mem"}


@dataclass(frozen=True)
class Params:
    functions: tuple[str, ...] = tuple(FUNCTIONS)
    invocations: int = 20


FULL = Params()
QUICK = Params(functions=("float_operation",), invocations=3)


def _services(root: Path) -> dict[str, Service]:
    return {"patched": bench_service(root / "patched"),
            "stock": bench_service(root / "stock", artifacts.kernel_stock())}


def run(p: Params = FULL) -> dict[str, Any]:
    result: dict[str, Any] = {"params": p.__dict__, "functions": {},
                              "kernels": {}}
    with tempfile.TemporaryDirectory(prefix="czb-runtime-") as d:
        svcs = _services(Path(d))
        try:
            for k, svc in svcs.items():
                result["kernels"][k] = svc.builds[0].release
                result["accel"] = svc.accel()[0]
            for fn in p.functions:
                ctrs = {k: svc.run(fn, KERNELS[k]).id for k, svc in svcs.items()}  # type: ignore[arg-type]
                runs: dict[str, list[float | None]] = {k: [] for k in svcs}
                for _ in range(p.invocations):
                    for k, svc in svcs.items():
                        try:
                            reply, _ = svc.invoke(ctrs[k])
                            runs[k].append(reply["run_ms"] if reply.get("ok") else None)
                        except CZoneError as e:
                            print(f"  {fn} on {k}: invocation failed: {e}")
                            runs[k].append(None)
                for k, svc in svcs.items():
                    svc.kill(ctrs[k])
                result["functions"][fn] = runs
                print(f"  {fn}: " + ", ".join(
                    f"{k} median {_med(v)} ms" for k, v in runs.items()), flush=True)
        finally:
            for svc in svcs.values():
                for vm in svc.db.list():
                    try:
                        svc.vm_down(vm.name, timeout=5)
                    except CZoneError as e:
                        print(f"  teardown of {vm.name}: {e}")
                svc.close()
    result["summary"] = summarize(result["functions"])
    _print(result)
    return result


def _med(xs: list[float | None]) -> str:
    ok = [x for x in xs if x is not None]
    return f"{statistics.median(ok):.1f}" if ok else "n/a"


def summarize(functions: dict[str, dict[str, list[float | None]]]) -> dict[str, Any]:
    """Per function: median and p99 run time per kernel, patched/stock ratios;
    overall: the median of the per-function ratios.  Failures are counted."""
    per: dict[str, Any] = {}
    for fn, runs in functions.items():
        row: dict[str, Any] = {}
        for k, xs in runs.items():
            ok = [x for x in xs if x is not None]
            row[k] = {"median_ms": statistics.median(ok) if ok else None,
                      "p99_ms": percentile(ok, 99), "n": len(ok), "failed": len(xs) - len(ok)}
        pa, st = row.get("patched", {}), row.get("stock", {})
        for stat in ("median", "p99"):
            a, b = pa.get(f"{stat}_ms"), st.get(f"{stat}_ms")
            row[f"{stat}_ratio"] = a / b if a and b else None
        per[fn] = row
    med = [r["median_ratio"] for r in per.values() if r["median_ratio"]]
    p99 = [r["p99_ratio"] for r in per.values() if r["p99_ratio"]]
    return {"functions": per,
            "median_ratio": statistics.median(med) if med else None,
            "p99_ratio": statistics.median(p99) if p99 else None,
            "spread": (min(med), max(med)) if med else None}


def _print(result: dict[str, Any]) -> None:
    s = result["summary"]

    def f(x: float | None, d: int = 2) -> str:
        return "n/a" if x is None else f"{x:.{d}f}"

    rows = [[fn, f(r["patched"]["median_ms"], 1), f(r["stock"]["median_ms"], 1),
             f(r["median_ratio"], 3), f(r["patched"]["p99_ms"], 1), f(r["stock"]["p99_ms"], 1),
             f(r["p99_ratio"], 3), r["patched"]["n"]]
            for fn, r in s["functions"].items()]
    print(f"run time (ms) inside CZones on {result['kernels'].get('patched')} against no CZone "
          f"on {result['kernels'].get('stock')}, accel {result.get('accel')}")
    print(table(["function", "patched median", "stock median", "ratio", "patched p99",
                 "stock p99", "p99 ratio", "n"], rows))
    print(f"median of the per-function ratios: {f(s['median_ratio'], 3)} (median), "
          f"{f(s['p99_ratio'], 3)} (p99)")
