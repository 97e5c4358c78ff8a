"""``czonectl vm up/ssh/list/down`` as a user runs them, in separate processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from czone.qemu.machine import own_qemu_processes

pytestmark = pytest.mark.vm

CZONECTL = str(Path(sys.executable).parent / "czonectl")


@pytest.fixture
def cli_env(artifacts) -> Iterator[dict[str, str]]:
    run = tempfile.mkdtemp(prefix="czone-cli-")
    # Reuse the session's accelerator verdict instead of probing again.
    env = {**os.environ, "CZONE_RUN": run, "CZONE_ACCEL": artifacts.accel}
    yield env
    for rec in json.loads(czonectl(env, "vm", "list", "--json").stdout or "[]"):
        if rec["status"] != "dead":
            psutil.Process(rec["pid"]).kill()
    subprocess.run(["rm", "-rf", run], check=False)


def czonectl(env: dict[str, str], *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([CZONECTL, *args], env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def test_up_ssh_list_down(cli_env: dict[str, str]) -> None:
    up = czonectl(cli_env, "vm", "up", "--name", "t1", "--boot-timeout", "90")
    assert up.returncode == 0, up.stderr
    assert "czonectl vm ssh t1" in up.stdout

    [rec] = json.loads(czonectl(cli_env, "vm", "list", "--json").stdout)
    assert rec["name"] == "t1" and rec["status"] == "running"
    pid, run_dir = rec["pid"], Path(rec["run_dir"])
    assert psutil.Process(pid).name().startswith("qemu")

    uname = czonectl(cli_env, "vm", "ssh", "t1", "--", "uname", "-r")
    assert uname.returncode == 0 and "-czone" in uname.stdout
    rc = czonectl(cli_env, "vm", "ssh", "t1", "--", "echo oops >&2; exit 3")
    assert rc.returncode == 3 and rc.stderr == "oops\n"

    again = czonectl(cli_env, "vm", "up", "--name", "t1")
    assert again.returncode == 1
    assert "czonectl: error: a VM named 't1' already exists (running)" in again.stderr

    down = czonectl(cli_env, "vm", "down", "t1")
    assert down.returncode == 0, down.stderr
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert own_qemu_processes(run_dir) == []
    assert json.loads(czonectl(cli_env, "vm", "list", "--json").stdout) == []

    gone = czonectl(cli_env, "vm", "down", "t1")
    assert gone.returncode == 1 and "no VM named 't1'" in gone.stderr


def test_a_boot_past_its_timeout_shows_serial_tail(cli_env: dict[str, str]) -> None:
    r = czonectl(cli_env, "vm", "up", "--name", "t2", "--boot-timeout", "1")
    assert r.returncode == 1
    # One second is not enough for the kernel to reach init under either accelerator.
    assert "czonectl: error: guest did not print 'Run /sbin/czone-init' within 1s" in r.stderr
    assert "--- serial console (last lines) ---" in r.stderr
    assert "Traceback" not in r.stderr
    run_dir = Path(cli_env["CZONE_RUN"]) / "vms" / "t2"
    assert f"logs of the failed boot are kept in {run_dir}/" in r.stderr
    assert "Linux version" in (run_dir / "serial.log").read_text(errors="replace")
    assert (run_dir / "qemu.log").exists()
    assert json.loads(czonectl(cli_env, "vm", "list", "--json").stdout) == []
    assert own_qemu_processes(Path(cli_env["CZONE_RUN"])) == []
