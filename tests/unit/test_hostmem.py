import mmap
import os
import subprocess
import time

import pytest

from czone import hostmem
from czone.errors import CZoneError
from czone.hostmem import MiB


def touched(nbytes: int) -> mmap.mmap:
    m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m.madvise(mmap.MADV_NOHUGEPAGE)
    for off in range(0, nbytes, hostmem.PAGE):
        m[off] = 1
    return m


def test_rss_and_pss_count_the_bytes_touched() -> None:
    pid = os.getpid()
    rss, pss = hostmem.rss_bytes(pid), hostmem.pss_bytes(pid)
    with touched(64 * MiB):
        grown_rss = hostmem.rss_bytes(pid) - rss
        grown_pss = hostmem.pss_bytes(pid) - pss
    assert 63 * MiB <= grown_rss <= 66 * MiB, grown_rss / MiB
    assert 63 * MiB <= grown_pss <= 66 * MiB, grown_pss / MiB
    assert hostmem.rss_bytes(pid) - rss < 2 * MiB


def test_peak_rss_holds_the_high_water_mark_until_reset() -> None:
    pid = os.getpid()
    hostmem.reset_peak_rss(pid)
    base = hostmem.peak_rss_bytes(pid)
    with touched(64 * MiB):
        pass
    assert hostmem.peak_rss_bytes(pid) - base >= 63 * MiB
    assert hostmem.rss_bytes(pid) - base < 8 * MiB
    hostmem.reset_peak_rss(pid)
    assert hostmem.peak_rss_bytes(pid) - base < 8 * MiB


def test_settle_waits_for_the_value_to_stop_moving() -> None:
    values = iter([0, 10 * MiB, 20 * MiB, 30 * MiB] + [30 * MiB] * 1000)
    got = hostmem.settle(lambda: next(values), quiet=0.05, interval=0.001)
    assert got.value == 30 * MiB


def test_settle_ignores_moves_within_the_tolerance() -> None:
    read: list[int] = []

    def jitter() -> int:
        read.append(100 * MiB + 4096 * (len(read) % 2))
        return read[-1]

    t0 = time.monotonic()
    got = hostmem.settle(jitter, quiet=0.05, interval=0.001)
    assert got.value == read[-1] and got.samples == len(read)
    assert t0 <= got.at < t0 + 0.01, "a move within the tolerance reset the quiet period"


def test_settle_times_out_with_the_last_samples() -> None:
    counter = iter(range(0, 10**9, 4 * MiB))
    with pytest.raises(hostmem.NotStable, match="still moving"):
        hostmem.settle(lambda: next(counter), timeout=0.1, quiet=0.05, interval=0.001)


def series(*steps: tuple[float, float, float]) -> list[tuple[float, int]]:
    """Samples every 10 ms: each step is (from s, to s, MiB)."""
    return [(round(i * 0.01, 2), int(mib * MiB)) for start, end, mib in steps
            for i in range(round(start * 100), round(end * 100))]


@pytest.mark.parametrize("samples, after_mib, latency, t0", [
    # a plateau, one drop at 0.5 s, a plateau: 0.3 s after t0 = 0.2
    (series((0, 0.5, 300), (0.5, 2, 100)), 100, 0.3, 0.2),
    # noise below the 1 MiB tolerance after the drop does not count
    (series((0, 0.5, 300)) + [(round(0.5 + i * 0.01, 2), 100 * MiB + (i % 3 == 1) * MiB // 2)
                              for i in range(150)], 100, 0.3, 0.2),
    # a late drop of 5 MiB at 1.5 s is the end
    (series((0, 0.5, 300), (0.5, 1.5, 100), (1.5, 3, 95)), 95, 1.3, 0.2),
    # a move before t0 is not the change being timed, even one sample before
    (series((0, 0.2, 300), (0.2, 2, 100)), 100, 0.0, 0.195),
    # a ramp down, 20 MiB per 10 ms from 0.5 s, reaches 100 MiB at 0.6 s
    (series((0, 0.5, 300)) + [(round(0.5 + i * 0.01, 2), (300 - 20 * i) * MiB)
                              for i in range(11)] + series((0.61, 2, 100)), 100, 0.4, 0.2),
])
def test_settled_after_known_answers(samples: list[tuple[float, int]], after_mib: int,
                                     latency: float, t0: float) -> None:
    after, got = hostmem.settled_after(samples, t0=t0, quiet=1.0, tolerance=MiB)
    assert after == after_mib * MiB
    assert got == pytest.approx(latency, abs=1e-9)


def test_rss_watch_sees_memory_come_and_go() -> None:
    with hostmem.RssWatch(os.getpid(), tolerance=8 * MiB) as w:
        t0 = time.monotonic()
        blob = touched(64 * MiB)
        time.sleep(0.3)
        assert hostmem.rss_bytes(os.getpid()) - w.before >= 56 * MiB
        t_free = time.monotonic()
        blob.close()
        before, after, latency = w.finish(t0, quiet=0.3)
    assert abs(after - before) < 8 * MiB, "the memory did not go"
    assert t_free - t0 <= latency < t_free - t0 + 0.1, latency


def test_pss_of_another_users_process_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def denied(path: str, *a: object) -> None:
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(hostmem, "open", denied, raising=False)
    with pytest.raises(CZoneError, match=r"cannot read /proc/1/smaps_rollup: permission denied; "
                                         "the process belongs to another user"):
        hostmem.pss_bytes(1)


def test_rss_of_an_exited_process_is_one_clear_error() -> None:
    p = subprocess.Popen(["true"])
    p.wait()
    with pytest.raises(CZoneError, match=f"cannot read /proc/{p.pid}/statm: .* exited"):
        hostmem.rss_bytes(p.pid)


def test_smaps_totals_pick_the_mappings_asked_for(tmp_path) -> None:
    import mmap

    from czone.hostmem import MiB, smaps_total

    anon = mmap.mmap(-1, 8 * MiB)
    anon.write(b"x" * (8 * MiB))
    path = tmp_path / "f"
    path.write_bytes(b"y" * (4 * MiB))
    with open(path, "r+b") as f:
        mapped = mmap.mmap(f.fileno(), 0)
        assert sum(mapped[i] for i in range(0, 4 * MiB, 4096)) > 0  # fault it in
        in_file = smaps_total(os.getpid(), "Rss", lambda _p, name: name == str(path))
        assert in_file == 4 * MiB
        assert smaps_total(os.getpid(), "Rss", lambda _p, name: False) == 0
        assert smaps_total(os.getpid(), "Rss", lambda _p, name: name == "") >= 8 * MiB
        mapped.close()
    anon.close()


def test_rss_watch_waits_for_a_punched_memfd_to_be_freed() -> None:
    # RSS falls when the punch unmaps the pages; they are back when it freed them
    from czone.bench.reclaim_raw import punch_hole, touch

    size = 128 * MiB
    fd = os.memfd_create("czone-test-watch")
    try:
        os.ftruncate(fd, size)
        with mmap.mmap(fd, size) as m:
            m.madvise(mmap.MADV_NOHUGEPAGE)
            touch(m, size)
            with hostmem.RssWatch(os.getpid(), tolerance=MiB) as w:
                assert w.files_before >= size
                t0 = time.monotonic()
                punch_hole(fd, 0, size)
                call = time.monotonic() - t0
                _, _, latency = w.finish(t0, quiet=0.3)
    finally:
        os.close(fd)
    assert latency >= 0.9 * call, (latency, call)
