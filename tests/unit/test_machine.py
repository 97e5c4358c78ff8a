"""Machine against stand-in "QEMU" scripts: launch failures and staged shutdown."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import psutil
import pytest

from czone.qemu.cmdline import VmSpec
from czone.qemu.machine import Machine, VmLaunchError
from czone.qemu.qmp import QmpCommandError

FAKE_QEMU = Path(__file__).with_name("fake_qemu.py")


def script(tmp_path: Path, body: str) -> Path:
    p = tmp_path / "fake-qemu"
    p.write_text("#!/bin/sh\n" + body)
    p.chmod(0o755)
    return p


def fake_qemu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str = "ok") -> Path:
    monkeypatch.setenv("FAKE_QEMU", mode)
    return script(tmp_path, f'exec {sys.executable} {FAKE_QEMU} "$@"\n')


def spec(tmp_path: Path, qemu: Path, **kw: object) -> VmSpec:
    return replace(VmSpec(name="t", memory_mib=64, cpus=1, kernel=Path("/k"),
                          rootfs=Path("/r"), qemu=qemu, accel="tcg", ssh_port=None,
                          run_dir=tmp_path / "run"), **kw)


def test_early_exit_reports_stderr(tmp_path: Path) -> None:
    qemu = script(tmp_path, 'echo "qemu: -bogus: invalid option" >&2\nexit 1\n')
    m = Machine(spec(tmp_path, qemu))
    t0 = time.monotonic()
    with pytest.raises(VmLaunchError) as ei:
        m.launch(qmp_timeout=10)
    assert time.monotonic() - t0 < 3, "a QEMU that exits must not wait out the QMP timeout"
    assert "QEMU exited with status 1" in str(ei.value)
    assert "invalid option" in str(ei.value) and "invalid option" in ei.value.qemu_log
    assert ei.value.argv == m.argv
    assert not m.is_running()


def test_missing_binary(tmp_path: Path) -> None:
    with pytest.raises(VmLaunchError, match="cannot execute QEMU"):
        Machine(spec(tmp_path, tmp_path / "nope")).launch()


def test_qmp_never_ready_kills_process(tmp_path: Path) -> None:
    qemu = script(tmp_path, "exec sleep 60\n")
    m = Machine(spec(tmp_path, qemu))
    with pytest.raises(VmLaunchError, match="did not connect to QMP at .* within 1s$"):
        m.launch(qmp_timeout=1.0)
    assert not m.is_running()


def test_launch_listens_first_and_quit_ends_qemu(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    m = Machine(spec(tmp_path, fake_qemu(tmp_path, monkeypatch)))
    m.launch(qmp_timeout=10)
    assert m.qmp("query-status") == {}
    assert not m.qmp_launch_socket.exists()
    m.shutdown(timeout=5)
    assert (m.stopped_by, m.returncode) == ("quit", 0)


@pytest.mark.parametrize("mode, error", [("hang", "no answer within 1s"),
                                         ("die", "connection lost")])
def test_hung_or_dying_qemu_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               mode: str, error: str) -> None:
    m = Machine(spec(tmp_path, fake_qemu(tmp_path, monkeypatch, mode)))
    m.launch(qmp_timeout=10)
    m.qmp_timeout = 1.0
    try:
        with pytest.raises(QmpCommandError, match=f"QMP query-status to QEMU pid {m.pid} "
                                                  f"failed: {error}"):
            m.qmp("query-status")
    finally:
        m.kill()


def test_attach_to_silent_qmp_times_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_QEMU", "silent")
    sock = tmp_path / "qmp.sock"
    p = subprocess.Popen([sys.executable, str(FAKE_QEMU), f"socket,path={sock},server=on"],
                         stdout=subprocess.PIPE)
    try:
        assert p.stdout is not None and p.stdout.readline() == b"fake qemu ready\n"
        m = Machine.attach(tmp_path, p.pid, psutil.Process(p.pid).create_time())
        m.qmp_timeout = 0.5
        with pytest.raises(QmpCommandError, match="cannot connect to QMP .* no answer within"):
            m.qmp("query-status")
    finally:
        p.kill()
        p.wait()


def test_socket_path_too_long(tmp_path: Path) -> None:
    m = Machine(spec(tmp_path, Path("/bin/true"), run_dir=tmp_path / ("x" * 120)))
    with pytest.raises(VmLaunchError, match="too long"):
        m.launch()


def stubborn_process() -> subprocess.Popen[bytes]:
    code = ("import signal, time, sys; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print('ok', flush=True); time.sleep(60)")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                         start_new_session=True)
    assert p.stdout is not None and p.stdout.readline() == b"ok\n"
    return p


def test_attach_staged_shutdown_reaches_sigkill(tmp_path: Path) -> None:
    p = stubborn_process()
    m = Machine.attach(tmp_path, p.pid, psutil.Process(p.pid).create_time())
    assert m.is_running()
    t0 = time.monotonic()
    m.shutdown(timeout=0.5)
    assert (m.stopped_by, m.returncode) == ("SIGKILL", -signal.SIGKILL)
    assert time.monotonic() - t0 < 5
    m.shutdown(timeout=0.5)  # idempotent
    p.wait()


def test_attach_sigterm_stage(tmp_path: Path) -> None:
    p = subprocess.Popen(["sleep", "60"], start_new_session=True)
    time.sleep(0.1)
    m = Machine.attach(tmp_path, p.pid, psutil.Process(p.pid).create_time())
    m.shutdown(timeout=2)
    assert (m.stopped_by, m.returncode) == ("SIGTERM", -signal.SIGTERM)
    p.wait()


def test_attach_reused_pid_untouched(tmp_path: Path) -> None:
    p = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        m = Machine.attach(tmp_path, p.pid, psutil.Process(p.pid).create_time() - 50)
        assert not m.is_running()
        m.shutdown(timeout=0.5)
        assert p.poll() is None
    finally:
        p.kill()
        p.wait()
