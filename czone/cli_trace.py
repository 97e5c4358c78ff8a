"""``czonectl trace gen | show``: synthetic Azure Functions traces and a look
at what a replay of one would run (``czone.trace``)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import click

from czone import trace as tr

SHOW_ROWS = 12


@click.group("trace")
def trace() -> None:
    """Azure Functions traces: generate synthetic ones, summarise a sample."""


@trace.command("gen")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--shape", type=click.Choice(tr.SHAPES), default="steady", show_default=True)
@click.option("--functions", "n", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--minutes", type=click.IntRange(min=1), default=tr.MINUTES_PER_DAY,
              show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--format", "fmt", type=click.Choice(("2019", "2021")), default="2019",
              show_default=True, help="2019: the per-minute dataset's three kinds of file; "
                                      "2021: the per-invocation trace.")
def gen(directory: Path, shape: tr.Shape, n: int, minutes: int, seed: int, fmt: str) -> None:
    """Write a synthetic trace in the Azure dataset's own file formats into DIRECTORY.

    The 2019 files hold whole days, as the real ones do: show such a trace
    with --minutes to see only the minutes generated."""
    files = tr.generate(directory, shape, n, minutes, seed, fmt)  # type: ignore[arg-type]
    click.echo(f"wrote {len(files)} file(s) to {directory}: {n} functions, {minutes} minutes, "
               f"{shape}, seed {seed}, {fmt} format")


@trace.command("show")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--functions", "n", type=click.IntRange(min=1),
              help=f"Functions to sample (default: {SHOW_ROWS}, or all if fewer).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--speedup", type=click.FloatRange(min=0, min_open=True), default=1.0,
              show_default=True, help="Divide the trace's times by this.")
@click.option("--start", type=click.IntRange(min=0), default=0, show_default=True,
              help="First minute of the window.")
@click.option("--minutes", type=click.IntRange(min=1), help="Window length (default: all).")
@click.option("--map", "by", type=click.Choice(("nearest", "rank")), default="nearest",
              show_default=True, help="nearest: by median duration (and memory); rank: by "
                                      "the order of the durations, so all of ours are used.")
def show(path: Path, n: int | None, seed: int, speedup: float, start: int,
         minutes: int | None, by: str) -> None:
    """Summarise the trace at PATH and a replay of a sample of it."""
    trace_ = tr.load(path, start, minutes)
    fns = trace_.functions
    eligible = sum(1 for f in fns if f.total and f.durations)
    picked = tr.sample(trace_, n or min(SHOW_ROWS, eligible), seed)   # errors before output
    mapping = tr.assign(picked, by)  # type: ignore[arg-type]
    events = tr.events(picked, mapping, seed, speedup)
    span = events[-1].t if events else 0.0
    total = sum(f.total for f in fns)
    classes = Counter(tr.popularity(f, trace_.minutes) for f in fns if f.total)
    click.echo(f"{path}: {trace_.source} format, {trace_.minutes} minutes from minute {start}, "
               f"{len(fns)} functions, {total} invocations")
    click.echo("  popularity: " + ", ".join(f"{c} {classes[c]}" for c in tr.CLASSES)
               + " (rare: at most 1/hour, medium: at most 1/minute)")
    if trace_.source == "2019":
        click.echo(f"  no durations row: {sum(1 for f in fns if f.durations is None)} "
                   f"(never sampled); no memory row: {sum(1 for f in fns if f.memory is None)} "
                   "(mapped by duration only)")
    click.echo(f"sample of {len(picked)} (seed {seed}, map {by}, speedup {speedup:g}): "
               f"{len(events)} invocations over {span:.1f} s")
    per_fn = Counter(e.trace_id for e in events)
    ours = Counter(mapping.values())
    click.echo("  ours: " + ", ".join(f"{name} {k}" for name, k in ours.most_common()))
    rows = [("OURS", "CLASS", "INVOCATIONS", "MEDIAN", "MEMORY", "TRACE FUNCTION")]
    for f in sorted(picked, key=lambda f: -per_fn[f.id])[:SHOW_ROWS]:
        med = f"{f.durations.median:.0f} ms" if f.durations else "-"
        mem = f"{f.memory.median:.0f} MB" if f.memory else "-"
        rows.append((mapping[f.id], tr.popularity(f, trace_.minutes), str(per_fn[f.id]), med,
                     mem, f"{f.app[:8]}/{f.function[:8]}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    if len(picked) > SHOW_ROWS:
        click.echo(f"  ... and {len(picked) - SHOW_ROWS} more")
