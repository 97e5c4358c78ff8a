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


def script(tmp_path: Path, body: str) -> Path:
    p = tmp_path / "fake-qemu"
    p.write_text("#!/bin/sh\n" + body)
    p.chmod(0o755)
    return p


def spec(tmp_path: Path, qemu: Path, **kw: object) -> VmSpec:
    return replace(VmSpec(name="t", memory_mib=64, cpus=1, kernel=Path("/k"),
                          rootfs=Path("/r"), qemu=qemu, accel="tcg", ssh_port=None,
                          run_dir=tmp_path / "run"), **kw)


def test_early_exit_reports_stderr(tmp_path: Path) -> None:
    qemu = script(tmp_path, 'echo "qemu: -bogus: invalid option" >&2\nexit 1\n')
    m = Machine(spec(tmp_path, qemu))
    with pytest.raises(VmLaunchError) as ei:
        m.launch()
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
    with pytest.raises(VmLaunchError, match="QMP socket .* not ready"):
        m.launch(qmp_timeout=1.0)
    assert not m.is_running()


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
    assert p.wait(5) == -signal.SIGKILL
    assert time.monotonic() - t0 < 5
    m.shutdown(timeout=0.5)  # idempotent


def test_attach_sigterm_stage(tmp_path: Path) -> None:
    p = subprocess.Popen(["sleep", "60"], start_new_session=True)
    time.sleep(0.1)
    Machine.attach(tmp_path, p.pid, psutil.Process(p.pid).create_time()).shutdown(timeout=2)
    assert p.wait(5) == -signal.SIGTERM


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
