from czone.bench import __main__ as bench_main
from czone.bench import guestvm, report


def test_samples_parse_only_their_kind():
    out = ("fault size_mib=256 round=0 outside_ns=10 warm_ns=9 cold_ns=11\n"
           "destroy size_mib=64 round=0 czone_ns=5 offline_ns=50\n"
           "noise\n"
           "fault size_mib=256 round=1 outside_ns=12 warm_ns=10 cold_ns=13\n")
    rows = guestvm.samples(out, "fault")
    assert [r["round"] for r in rows] == [0, 1]
    assert rows[1]["cold_ns"] == 13
    assert guestvm.samples(out, "destroy")[0]["offline_ns"] == 50


def test_median_and_table():
    assert report.median([3.0, 1.0, 2.0]) == 2.0
    text = report.table(["a", "b"], [["x", 1.23456], ["y", 2]])
    assert text.splitlines()[0] == "| a | b |"
    assert "| x | 1.23 |" in text and "| y | 2 |" in text


def test_bad_bench_settings_are_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("CZONE_RECLAIM_SIZES", "lots")
    assert bench_main.main(["--results", str(tmp_path), "reclaim"]) == 1
    assert capsys.readouterr().err == (
        "bench reclaim: error: CZONE_RECLAIM_SIZES='lots': want MiB like 64,256,1024\n")
    # the report still says what ran: nothing
    assert "Scenarios not run: startup, footprint, reclaim, runtime, replay." in \
        (tmp_path / "REPORT.md").read_text()


def test_the_recorded_command_carries_the_knobs():
    env = {"CZONE_REPLAY_MINUTES": "10", "CZONE_BENCH_K": "8", "HOME": "/root"}
    assert bench_main.command_line(False, ["startup", "replay"], env) == \
        "CZONE_BENCH_K=8 CZONE_REPLAY_MINUTES=10 make bench BENCH='startup replay'"
    assert bench_main.command_line(True, [], {}) == "make bench QUICK=1"
