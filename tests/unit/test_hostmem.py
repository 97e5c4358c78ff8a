import os
import subprocess

import pytest

from czone import hostmem
from czone.errors import CZoneError
from czone.hostmem import MiB


def test_own_rss_and_pss_are_plausible() -> None:
    rss, pss = hostmem.rss_bytes(os.getpid()), hostmem.pss_bytes(os.getpid())
    assert 1 * MiB < rss < 4096 * MiB
    assert 0 < pss <= rss + MiB


def test_settle_waits_for_the_value_to_stop_moving() -> None:
    values = iter([0, 10 * MiB, 20 * MiB, 30 * MiB] + [30 * MiB] * 1000)
    got = hostmem.settle(lambda: next(values), quiet=0.05, interval=0.001)
    assert got.value == 30 * MiB


def test_settle_ignores_moves_within_the_tolerance() -> None:
    values = iter([100 * MiB, 100 * MiB + 4096] * 1000)
    assert hostmem.settle(lambda: next(values), quiet=0.02, interval=0.001).value \
        in (100 * MiB, 100 * MiB + 4096)


def test_settle_times_out_with_the_last_samples() -> None:
    counter = iter(range(0, 10**9, 4 * MiB))
    with pytest.raises(hostmem.NotStable, match="still moving"):
        hostmem.settle(lambda: next(counter), timeout=0.1, quiet=0.05, interval=0.001)


def test_rss_watch_sees_memory_come_and_go() -> None:
    with hostmem.RssWatch(os.getpid(), tolerance=8 * MiB) as w:
        import time
        t0 = time.monotonic()
        blob = bytearray(64 * MiB)
        blob[::4096] = b"\1" * len(blob[::4096])
        before, after, latency = w.finish(t0, quiet=0.3)
    assert after - before >= 48 * MiB
    assert 0 <= latency < 10
    del blob


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
