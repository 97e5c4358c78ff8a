"""``python -m czone.bench [SCENARIO ...]``: run benchmarks, print tables, save JSON."""

from __future__ import annotations

import sys

from czone.bench import boot, kernel, migrate, reclaim, report, startup
from czone.errors import CZoneError

SCENARIOS = {"boot": boot.run, "kernel": kernel.run_all, "reclaim": reclaim.run,
             "startup": startup.run_startup, "footprint": startup.run_footprint,
             "migrate": migrate.run}


def main(argv: list[str]) -> int:
    names = argv or list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        print(f"unknown scenario(s) {unknown}; known: {list(SCENARIOS)}", file=sys.stderr)
        return 2
    for name in names:
        try:
            result = SCENARIOS[name]()
        except (CZoneError, ValueError) as e:
            print(f"bench {name}: error: {e}", file=sys.stderr)
            return 1
        print(f"saved {report.save(name, result)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
