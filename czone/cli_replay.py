"""``czonectl replay TRACE``: serve a sampled trace with real VMs (``czone.replay``)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click

from czone import replay as rp
from czone import trace as tr
from czone.service import Service


@click.command("replay")
@click.argument("trace_path", metavar="TRACE", type=click.Path(exists=True, path_type=Path))
@click.option("--mode", type=click.Choice(tuple(rp.MODES)), default="mcpv-czone",
              show_default=True)
@click.option("--functions", "n", type=click.IntRange(min=1), default=20, show_default=True,
              help="Trace functions to sample.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--start", type=click.IntRange(min=0), default=0, show_default=True,
              help="First trace minute.")
@click.option("--minutes", type=click.IntRange(min=1), default=30, show_default=True,
              help="Trace minutes to replay.")
@click.option("--speedup", type=click.FloatRange(min=0, min_open=True), default=2.0,
              show_default=True, help="Divide the trace's times by this.")
@click.option("--keep-alive", type=click.FloatRange(min=0), default=60.0, show_default=True,
              help="Seconds a container stays warm after its last invocation.")
@click.option("--reclaim-idle-after", type=click.FloatRange(min=0, min_open=True),
              help="MCPV: give back the free memory of CZones idle this long (seconds).")
@click.option("--workers", type=click.IntRange(min=1), default=16, show_default=True,
              help="Invocations served at once.")
@click.option("--map", "by", type=click.Choice(("nearest", "rank")), default="rank",
              show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="JSON lines file (default: replay-MODE-DATE.jsonl here).")
@click.option("--keep-vms", is_flag=True, help="Leave the VMs the replay booted running.")
@click.pass_context
def replay(ctx: click.Context, trace_path: Path, mode: str, n: int, seed: int, start: int,
           minutes: int, speedup: float, keep_alive: float, reclaim_idle_after: float | None,
           workers: int, by: str, out: Path | None, keep_vms: bool) -> None:
    """Replay a sample of the Azure Functions trace at TRACE against real VMs.

    Each invocation is served by a warm container of its function, or starts
    one (a cold start); containers idle for --keep-alive are killed.  Every
    invocation (cold or warm, startup and end-to-end latency, the function's
    own run time), every kill and a memory sample of all QEMU processes each
    second go to --out as JSON lines as they happen."""
    opts = rp.Options(mode, keep_alive, reclaim_idle_after, workers, keep_vms=keep_vms)
    plan = tr.plan(trace_path, n, seed, speedup, start, minutes, by)  # type: ignore[arg-type]
    if not plan.events:
        raise rp.ReplayError(f"the sample of {trace_path} has no invocation in minutes "
                             f"{start}..{start + minutes}")
    out = out or Path(f"replay-{mode}-{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
    span = plan.events[-1].t
    click.echo(f"replaying {len(plan.events)} invocations of {len(plan.functions)} functions "
               f"over {span:.0f} s ({mode}, keep-alive {keep_alive:g} s) into {out}", err=True)
    qemu = ctx.obj.get("qemu") if ctx.obj else None

    def make() -> Service:
        return Service(qemu=qemu, progress=lambda m: click.echo(m, err=True))

    with click.progressbar(length=len(plan.events), label="invocations", file=None) as bar:
        def progress(done: int, _total: int) -> None:
            bar.update(done + 1 - bar.pos)
        summary = rp.replay(make, opts, plan.events, out, progress)
    click.echo(json.dumps(_rounded(summary), indent=2))


def _rounded(d: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in d.items()}
