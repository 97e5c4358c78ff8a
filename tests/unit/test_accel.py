from __future__ import annotations

from pathlib import Path

import pytest

from czone import accel
from czone.errors import CZoneError

ARGS = ("6.12-czone", Path("/k/vmlinux"), Path("/i/rootfs"), Path("/q/qemu"), ())


def detect(state: Path, **kw: object) -> tuple[str, str]:
    return accel.detect(*ARGS, state_dir=state, **kw)  # type: ignore[arg-type]


@pytest.fixture
def probe_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []

    def fake_probe(*a: object, **kw: object) -> tuple[bool, str]:
        calls.append(1)
        return False, "KVM probe boot did not reach init within 15s"

    monkeypatch.setattr(accel, "probe_kvm", fake_probe)
    monkeypatch.setattr(accel, "kvm_device_usable", lambda: (True, "/dev/kvm is usable"))
    return calls


def test_forced(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, probe_calls: list) -> None:
    monkeypatch.setenv("CZONE_ACCEL", "kvm")
    assert detect(tmp_path) == ("kvm", "forced by $CZONE_ACCEL")
    assert not probe_calls


def test_forced_invalid(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CZONE_ACCEL", "hvf")
    with pytest.raises(CZoneError, match="CZONE_ACCEL"):
        detect(tmp_path)


def test_probe_failure_falls_back_and_is_cached(tmp_path: Path, probe_calls: list) -> None:
    acc, why = detect(tmp_path)
    assert acc == "tcg" and "did not reach init" in why
    acc2, why2 = detect(tmp_path)
    assert (acc2, why2) == ("tcg", why + " (cached)")
    assert len(probe_calls) == 1
    detect(tmp_path, reprobe=True)
    assert len(probe_calls) == 2


def test_cache_keyed_by_qemu(tmp_path: Path) -> None:
    k1 = accel.cache_key("r", Path("/k"), Path("/q1"))
    accel.write_cache(tmp_path, k1, "kvm", "ok")
    assert accel.read_cache(tmp_path, k1) == ("kvm", "ok")
    assert accel.read_cache(tmp_path, accel.cache_key("r", Path("/k"), Path("/q2"))) is None


def test_unusable_device(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(accel, "kvm_device_usable", lambda: (False, "/dev/kvm not usable"))
    assert detect(tmp_path) == ("tcg", "/dev/kvm not usable")


def test_missing_device() -> None:
    ok, why = accel.kvm_device_usable("/nonexistent/kvm")
    assert not ok and "not usable" in why


def test_dry_run_never_probes(tmp_path: Path, probe_calls: list) -> None:
    assert accel.cached_or_tcg(*ARGS[:2], ARGS[3], tmp_path)[0] == "tcg"
    assert not probe_calls
