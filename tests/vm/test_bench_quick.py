"""The evaluation's smoke test: ``make bench QUICK=1`` runs every reported
scenario for real and writes the JSON, the plots and REPORT.md.  It asserts
that the report was written and what it holds, never a speed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.vm.conftest import REPO

pytestmark = pytest.mark.vm
QUICK_TIMEOUT = 1200


@pytest.mark.timeout(QUICK_TIMEOUT + 60)
def test_quick_bench_writes_json_plots_and_report(artifacts, tmp_path: Path) -> None:
    out = tmp_path / "results"
    log = tmp_path / "bench.log"
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "czone.bench", "--quick", "--results",
                               str(out)], cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                              timeout=QUICK_TIMEOUT)
    text = log.read_text()
    if proc.returncode:
        evidence = REPO / "test-artifacts" / "bench-quick.log"
        evidence.parent.mkdir(exist_ok=True)
        evidence.write_text(text)
    assert proc.returncode == 0, f"quick bench failed (log in test-artifacts):\n{text[-3000:]}"
    for name in ("startup", "footprint", "reclaim", "runtime", "replay"):
        result = json.loads((out / f"{name}.json").read_text())
        assert result["provenance"]["command"] == "make bench QUICK=1"
        assert result["provenance"]["accel"] == artifacts.accel
    replay = json.loads((out / "replay.json").read_text())
    for mode in ("mcpv-czone", "mcpv-virtio-mem", "mcpv-balloon", "scpv-template",
                 "scpv-snapshot"):
        summary = replay["modes"][mode]["summary"]
        assert summary["invocations"] == replay["events"] > 0
        assert summary["failed"] == 0, (mode, summary)
        assert summary["memory_time_gib_s"] > 0
    report = (out / "REPORT.md").read_text()
    assert "Scenarios not run" not in report
    assert f"accelerator **{artifacts.accel}**" in report
    runtime = json.loads((out / "runtime.json").read_text())["summary"]
    assert runtime["median_ratio"] > 0, runtime
    for png in ("memory-over-time.png", "startup-cdf.png", "reclaim.png", "footprint.png",
                "runtime-overhead.png"):
        assert (out / png).stat().st_size > 1000, png
        assert f"({png})" in report
