"""czone.trace: the Azure Functions readers on small files in the datasets'
exact formats, sampling, mapping, events and the synthetic generator."""

from __future__ import annotations

import math
import statistics
import subprocess
import sys
from array import array
from pathlib import Path

import pytest
from click.testing import CliRunner

from czone import trace as tr
from czone.cli import cli
from czone.errors import CZoneError
from czone.functions import FUNCTIONS

# The headers as the public files spell them (written out, not built from
# czone.trace's constants, so a misspelt constant fails here).
INV_HEADER = "HashOwner,HashApp,HashFunction,Trigger," + ",".join(map(str, range(1, 1441)))
DUR_HEADER = ("HashOwner,HashApp,HashFunction,Average,Count,Minimum,Maximum,"
              "percentile_Average_0,percentile_Average_1,percentile_Average_25,"
              "percentile_Average_50,percentile_Average_75,percentile_Average_99,"
              "percentile_Average_100")
MEM_HEADER = ("HashOwner,HashApp,SampleCount,AverageAllocatedMb,AverageAllocatedMb_pct1,"
              "AverageAllocatedMb_pct5,AverageAllocatedMb_pct25,AverageAllocatedMb_pct50,"
              "AverageAllocatedMb_pct75,AverageAllocatedMb_pct95,AverageAllocatedMb_pct99,"
              "AverageAllocatedMb_pct100")
HEADER_2021 = "app,func,end_timestamp,duration"


def minutes_row(counts: dict[int, int], empty_zero: bool = False) -> str:
    """Cells for minutes 1..1440; idle minutes as "0" or as empty cells."""
    zero = "" if empty_zero else "0"
    return ",".join(str(counts[m]) if m in counts else zero for m in range(1, 1441))


def write_day(d: Path, day: int, inv: list[str], dur: list[str], mem: list[str] | None,
              newline: str = "\n") -> None:
    (d / f"invocations_per_function_md.anon.d{day:02d}.csv").write_text(
        newline.join([INV_HEADER, *inv]) + newline)
    (d / f"function_durations_percentiles.anon.d{day:02d}.csv").write_text(
        newline.join([DUR_HEADER, *dur]) + newline)
    if mem is not None:
        (d / f"app_memory_percentiles.anon.d{day:02d}.csv").write_text(
            newline.join([MEM_HEADER, *mem]) + newline)


def dur_row(key: str, median: float, count: int = 10, minmax: str = "1,900") -> str:
    return (f"{key},{median * 1.1},{count},{minmax},1,2,{median / 2},{median},{median * 2},"
            f"{median * 4},{median * 5}")


@pytest.fixture
def day1(tmp_path: Path) -> Path:
    """o1/a1 has two functions, one of them quoted with commas in its ids and
    CRLF line ends; o2/a2 has no memory row; f3 has no durations row."""
    write_day(tmp_path, 1, inv=[
        '"o1","a,1","f,1",http,' + minutes_row({1: 3, 2: 1, 1440: 7}, empty_zero=True),
        "o1,a2x,f2,timer," + minutes_row({60: 2}),
        "o2,a2,f3,queue," + minutes_row({5: 1}, empty_zero=True),
        "o2,a2,f4,queue," + minutes_row({6: 4}),
    ], dur=[
        dur_row('"o1","a,1","f,1"', 8.0, minmax=","),   # minimum and maximum not recorded
        dur_row("o1,a2x,f2", 18.0),
        dur_row("o2,a2,f4", 2.0),
    ], mem=[
        '"o1","a,1",24,130.5,100,110,120,128,140,150,160,170',
        "o1,a2x,12,64,60,61,62,63,64,65,66,67",
    ], newline="\r\n")
    return tmp_path


def by_id(trace: tr.Trace) -> dict[str, tr.TraceFunction]:
    return {f.id: f for f in trace.functions}


# ------------------------------------------------------------- readers


def test_2019_reader_quoting_empty_minutes_and_missing_memory(day1: Path) -> None:
    t = tr.load(day1)
    assert (t.source, t.minutes) == ("2019", 1440)
    fns = by_id(t)
    f1 = fns["a,1/f,1"]
    assert (f1.owner, f1.app, f1.function, f1.trigger) == ("o1", "a,1", "f,1", "http")
    assert (f1.per_minute[0], f1.per_minute[1], f1.per_minute[2], f1.per_minute[1439]) \
        == (3, 1, 0, 7)
    assert f1.total == 11
    assert f1.durations is not None and f1.durations.median == 8.0
    assert f1.durations.minimum is None and f1.durations.maximum is None
    assert f1.memory is not None and f1.memory.median == 128 and 1 in f1.memory.percentiles
    assert fns["a2x/f2"].per_minute[59] == 2 and fns["a2x/f2"].memory.median == 63
    # o2/a2 has no memory row: its functions are kept, with no memory
    assert fns["a2/f4"].memory is None and fns["a2/f4"].total == 4
    assert fns["a2/f3"].durations is None and fns["a2/f3"].total == 1


def test_2019_repeated_rows_add_up_and_the_largest_count_wins(tmp_path: Path) -> None:
    write_day(tmp_path, 1, inv=["o,a,f,http," + minutes_row({1: 2}),
                                "o,a,f,http," + minutes_row({1: 3, 2: 1})],
              dur=[dur_row("o,a,f", 5.0, count=4), dur_row("o,a,f", 50.0, count=40),
                   dur_row("o,a,f", 7.0, count=1)], mem=[])
    (f,) = tr.load(tmp_path).functions
    assert list(f.per_minute[:3]) == [5, 1, 0]
    assert f.durations is not None and f.durations.median == 50.0


def test_2019_days_are_laid_end_to_end_and_cut_to_the_window(tmp_path: Path) -> None:
    write_day(tmp_path, 13, inv=["o,a,f,http," + minutes_row({1440: 1})],
              dur=[dur_row("o,a,f", 5.0)], mem=None)      # no memory past day 12
    write_day(tmp_path, 14, inv=["o,a,f,http," + minutes_row({1: 2}),
                                 "o,a,g,http," + minutes_row({3: 5})],
              dur=[dur_row("o,a,f", 5.0), dur_row("o,a,g", 9.0)], mem=None)
    assert tr.days_in(tmp_path) == [13, 14]
    t = tr.load(tmp_path)
    assert t.minutes == 2880
    f, g = by_id(t)["a/f"], by_id(t)["a/g"]
    assert (f.per_minute[1439], f.per_minute[1440], f.total) == (1, 2, 3)
    assert (g.per_minute[1442], g.total, g.memory) == (5, 5, None)
    w = tr.load_2019(tmp_path, start=1439, minutes=3)
    assert w.minutes == 3
    assert list(by_id(w)["a/f"].per_minute) == [1, 2, 0]
    assert list(by_id(w)["a/g"].per_minute) == [0, 0, 0]


def test_2021_reader(tmp_path: Path) -> None:
    path = tmp_path / "AzureFunctionsInvocationTraceForTwoWeeksJan2021.txt"
    path.write_text(HEADER_2021 + "\n"
                    "a1,f1,61.5,0.5\n"        # starts at 61.0: minute 1
                    "a1,f1,130.0,10.0\n"      # 120.0: minute 2
                    "a1,f2,0.2,0.3\n"         # began before the trace: taken as 0
                    '"a,2","f,2",5.25,0.25\n')
    t = tr.load(tmp_path)
    assert (t.source, t.minutes) == ("2021", 3)
    fns = by_id(t)
    f1 = fns["a1/f1"]
    assert f1.starts == [61.0, 120.0] and list(f1.per_minute) == [0, 1, 1]
    assert f1.durations is not None and f1.memory is None
    assert (f1.durations.minimum, f1.durations.maximum, f1.durations.median) \
        == (500.0, 10000.0, 500.0)
    assert fns["a1/f2"].starts == [0.0]
    assert fns["a,2/f,2"].starts == [5.0]
    w = tr.load_2021(path, start=1, minutes=1)
    assert by_id(w)["a1/f1"].starts == [1.0] and set(by_id(w)) == {"a1/f1"}


BAD_2019 = [
    # (file to spoil, its new text, what the message says)
    ("function_durations_percentiles.anon.d01.csv",
     DUR_HEADER.replace("percentile_Average_50", "percentile_Average50") + "\n",
     "header lacks column 'percentile_Average_50'"),
    ("app_memory_percentiles.anon.d01.csv",
     MEM_HEADER.replace("AverageAllocatedMb_pct5,", "") + "\n",
     "header lacks column 'AverageAllocatedMb_pct5'"),
    ("invocations_per_function_md.anon.d01.csv",
     INV_HEADER.rsplit(",", 1)[0] + "\n", "header lacks column '1440'"),
    ("invocations_per_function_md.anon.d01.csv",
     INV_HEADER + "\no,a,f,http," + minutes_row({7: "x"}) + "\n",  # type: ignore[dict-item]
     ".csv:2: column '7': not a number: 'x'"),
    ("invocations_per_function_md.anon.d01.csv",
     INV_HEADER + "\no,a,f,http," + minutes_row({7: "1.5"}) + "\n",  # type: ignore[dict-item]
     ".csv:2: column '7': not a count: '1.5'"),
    ("invocations_per_function_md.anon.d01.csv",
     INV_HEADER + "\no,a,f,http," + minutes_row({}) + ",0\n", ".csv:2: 1445 fields"),
    ("function_durations_percentiles.anon.d01.csv",
     DUR_HEADER + "\n" + dur_row("o,a,f", -3.0) + "\n", "not a count or time: '-"),
    ("function_durations_percentiles.anon.d01.csv", "", "empty file"),
    ("invocations_per_function_md.anon.d01.csv",
     INV_HEADER + '\n"o,a,f,http,' + minutes_row({}) + "\n", "fields"),
]


@pytest.mark.parametrize(("name", "text", "says"), BAD_2019)
def test_bad_2019_files_give_one_line(day1: Path, name: str, text: str, says: str) -> None:
    (day1 / name).write_text(text)
    with pytest.raises(tr.TraceError) as e:
        tr.load(day1)
    assert isinstance(e.value, CZoneError)
    assert says in str(e.value) and name in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(("text", "says"), [
    ("app,func,end,duration\n", "header lacks column 'end_timestamp'"),
    (HEADER_2021 + "\na,f,12.0,\n", ":2: column 'duration' is empty"),
    (HEADER_2021 + "\na,f,nan,1\n", "not a count or time: 'nan'"),
    (HEADER_2021 + "\na,f,1\n", ":2: 3 fields, the header has 4"),
])
def test_bad_2021_files_give_one_line(tmp_path: Path, text: str, says: str) -> None:
    (tmp_path / tr.TRACE_2021).write_text(text)
    with pytest.raises(tr.TraceError, match=None) as e:
        tr.load(tmp_path)
    assert says in str(e.value) and "\n" not in str(e.value)


def test_missing_trace_and_bad_windows(tmp_path: Path, day1: Path) -> None:
    with pytest.raises(tr.TraceError, match="no such trace"):
        tr.load(tmp_path / "none")
    (day1 / "invocations_per_function_md.anon.d03.csv").write_text(INV_HEADER + "\n")
    with pytest.raises(tr.TraceError, match="consecutive"):
        tr.load(day1)
    with pytest.raises(tr.TraceError, match="outside"):
        tr.load_2019(day1, days=[1], start=1440)
    with pytest.raises(tr.TraceError, match="cannot read"):
        tr.load_2019(day1, days=[1, 2])


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    (tmp_path / tr.TRACE_2021).write_text("app,func\n")
    res = CliRunner().invoke(cli, ["trace", "show", str(tmp_path)])
    assert res.exit_code == 1
    assert res.output.count("\n") == 1 and res.output.startswith("czonectl: error: ")
    assert "header lacks column 'end_timestamp'" in res.output


# ----------------------------------------------- sampling and mapping


def fake(i: int, total: int, median: float | None = 10.0, memory: float | None = None,
         minutes: int = 600) -> tr.TraceFunction:
    per_minute = array("I", bytes(4 * minutes))
    per_minute[0] = total
    return tr.TraceFunction(
        "o", f"a{i:03d}", "f", "http", per_minute,
        None if median is None else tr.Durations(median, 1, None, None, {50: median}),
        None if memory is None else tr.Memory(1, memory, {50: memory}))


def test_popularity_marks() -> None:
    # 600 minutes: rare up to 10 invocations (1/hour), medium up to 600 (1/minute)
    assert [tr.popularity(fake(0, n), 600) for n in (1, 10, 11, 600, 601)] \
        == ["rare", "rare", "medium", "medium", "popular"]


def test_sample_is_stratified_deterministic_and_skips_unmappable() -> None:
    fns = ([fake(i, 5) for i in range(30)] + [fake(100 + i, 50) for i in range(20)]
           + [fake(200 + i, 5000) for i in range(10)]
           + [fake(300, 0), fake(301, 5000, median=None)])   # never invoked; no durations
    t = tr.Trace(tuple(fns), 600, "2019")
    picked = tr.sample(t, 6, seed=1)
    classes = [tr.popularity(f, 600) for f in picked]
    assert (classes.count("rare"), classes.count("medium"), classes.count("popular")) == (3, 2, 1)
    assert [f.id for f in tr.sample(t, 6, seed=1)] == [f.id for f in picked]
    assert [f.id for f in tr.sample(t, 6, seed=2)] != [f.id for f in picked]
    assert len({f.id for f in tr.sample(t, 60, seed=1)}) == 60
    with pytest.raises(tr.TraceError, match="cannot sample 61 functions"):
        tr.sample(t, 61, seed=1)


def test_sample_takes_one_of_each_class_when_it_can() -> None:
    t = tr.Trace(tuple([fake(i, 5) for i in range(100)] + [fake(100, 5000)]), 600, "2019")
    assert "popular" in [tr.popularity(f, 600) for f in tr.sample(t, 2, seed=0)]


def test_nearest_maps_by_duration_and_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    assert set(tr.TYPICAL_MS) == set(FUNCTIONS)
    for name, ms in tr.TYPICAL_MS.items():
        assert tr.nearest(fake(0, 1, median=ms)) == name
        assert tr.nearest(fake(0, 1, median=ms, memory=400)) == name   # equal caps
    assert tr.nearest(fake(0, 1, median=5000)) == "float_operation"
    # log space: 14.85 ms is past sqrt(12 * 18) = 14.7, the midpoint of pyaes and float_operation
    assert tr.nearest(fake(0, 1, median=14.85)) == "float_operation"
    assert tr.nearest(fake(0, 1, median=14.6)) == "pyaes"
    assert tr.nearest(fake(0, 1, median=0.01)) == "matmul"
    # with unequal caps, memory moves a function between neighbours in duration
    caps = {**FUNCTIONS, "pyaes": (1024, ""), "json_dumps_loads": (128, "")}
    monkeypatch.setattr(tr, "FUNCTIONS", caps)
    assert tr.nearest(fake(0, 1, median=9.5, memory=128)) == "json_dumps_loads"
    assert tr.nearest(fake(0, 1, median=9.5, memory=1000)) == "pyaes"
    with pytest.raises(tr.TraceError, match="no durations"):
        tr.nearest(fake(0, 1, median=None))


def test_rank_uses_all_ours_in_duration_order() -> None:
    fns = [fake(i, 1, median=100.0 + i) for i in range(14)]
    mapping = tr.assign(fns, by="rank")
    ours = sorted(tr.TYPICAL_MS, key=tr.TYPICAL_MS.__getitem__)
    assert [mapping[f.id] for f in fns] == [name for name in ours for _ in range(2)]


# ------------------------------------------------------------- events


def test_events_are_deterministic_scaled_and_within_their_minute(day1: Path) -> None:
    t = tr.load(day1)
    fns = [f for f in t.functions if f.durations]
    mapping = tr.assign(fns)
    ev = tr.events(fns, mapping, seed=7, speedup=60)
    assert ev == tr.events(fns, mapping, seed=7, speedup=60)
    assert ev != tr.events(fns, mapping, seed=8, speedup=60)
    assert ev == sorted(ev) and len(ev) == sum(f.total for f in fns)
    f1 = [e.t for e in ev if e.trace_id == "a,1/f,1"]
    assert all(0 <= x < 2 for x in f1[:4]) and all(1439 <= x < 1440 for x in f1[4:])
    assert {e.function for e in ev} == set(mapping.values())
    # a function's events do not depend on which others were sampled
    alone = tr.events(fns[:1], mapping, seed=7, speedup=60)
    assert alone == [e for e in ev if e.trace_id == fns[0].id]
    with pytest.raises(tr.TraceError, match="speedup"):
        tr.events(fns, mapping, seed=7, speedup=0)


def test_events_of_twin_functions_do_not_coincide() -> None:
    """Two functions invoked in the same minutes are not invoked at the same instants."""
    twins = [fake(1, 5), fake(2, 5)]
    ev = tr.events(twins, {f.id: "pyaes" for f in twins}, seed=3)
    assert len({e.t for e in ev}) == 10


def test_events_keep_2021_starts(tmp_path: Path) -> None:
    (tmp_path / tr.TRACE_2021).write_text(HEADER_2021 + "\na,f,10.0,2.0\na,f,4.0,1.0\n")
    p = tr.plan(tmp_path, 1, seed=0, speedup=2)
    assert [e.t for e in p.events] == [1.5, 4.0]
    assert p.mapping == {"a/f": tr.nearest(p.functions[0])}


# ---------------------------------------------------------- generator


@pytest.mark.parametrize("shape", tr.SHAPES)
def test_generator_round_trip_2019(tmp_path: Path, shape: tr.Shape) -> None:
    files = tr.generate(tmp_path, shape, functions=30, minutes=1500, seed=4)
    assert sorted(p.name for p in files) == sorted(
        f"{kind}.anon.d{d:02d}.csv" for d in (1, 2) for kind in (
            "invocations_per_function_md", "function_durations_percentiles",
            "app_memory_percentiles"))
    heads = {p.name[:12]: p.read_text().split("\n", 1)[0] for p in files}
    assert heads == {"invocations_": INV_HEADER, "function_dur": DUR_HEADER,
                     "app_memory_p": MEM_HEADER}
    population, memory = tr._population(shape, 30, 1500, 4)
    t = tr.load(tmp_path)
    assert t.minutes == 2880
    fns = by_id(t)
    assert set(fns) == {f"{f.app}/{f.function}" for f in population if any(f.counts)}
    for f in population:
        if any(f.counts):
            got = fns[f"{f.app}/{f.function}"]
            assert list(got.per_minute) == f.counts + [0] * (2880 - 1500)
            assert got.durations is not None
            assert got.durations.median == pytest.approx(f.median_ms, rel=1e-5)
            assert (got.memory is None) == ((f.owner, f.app) not in memory)
    assert any(f.memory is None for f in t.functions)


def test_generator_round_trip_2021(tmp_path: Path) -> None:
    (path,) = tr.generate(tmp_path, "bursty", functions=8, minutes=90, seed=5, fmt="2021")
    assert path.name == "AzureFunctionsInvocationTraceForTwoWeeksJan2021.txt"
    assert path.read_text().split("\n", 1)[0] == HEADER_2021
    population, _ = tr._population("bursty", 8, 90, 5)
    fns = by_id(tr.load(tmp_path, minutes=90))
    for f in population:
        if any(f.counts):
            assert list(fns[f"{f.app}/{f.function}"].per_minute) == f.counts


def test_generator_writes_no_memory_past_day_12(tmp_path: Path) -> None:
    names = {p.name for p in tr.generate(tmp_path, "steady", 2, 13 * 1440, seed=0)}
    assert "app_memory_percentiles.anon.d12.csv" in names
    assert "app_memory_percentiles.anon.d13.csv" not in names
    assert "function_durations_percentiles.anon.d13.csv" in names
    with pytest.raises(tr.TraceError, match="at most 14 days"):
        tr.generate(tmp_path, "steady", 2, 14 * 1440 + 1, seed=0)


def per_minute_total(shape: tr.Shape) -> list[int]:
    population, _ = tr._population(shape, 60, 1440, seed=11)
    return [sum(col) for col in zip(*(f.counts for f in population), strict=True)]


def test_shapes_differ() -> None:
    steady, bursty, diurnal = (per_minute_total(s) for s in ("steady", "bursty", "diurnal"))

    def dispersion(xs: list[int]) -> float:
        return statistics.pvariance(xs) / statistics.mean(xs)
    assert dispersion(bursty) > 5 * dispersion(steady)
    day, night = sum(diurnal[360:1080]), sum(diurnal[:360]) + sum(diurnal[1080:])
    assert day > 2 * night
    assert math.isclose(sum(steady[360:1080]), sum(steady[:360]) + sum(steady[1080:]),
                        rel_tol=0.2)


def test_cli_gen_and_show(tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(cli, ["trace", "gen", str(tmp_path), "--shape", "diurnal",
                              "--functions", "20", "--minutes", "120", "--seed", "1"])
    assert res.exit_code == 0, res.output
    assert "wrote 3 file(s)" in res.output
    res = runner.invoke(cli, ["trace", "show", str(tmp_path), "--speedup", "10"])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert len(lines) <= 24 and lines[0].startswith(f"{tmp_path}: 2019 format, 1440 minutes")
    assert any(line.startswith("sample of ") for line in lines)
    res = runner.invoke(cli, ["trace", "show", str(tmp_path), "--functions", "999"])
    assert res.exit_code == 1 and res.output.count("\n") == 1


def test_the_module_is_pure() -> None:
    out = subprocess.run([sys.executable, "-c", "import sys, czone.trace; print(sorted("
                          "m for m in sys.modules if m.startswith('czone')))"],
                         capture_output=True, text=True, check=True, cwd=Path(__file__).parents[2])
    assert out.stdout.strip() == str(["czone", "czone.errors", "czone.functions", "czone.trace"])
