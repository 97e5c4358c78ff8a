"""Result records: a JSON file per run and a Markdown table on stdout."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

from czone.artifacts import cache_dir


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def save(scenario: str, result: dict[str, Any]) -> Path:
    out = cache_dir() / "bench" / f"{scenario}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    return out


def table(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        return f"{v:.2f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)
