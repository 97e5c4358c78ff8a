"""``python -m czone.bench [--quick] [--results DIR] [SCENARIO ...]``: run
benchmarks, print tables, save JSON; then write DIR's plots and REPORT.md
from every scenario's latest JSON there."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from czone.bench import boot, kernel, migrate, reclaim, replay, report, results, runtime, startup
from czone.errors import CZoneError

SCENARIOS = {"boot": boot.run, "kernel": kernel.run_all, "reclaim": reclaim.run,
             "startup": startup.run_startup, "footprint": startup.run_footprint,
             "runtime": runtime.run, "replay": replay.run,
             "migrate": migrate.run}
# --quick: the CI smoke test, minutes not hours; it checks that every step
# runs and writes its report, never a speed.
QUICK = {
    "startup": lambda: startup.run_startup(k_max=2),
    "footprint": lambda: startup.run_footprint(ns=(1, 2)),
    "reclaim": lambda: reclaim.run(env={"CZONE_RECLAIM_SIZES": "64", "CZONE_RECLAIM_REPS": "1"}),
    "runtime": lambda: runtime.run(runtime.QUICK),
    "replay": lambda: replay.run(replay.QUICK),
}
REPORTED = ("startup", "footprint", "reclaim", "runtime", "replay")


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m czone.bench")
    ap.add_argument("--quick", action="store_true", help="the CI smoke variant")
    ap.add_argument("--results", type=Path, default=Path("results"),
                    help="where the JSON, the plots and REPORT.md go (default: results/)")
    ap.add_argument("scenarios", nargs="*", metavar="SCENARIO")
    args = ap.parse_args(argv)
    table = QUICK if args.quick else SCENARIOS
    names = args.scenarios or list(table)
    unknown = [n for n in names if n not in table]
    if unknown:
        print(f"unknown scenario(s) {unknown}; known{' with --quick' if args.quick else ''}: "
              f"{list(table)}", file=sys.stderr)
        return 2
    command = command_line(args.quick, args.scenarios, os.environ)
    rc = 0
    for name in names:
        # the builds this run uses: a rebuild while it runs must not change them
        started = results.provenance(None, command)
        try:
            # the replay's JSON lines are raw samples too: kept beside the JSON
            result = replay.run(out_dir=args.results) if name == "replay" and not args.quick \
                else table[name]()
        except (CZoneError, ValueError) as e:
            print(f"bench {name}: error: {e}", file=sys.stderr)
            rc = 1
            continue
        result["provenance"] = {**started, "accel": result.get("accel") or "unknown"}
        print(f"saved {report.save(name, result)} and "
              f"{results.save_json(args.results, name, result)}\n")
    write_report(args.results)
    return rc


def command_line(quick: bool, scenarios: list[str], env: Mapping[str, str]) -> str:
    """The command that reproduces this run, with the knobs it was given."""
    knobs = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(env.items())
                     if k.startswith(("CZONE_BENCH_", "CZONE_RECLAIM_", "CZONE_REPLAY_",
                                      "CZONE_TRACE")))
    return ((knobs + " " if knobs else "") + "make bench" + (" QUICK=1" if quick else "")
            + (f" BENCH='{' '.join(scenarios)}'" if scenarios else ""))


def write_report(out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    got: dict[str, Any] = {}
    for name in REPORTED:
        path = out / f"{name}.json"
        if path.exists():
            got[name] = json.loads(path.read_text())
    prov = next((r["provenance"] for r in got.values() if "provenance" in r),
                results.provenance(None, "make bench"))
    pngs = results.plots(out, got)
    path = results.report(out, got, prov, pngs)
    print(f"wrote {path} and {len(pngs)} plot(s)")
    return path


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
