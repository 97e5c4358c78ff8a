"""Azure Functions traces: read them, sample functions, map them onto ours,
and turn them into invocation events for a replayer; plus a generator of
synthetic traces in the same file formats.

Formats (the public AzurePublicDataset files, read unchanged):

- 2019 (``AzureFunctionsDataset2019``), one file of each kind per day NN:
  ``invocations_per_function_md.anon.dNN.csv`` (d01..d14),
  ``function_durations_percentiles.anon.dNN.csv`` (d01..d14) and
  ``app_memory_percentiles.anon.dNN.csv`` (d01..d12 only: the release has
  no memory for the last two days).  Functions are keyed by (HashOwner,
  HashApp, HashFunction); memory is per app (HashOwner, HashApp).
- 2021 (``AzureFunctionsInvocationTraceForTwoWeeksJan2021.txt``): one row
  per invocation, ``app,func,end_timestamp,duration`` in seconds from the
  trace's start; an invocation starts at ``end_timestamp - duration``.

Everything here is pure (files in, values out) and deterministic for a
seed.  See docs/trace.md for what was chosen where the dataset is silent.
"""

from __future__ import annotations

import csv
import hashlib
import math
import random
import re
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple

from czone.errors import CZoneError
from czone.functions import FUNCTIONS

MINUTES_PER_DAY = 1440
DAYS_2019 = 14
INVOCATIONS = "invocations_per_function_md.anon.d{:02d}.csv"
DURATIONS = "function_durations_percentiles.anon.d{:02d}.csv"
MEMORY = "app_memory_percentiles.anon.d{:02d}.csv"
TRACE_2021 = "AzureFunctionsInvocationTraceForTwoWeeksJan2021.txt"

DURATION_PCTS = (0, 1, 25, 50, 75, 99, 100)
MEMORY_PCTS = (1, 5, 25, 50, 75, 95, 99, 100)
INVOCATION_COLS = ("HashOwner", "HashApp", "HashFunction", "Trigger")
DURATION_COLS = ("HashOwner", "HashApp", "HashFunction", "Average", "Count", "Minimum",
                 "Maximum", *(f"percentile_Average_{p}" for p in DURATION_PCTS))
MEMORY_COLS = ("HashOwner", "HashApp", "SampleCount", "AverageAllocatedMb",
               *(f"AverageAllocatedMb_pct{p}" for p in MEMORY_PCTS))
COLS_2021 = ("app", "func", "end_timestamp", "duration")
TRIGGERS = ("http", "timer", "event", "queue", "storage", "orchestration", "others")

# Warm run time (ms) of each of our functions with its default payload, in
# CPython 3.11 on one x86-64 core outside a VM.  float_operation (18 ms) and
# json_dumps_loads (8 ms) were measured on the development host (median of
# 20 calls after one warm-up); the others need numpy, PIL, pyaes or chameleon,
# which the host does not have, so they are estimates for those input sizes.
# Only their order and rough ratios matter: mapping works in log space.
TYPICAL_MS: dict[str, float] = {
    "matmul": 2.0,             # estimate: 200x200 float64 product in BLAS
    "image_resize": 3.0,       # estimate: 640x480 -> 160x120 bicubic + sha256
    "linpack": 4.0,            # estimate: 200x200 solve + residual
    "chameleon": 6.0,          # estimate: 50x50 table rendered
    "json_dumps_loads": 8.0,   # measured
    "pyaes": 12.0,             # estimate: 2000 bytes AES-CTR both ways, pure Python
    "float_operation": 18.0,   # measured
}

# Memory counts half as much as duration in the mapping's distance: the
# trace's memory is an app's committed virtual memory, shared by its
# functions, a weaker signal than a function's own duration.
MEMORY_WEIGHT = 0.5

Popularity = Literal["rare", "medium", "popular"]
CLASSES: tuple[Popularity, ...] = ("rare", "medium", "popular")
Shape = Literal["steady", "bursty", "diurnal"]
SHAPES: tuple[Shape, ...] = ("steady", "bursty", "diurnal")


class TraceError(CZoneError):
    """A trace file that is missing or not in the expected format."""


@dataclass(frozen=True)
class Durations:
    """One function's execution times (ms) for a day, warm: no cold start."""
    average: float
    count: int
    minimum: float | None     # the dataset lacks some minima and maxima
    maximum: float | None
    percentiles: dict[int, float]   # of the 30-second averages, weighted

    @property
    def median(self) -> float:
        return self.percentiles.get(50, self.average)


@dataclass(frozen=True)
class Memory:
    """An app's allocated (committed) memory in MB; the dataset has no 0th percentile."""
    sample_count: int
    average: float
    percentiles: dict[int, float]

    @property
    def median(self) -> float:
        return self.percentiles.get(50, self.average)


@dataclass(eq=False)
class TraceFunction:
    """One trace function over the loaded window."""
    owner: str          # "" in the 2021 trace
    app: str
    function: str
    trigger: str        # "" in the 2021 trace
    per_minute: array   # invocations per minute of the loaded window ('I')
    durations: Durations | None = None
    memory: Memory | None = None
    starts: list[float] | None = None   # 2021: start times, s from the window's start

    @property
    def id(self) -> str:
        """Unique: an app's hash differs between owners, a function's between apps."""
        return f"{self.app}/{self.function}"

    @property
    def total(self) -> int:
        return sum(self.per_minute)


@dataclass(frozen=True)
class Trace:
    """The functions of one window of a trace, ``minutes`` long."""
    functions: tuple[TraceFunction, ...]
    minutes: int
    source: str          # "2019" or "2021"


class Invocation(NamedTuple):
    """One event for a replayer: at ``t`` seconds from the start (after
    the speedup), invoke ``function`` (ours) for trace function ``trace_id``."""
    t: float
    trace_id: str
    function: str


# ---------------------------------------------------------------- reading


def _rows(path: Path, required: Sequence[str]) -> Iterator[tuple[int, dict[str, int], list[str]]]:
    """(line, column index, row) for each non-blank row, after checking the header."""
    try:
        f = path.open(newline="", encoding="utf-8-sig")
    except OSError as e:
        raise TraceError(f"cannot read {path}: {e.strerror}") from None
    with f:
        reader = csv.reader(f)
        try:
            header = next(reader, None)
            if header is None:
                raise TraceError(f"{path}: empty file, expected a header")
            cols = {name.strip(): i for i, name in enumerate(header)}
            missing = [c for c in required if c not in cols]
            if missing:
                raise TraceError(f"{path}: header lacks column {missing[0]!r}"
                                 + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
            for row in reader:
                if not row or row == [""]:
                    continue
                if len(row) != len(header):
                    raise TraceError(f"{path}:{reader.line_num}: {len(row)} fields, "
                                     f"the header has {len(header)}")
                yield reader.line_num, cols, row
        except csv.Error as e:
            raise TraceError(f"{path}:{reader.line_num}: bad CSV: {e}") from None
        except UnicodeDecodeError as e:
            raise TraceError(f"{path}: not UTF-8 text: {e.reason}") from None


def _maybe(path: Path, line: int, col: str, text: str) -> float | None:
    """A non-negative number, or None for an empty cell."""
    text = text.strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        raise TraceError(f"{path}:{line}: column {col!r}: not a number: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise TraceError(f"{path}:{line}: column {col!r}: not a count or time: {text!r}")
    return value


def _number(path: Path, line: int, col: str, text: str) -> float:
    value = _maybe(path, line, col, text)
    if value is None:
        raise TraceError(f"{path}:{line}: column {col!r} is empty")
    return value


def _count(path: Path, line: int, col: str, text: str) -> int:
    """A non-negative integer; an empty cell is 0 (some files leave idle minutes empty)."""
    text = text.strip()
    if not text:
        return 0
    if text.isdigit():
        return int(text)
    value = _number(path, line, col, text)
    if not value.is_integer():
        raise TraceError(f"{path}:{line}: column {col!r}: not a count: {text!r}")
    return int(value)


def _read_invocations(path: Path, offset: int, lo: int, hi: int,
                      into: dict[tuple[str, str, str], TraceFunction]) -> None:
    """Add one day's counts, the day starting at minute ``offset`` of the
    trace, clipped to the window [lo, hi).  Rows repeating a key add up."""
    minute_cols = [str(m) for m in range(1, MINUTES_PER_DAY + 1)]
    window = range(max(lo - offset, 0), min(hi - offset, MINUTES_PER_DAY))
    index: list[int] = []
    for line, cols, row in _rows(path, (*INVOCATION_COLS, *minute_cols)):
        index = index or [cols[c] for c in minute_cols]
        key = (row[cols["HashOwner"]], row[cols["HashApp"]], row[cols["HashFunction"]])
        fn = into.get(key)
        if fn is None:
            fn = TraceFunction(*key, trigger=row[cols["Trigger"]],
                               per_minute=array("I", bytes(4 * (hi - lo))))
            into[key] = fn
        for m in window:
            text = row[index[m]]
            if text and text != "0":
                fn.per_minute[offset + m - lo] += _count(path, line, minute_cols[m], text)


def _read_durations(path: Path) -> dict[tuple[str, str, str], Durations]:
    out: dict[tuple[str, str, str], Durations] = {}
    for line, cols, row in _rows(path, DURATION_COLS):
        cell = {c: row[cols[c]] for c in DURATION_COLS}
        pcts = {p: v for p in DURATION_PCTS if (v := _maybe(
            path, line, f"percentile_Average_{p}", cell[f"percentile_Average_{p}"])) is not None}
        d = Durations(average=_number(path, line, "Average", cell["Average"]),
                      count=_count(path, line, "Count", cell["Count"]),
                      minimum=_maybe(path, line, "Minimum", cell["Minimum"]),
                      maximum=_maybe(path, line, "Maximum", cell["Maximum"]),
                      percentiles=pcts)
        key = (row[cols["HashOwner"]], row[cols["HashApp"]], row[cols["HashFunction"]])
        if key not in out or d.count > out[key].count:
            out[key] = d
    return out


def _read_memory(path: Path) -> dict[tuple[str, str], Memory]:
    out: dict[tuple[str, str], Memory] = {}
    for line, cols, row in _rows(path, MEMORY_COLS):
        cell = {c: row[cols[c]] for c in MEMORY_COLS}
        pcts = {p: v for p in MEMORY_PCTS if (v := _maybe(
            path, line, f"AverageAllocatedMb_pct{p}", cell[f"AverageAllocatedMb_pct{p}"]))
            is not None}
        m = Memory(sample_count=_count(path, line, "SampleCount", cell["SampleCount"]),
                   average=_number(path, line, "AverageAllocatedMb", cell["AverageAllocatedMb"]),
                   percentiles=pcts)
        key = (row[cols["HashOwner"]], row[cols["HashApp"]])
        if key not in out or m.sample_count > out[key].sample_count:
            out[key] = m
    return out


def days_in(directory: Path) -> list[int]:
    """The days NN for which ``directory`` has an invocations file."""
    pattern = re.compile(r"invocations_per_function_md\.anon\.d(\d\d)\.csv")
    try:
        names = [p.name for p in directory.iterdir()]
    except OSError as e:
        raise TraceError(f"cannot list {directory}: {e.strerror}") from None
    return sorted(int(m.group(1)) for n in names if (m := pattern.fullmatch(n)))


def load_2019(directory: Path, days: Sequence[int] | None = None, start: int = 0,
              minutes: int | None = None) -> Trace:
    """The 2019 dataset's ``days`` (default: every day present), their minutes
    laid end to end, cut to ``minutes`` minutes from minute ``start``.

    A function's durations (and an app's memory) come from the day whose row
    has the largest Count (SampleCount): the dataset's percentiles cannot be
    merged across days.  A function with no memory row keeps ``memory=None``
    and is mapped by its duration alone; one with no durations row keeps
    ``durations=None`` and is never sampled (it cannot be mapped).
    """
    directory = Path(directory)
    days = list(days) if days is not None else days_in(directory)
    if not days:
        raise TraceError(f"{directory}: no {INVOCATIONS.format(1).replace('01', 'NN')} files")
    if days != list(range(days[0], days[0] + len(days))) or not 1 <= days[0] <= DAYS_2019 \
            or days[-1] > DAYS_2019:
        raise TraceError(f"days must be consecutive, within 1..{DAYS_2019}: {days}")
    span = len(days) * MINUTES_PER_DAY
    hi = span if minutes is None else min(start + minutes, span)
    if not 0 <= start < hi:
        raise TraceError(f"window of {minutes} minutes from minute {start} is outside "
                         f"the {span} minutes of days {days[0]}..{days[-1]}")
    functions: dict[tuple[str, str, str], TraceFunction] = {}
    durations: dict[tuple[str, str, str], Durations] = {}
    memory: dict[tuple[str, str], Memory] = {}
    for i, day in enumerate(days):
        _read_invocations(directory / INVOCATIONS.format(day), i * MINUTES_PER_DAY, start, hi,
                          functions)
        if (directory / DURATIONS.format(day)).exists():
            for k, d in _read_durations(directory / DURATIONS.format(day)).items():
                if k not in durations or d.count > durations[k].count:
                    durations[k] = d
        if (directory / MEMORY.format(day)).exists():
            for k, m in _read_memory(directory / MEMORY.format(day)).items():
                if k not in memory or m.sample_count > memory[k].sample_count:
                    memory[k] = m
    for key, fn in functions.items():
        fn.durations = durations.get(key)
        fn.memory = memory.get(key[:2])
    return Trace(tuple(functions.values()), hi - start, "2019")


def _percentile(ordered: Sequence[float], p: int) -> float:
    """Nearest rank; p=0 is the minimum."""
    return ordered[max(math.ceil(p / 100 * len(ordered)) - 1, 0)]


def load_2021(path: Path, start: int = 0, minutes: int | None = None) -> Trace:
    """The 2021 invocation trace, cut to ``minutes`` minutes from minute
    ``start`` (default: to the last start).  An invocation belongs to the
    minute it starts in; a start before 0 (it ended early in the trace) is
    taken as 0.  Durations' percentiles are computed over the window's
    invocations; there is no memory."""
    path = Path(path)
    starts: dict[tuple[str, str], list[float]] = {}
    durs: dict[tuple[str, str], list[float]] = {}
    lo = start * 60.0
    hi = math.inf if minutes is None else (start + minutes) * 60.0
    for line, cols, row in _rows(path, COLS_2021):
        end = _number(path, line, "end_timestamp", row[cols["end_timestamp"]])
        dur = _number(path, line, "duration", row[cols["duration"]])
        t = max(end - dur, 0.0)
        if lo <= t < hi:
            key = (row[cols["app"]], row[cols["func"]])
            starts.setdefault(key, []).append(t - lo)
            durs.setdefault(key, []).append(dur * 1000.0)
    last = max((max(s) for s in starts.values()), default=0.0)
    length = minutes if minutes is not None else math.floor(last / 60) + 1
    functions = []
    for key, ts in starts.items():
        ts.sort()
        per_minute = array("I", bytes(4 * length))
        for t in ts:
            per_minute[int(t // 60)] += 1
        ms = sorted(durs[key])
        d = Durations(average=sum(ms) / len(ms), count=len(ms), minimum=ms[0], maximum=ms[-1],
                      percentiles={p: _percentile(ms, p) for p in DURATION_PCTS})
        functions.append(TraceFunction("", key[0], key[1], "", per_minute, d, None, ts))
    return Trace(tuple(functions), length, "2021")


def load(path: Path, start: int = 0, minutes: int | None = None) -> Trace:
    """A directory of 2019 files, or the 2021 file (or a directory holding it)."""
    path = Path(path)
    if path.is_dir():
        if days_in(path):
            return load_2019(path, start=start, minutes=minutes)
        path = path / TRACE_2021
    if not path.exists():
        raise TraceError(f"{path}: no such trace (want a directory of "
                         f"invocations_per_function_md.anon.dNN.csv, or {TRACE_2021})")
    return load_2021(path, start, minutes)


# ------------------------------------------------- sampling and mapping


def popularity(fn: TraceFunction, minutes: int) -> Popularity:
    """rare: at most one invocation an hour on average; medium: at most one a
    minute; popular: more.  These are the two marks the ATC'20 paper quotes
    (45% of apps are invoked at most once an hour, 81% at most once a minute)."""
    total = fn.total
    if total * 60 <= minutes:
        return "rare"
    return "medium" if total <= minutes else "popular"


def sample(trace: Trace, n: int, seed: int) -> list[TraceFunction]:
    """``n`` functions, stratified by popularity in proportion to each class's
    size, at least one from each non-empty class when ``n`` allows.  Only
    functions invoked in the window and with durations are eligible."""
    eligible = sorted((f for f in trace.functions if f.total and f.durations), key=lambda f: f.id)
    if not 0 < n <= len(eligible):
        raise TraceError(f"cannot sample {n} functions: the trace has {len(eligible)} invoked "
                         "in the window and with durations")
    by_class = {c: [f for f in eligible if popularity(f, trace.minutes) == c] for c in CLASSES}
    take = dict.fromkeys(CLASSES, 0)
    if n >= sum(1 for c in CLASSES if by_class[c]):
        take.update({c: 1 for c in CLASSES if by_class[c]})
    while sum(take.values()) < n:   # the class furthest below its share gets the next one
        open_ = [c for c in CLASSES if take[c] < len(by_class[c])]
        c = max(open_, key=lambda c: len(by_class[c]) * n / len(eligible) - take[c])
        take[c] += 1
    rng = random.Random(seed)
    picked = [f for c in CLASSES for f in rng.sample(by_class[c], take[c])]
    return sorted(picked, key=lambda f: f.id)


def nearest(fn: TraceFunction) -> str:
    """Our function nearest to ``fn`` in log duration (median of the averages)
    and, at half weight, log memory (the app's median against our cap).
    Without a memory row the duration decides alone; while every cap in
    czone.functions is equal the memory term cannot change the choice."""
    if fn.durations is None:
        raise TraceError(f"function {fn.id} has no durations: it cannot be mapped")
    dur = max(fn.durations.median, 0.001)

    def distance(name: str) -> float:
        d = abs(math.log(dur / TYPICAL_MS[name]))
        if fn.memory is not None and fn.memory.median > 0:
            d += MEMORY_WEIGHT * abs(math.log(fn.memory.median / FUNCTIONS[name][0]))
        return d
    return min(FUNCTIONS, key=distance)   # ties: the catalog's order


def assign(functions: Sequence[TraceFunction],
           by: Literal["nearest", "rank"] = "nearest") -> dict[str, str]:
    """trace function id -> our function.  ``nearest``: each on its own
    (Azure's medians, tens of ms to seconds, mostly land on our slowest);
    ``rank``: the functions sorted by median duration are cut into as many
    equal runs as we have functions, shortest run to our fastest, so every
    one of ours is used and the order of durations is kept."""
    if by == "nearest":
        return {f.id: nearest(f) for f in functions}
    if any(f.durations is None for f in functions):
        raise TraceError("rank mapping needs durations for every function")
    ours = sorted(TYPICAL_MS, key=lambda name: TYPICAL_MS[name])
    ordered = sorted(functions, key=lambda f: (f.durations.median, f.id))  # type: ignore[union-attr]
    return {f.id: ours[i * len(ours) // len(ordered)] for i, f in enumerate(ordered)}


def events(functions: Sequence[TraceFunction], mapping: dict[str, str], seed: int,
           speedup: float = 1.0) -> list[Invocation]:
    """The invocations of ``functions`` in time order, times divided by
    ``speedup``.  The 2019 trace only counts per minute: a minute's
    invocations get uniform random offsets in it, from a generator seeded
    by (seed, function), so a function's events do not depend on which
    others were sampled.  2021 functions keep their recorded starts."""
    if not speedup > 0:
        raise TraceError(f"speedup must be positive, not {speedup}")
    out: list[Invocation] = []
    for fn in functions:
        name = mapping[fn.id]
        if fn.starts is not None:
            out += (Invocation(t / speedup, fn.id, name) for t in fn.starts)
            continue
        rng = random.Random(f"{seed}:{fn.id}")
        for minute, count in enumerate(fn.per_minute):
            for u in sorted(rng.random() for _ in range(count)):
                out.append(Invocation((minute + u) * 60.0 / speedup, fn.id, name))
    out.sort()
    return out


@dataclass(frozen=True)
class Plan:
    trace: Trace
    functions: list[TraceFunction]
    mapping: dict[str, str]
    events: list[Invocation] = field(repr=False)


def plan(path: Path, n: int, seed: int, speedup: float = 1.0, start: int = 0,
         minutes: int | None = None, by: Literal["nearest", "rank"] = "nearest") -> Plan:
    """What a replayer needs: load, sample ``n``, map, and list the events."""
    trace = load(path, start, minutes)
    functions = sample(trace, n, seed)
    mapping = assign(functions, by)
    return Plan(trace, functions, mapping, events(functions, mapping, seed, speedup))


# ------------------------------------------------------------- generator


def _poisson(rng: random.Random, lam: float) -> int:
    if lam <= 0:
        return 0
    if lam > 30:   # Knuth's loop would be slow; the normal approximation is close here
        return max(0, round(rng.gauss(lam, math.sqrt(lam))))
    limit, k, p = math.exp(-lam), 0, rng.random()
    while p > limit:
        k += 1
        p *= rng.random()
    return k


def _rates(shape: Shape, mean: float, minutes: int, rng: random.Random) -> Iterator[float]:
    """Per-minute rates averaging about ``mean``.  bursty: idle at 1/20 of
    the mean, with bursts (about one every two hours, ten minutes long) at
    twelve times it; diurnal: a sine over the day, peaking near noon."""
    if shape == "steady":
        yield from (mean for _ in range(minutes))
    elif shape == "diurnal":
        phase = rng.uniform(-60, 60)
        for m in range(minutes):
            yield mean * (1 + 0.8 * math.sin(2 * math.pi * (m - 360 + phase) / MINUTES_PER_DAY))
    else:
        on = False
        for _ in range(minutes):
            on = rng.random() >= 0.1 if on else rng.random() < 1 / 120
            yield mean * (12.0 if on else 0.05)


def _hash(seed: int, kind: str, i: int) -> str:
    return hashlib.sha256(f"czone-trace:{seed}:{kind}:{i}".encode()).hexdigest()


@dataclass
class _Synthetic:
    owner: str
    app: str
    function: str
    trigger: str
    counts: list[int]
    median_ms: float
    sigma: float


def _population(shape: Shape, n: int, minutes: int, seed: int
                ) -> tuple[list[_Synthetic], dict[tuple[str, str], float]]:
    """``n`` functions in apps of 1-3 functions, owners of 1-2 apps; a mean
    rate per class (45% rare, 36% medium, 19% popular, the ATC'20 marks);
    log-normal durations (median 300 ms, chosen by hand, not fitted); an
    app median memory around 150 MB, with no memory row for one app in 10
    (the 4th, 14th, ...)."""
    rng = random.Random(seed)
    fns: list[_Synthetic] = []
    memory: dict[tuple[str, str], float] = {}
    owner, app = "", ""
    apps = apps_left = fns_left = 0
    for i in range(n):
        if fns_left == 0:
            if apps_left == 0:
                owner, apps_left = _hash(seed, "owner", i), rng.randint(1, 2)
            app, fns_left = _hash(seed, "app", i), rng.randint(1, 3)
            apps_left -= 1
            mb = math.exp(rng.gauss(math.log(150), 0.4))
            if apps % 10 != 3:   # the 4th, 14th, ... app has no memory row
                memory[(owner, app)] = mb
            apps += 1
        fns_left -= 1
        r = rng.random()
        per_hour = (rng.uniform(0.2, 1) if r < 0.45 else
                    rng.uniform(1, 60) if r < 0.81 else rng.uniform(60, 1200))
        counts = [_poisson(rng, lam) for lam in _rates(shape, per_hour / 60, minutes, rng)]
        fns.append(_Synthetic(owner, app, _hash(seed, "function", i), rng.choice(TRIGGERS),
                              counts, min(max(math.exp(rng.gauss(math.log(300), 1.8)), 1), 6e5),
                              rng.uniform(0.1, 0.8)))
    return fns, memory


_Z = {0: -3.0, 1: -2.326, 5: -1.645, 25: -0.674, 50: 0.0, 75: 0.674, 95: 1.645, 99: 2.326,
      100: 3.0}   # standard normal quantiles; 0 and 100 taken at three sigma


def _fmt(x: float) -> str:
    return f"{x:.6g}" if x < 1e6 else f"{x:.1f}"


def generate(directory: Path, shape: Shape, functions: int, minutes: int, seed: int,
             fmt: Literal["2019", "2021"] = "2019") -> list[Path]:
    """Write a synthetic trace into ``directory``; return the files written.

    2019: the three kinds of file for each day covered (whole days of 1440
    minute columns, zero past ``minutes``; a function not invoked on a day
    has no row that day; no memory file past day 12, as in the release).
    2021: one row per invocation, ordered by end time.
    """
    if shape not in SHAPES:
        raise TraceError(f"unknown shape {shape!r} (known: {', '.join(SHAPES)})")
    if functions < 1 or minutes < 1:
        raise TraceError("a trace needs at least one function and one minute")
    if fmt == "2019" and minutes > DAYS_2019 * MINUTES_PER_DAY:
        raise TraceError(f"the 2019 format holds at most {DAYS_2019} days "
                         f"({DAYS_2019 * MINUTES_PER_DAY} minutes)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    fns, memory = _population(shape, functions, minutes, seed)
    rng = random.Random(f"{seed}:durations")
    if fmt == "2021":
        rows = []
        for f in fns:
            for minute, count in enumerate(f.counts):
                for _ in range(count):
                    # away from the minute's edges, so end - duration stays in it
                    t = (minute + rng.uniform(0.001, 0.999)) * 60
                    dur = round(max(f.median_ms * math.exp(rng.gauss(0, f.sigma)) / 1000,
                                    0.001), 3)
                    rows.append((t + dur, f.app, f.function, dur))
        rows.sort()
        path = directory / TRACE_2021
        with path.open("w", newline="") as out:
            w = csv.writer(out, lineterminator="\n")
            w.writerow(COLS_2021)
            w.writerows((app, func, repr(end), f"{dur:.3f}") for end, app, func, dur in rows)
        return [path]
    written = []
    for day in range(1, math.ceil(minutes / MINUTES_PER_DAY) + 1):
        lo = (day - 1) * MINUTES_PER_DAY
        today = [(f, f.counts[lo:lo + MINUTES_PER_DAY]) for f in fns]
        today = [(f, c + [0] * (MINUTES_PER_DAY - len(c))) for f, c in today if any(c)]
        paths = [directory / name.format(day) for name in (INVOCATIONS, DURATIONS, MEMORY)]
        with paths[0].open("w", newline="") as out:
            w = csv.writer(out, lineterminator="\n")
            w.writerow((*INVOCATION_COLS, *range(1, MINUTES_PER_DAY + 1)))
            w.writerows((f.owner, f.app, f.function, f.trigger, *c) for f, c in today)
        with paths[1].open("w", newline="") as out:
            w = csv.writer(out, lineterminator="\n")
            w.writerow(DURATION_COLS)
            for f, c in today:
                pct = [f.median_ms * math.exp(f.sigma * _Z[p]) for p in DURATION_PCTS]
                w.writerow((f.owner, f.app, f.function,
                            _fmt(f.median_ms * math.exp(f.sigma ** 2 / 2)), sum(c),
                            _fmt(pct[0] * 0.9), _fmt(pct[-1] * 1.1), *map(_fmt, pct)))
        written += paths[:2]
        if day <= 12:
            with paths[2].open("w", newline="") as out:
                w = csv.writer(out, lineterminator="\n")
                w.writerow(MEMORY_COLS)
                active: dict[tuple[str, str], int] = {}   # minutes with invocations
                for f, c in today:
                    active[(f.owner, f.app)] = active.get((f.owner, f.app), 0) + sum(
                        1 for x in c if x)
                for (owner, app), busy in active.items():
                    if (owner, app) in memory:   # one sample every 5 s while busy
                        mb = memory[(owner, app)]
                        w.writerow((owner, app, 12 * busy, _fmt(mb * 1.01),
                                    *(_fmt(mb * math.exp(0.15 * _Z[p])) for p in MEMORY_PCTS)))
            written.append(paths[2])
    return written
