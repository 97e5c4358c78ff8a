"""Reclaim: how fast, how much and how completely a dead container's memory goes
back to the host, with CZone, virtio-mem, the balloon, and a raw host discard.

The cases are in ``reclaim_cases`` (VMs) and ``reclaim_raw`` (host process;
run beside the CZone VM).  Every repetition runs all of them for one size,
side by side; ratios are taken per repetition and their medians reported,
with the spread and the number of repetitions.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from czone import accel as accel_mod
from czone import artifacts
from czone.bench import reclaim_cases as cases
from czone.bench.guestvm import TB_SIZE_MIB
from czone.bench.reclaim_stats import (
    LABELS,
    Sample,
    case_rows,
    plan,
    ratio_row,
    summarize,
    verdicts,
)
from czone.bench.report import table
from czone.state import run_root


def one_rep(size: int, rep: int) -> tuple[dict[str, Sample], str]:
    """Every case once for ``size``; the VM cases' order rotates between repetitions."""
    got: dict[str, Sample] = {}
    accel = ""

    def czone() -> None:
        nonlocal accel
        got["czone"], got["czone_warm"], beside, accel = cases.czone_destroy(size)
        got.update(beside)

    def vmem() -> None:
        got["vmem_shrink"], got["vmem_until"] = cases.virtio_mem(size)

    def balloon() -> None:
        got["fpr"], got["inflate"] = cases.balloon(size)

    order: list[Callable[[], None]] = [czone, vmem, balloon]
    for run_case in order[rep % 3:] + order[:rep % 3]:
        run_case()
    return {k: got[k] for k in LABELS}, accel


def render(accel: str, why: str, reps: Mapping[int, int],
           summaries: Mapping[int, Mapping[str, Any]]) -> str:
    rows = [row for size, s in summaries.items() for row in case_rows(size, s)]
    fewer = [f"{size} MiB: {n} repetition(s) (fewer than the others, to keep the run short)"
             for size, n in reps.items() if n < max(reps.values())]
    return "\n".join([
        f"reclaim: a dying container among 3 live neighbours (interleaved 64 KiB steps), "
        f"accelerator {accel} ({why}); host view, medians",
        *fewer, "",
        "latency: from the request until the process's RSS and its memfds' allocation "
        "stopped moving (raw cases: the call's return in the note); n/a: the case "
        "returned nothing", "",
        table(["MiB", "case", "n", "latency (ms)", "spread (ms)", "returned (MiB)",
               "complete (%)", "note"], rows), "",
        "ratios per repetition, medians [min-max] (targets: speedup >= 20, the first "
        "destroy against the first shrink; a warm destroy in the VM <= 1.3 x raw + fixed "
        "guest cost in every repetition, where raw = the mean of the one-hole punches of the "
        "same bytes just before and after it, fixed = the destroy round trip of a CZone whose "
        "container touched 1 MiB (one chunk, one UNPLUG), "
        f"and a repetition's warm destroy is the median of its {cases.WARM_ROUNDS} rounds' "
        "(excess over budget); complete >= 99%)",
        table(["MiB", "virtio-mem until S / CZone", "second destroy / raw",
               "first destroy / raw", "second destroy (ms)",
               "1.3 x raw + fixed (ms)", "fixed: one-chunk destroy (ms)", "empty destroy (ms)",
               "stat round trip (ms)",
               "second destroy in guest (ms)", "CZone complete (%)"],
              [ratio_row(size, s) for size, s in summaries.items()]),
        "", *verdicts(summaries)])


def run(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    reps = plan(os.environ if env is None else env)
    kernel, image = artifacts.kernel(), artifacts.image()
    accel, why = accel_mod.detect(kernel.release, kernel.vmlinux, image.rootfs,
                                  artifacts.qemu_binary(), tuple(artifacts.firmware_dirs()),
                                  run_root())
    print(f"reclaim benchmark on {accel} ({why}); sizes and repetitions {reps}", flush=True)
    samples: dict[int, list[dict[str, Sample]]] = {}
    for size, n in reps.items():
        for rep in range(n):
            got, vm_accel = one_rep(size, rep)
            samples.setdefault(size, []).append(got)
            print(f"  {size} MiB repetition {rep + 1}/{n} done ({vm_accel})", flush=True)
    summaries = {size: summarize(rs) for size, rs in samples.items()}
    print(render(accel, why, reps, summaries))
    return {"accel": accel, "probe": why, "kernel": kernel.release, "image": image.version,
            "tb_size_mib": TB_SIZE_MIB,
            "reps": reps, "summary": summaries,
            "samples": {size: [{k: s.as_dict() for k, s in r.items()} for r in rs]
                        for size, rs in samples.items()}}
