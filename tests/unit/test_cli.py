from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from click.testing import CliRunner

from czone import accel
from czone.cli import cli
from czone.net import free_port
from czone.qemu.machine import Machine
from czone.state import StateDB, VmRecord, process_start

FAKE_QEMU = Path(__file__).with_name("fake_qemu.py")


def invoke(*args: str):  # noqa: ANN201
    return CliRunner().invoke(cli, list(args))


def add_record(name: str, pid: int | None = None, start: float | None = None,
               run_dir: str = "/nonexistent", ssh_port: int = 1, ssh_key: str = "/k") -> None:
    pid = pid or os.getpid()
    StateDB().reserve(VmRecord(
        name=name, state="up", pid=pid, proc_start=start or process_start(pid),
        qmp_socket=f"{run_dir}/qmp.sock", ssh_port=ssh_port, ssh_key=ssh_key,
        run_dir=run_dir, accel="tcg", memory_mib=512, cpus=1, created=1.0))


@pytest.fixture
def fake_vm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    """Start a stand-in QEMU (tests/unit/fake_qemu.py) serving QMP, recorded as VM ``name``."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(name: str, mode: str) -> subprocess.Popen[bytes]:
        run_dir = tmp_path / name
        run_dir.mkdir()
        p = subprocess.Popen([sys.executable, str(FAKE_QEMU),
                              f"socket,id=qmp0,path={run_dir}/qmp.sock,server=on"],
                             env={**os.environ, "FAKE_QEMU": mode}, stdout=subprocess.PIPE)
        procs.append(p)
        assert p.stdout is not None and p.stdout.readline() == b"fake qemu ready\n"
        add_record(name, p.pid, process_start(p.pid), run_dir=str(run_dir))
        return p

    monkeypatch.setattr(Machine, "qmp_timeout", 1.0)
    yield start
    for p in procs:
        p.kill()
        p.wait()


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_missing_artifact_names_make_target() -> None:
    r = invoke("vm", "up")
    assert r.exit_code == 1
    assert r.output.startswith("czonectl: error: kernel artifact not built")
    assert "run `make kernel`" in r.output
    assert "Traceback" not in r.output


def test_doctor_lists_every_missing_target() -> None:
    r = invoke("doctor")
    assert r.exit_code == 1
    for target in ("make kernel", "make image", "make qemu"):
        assert target in r.output
    assert "accelerator  not probed" in r.output


def test_unknown_name() -> None:
    add_record("other")
    for cmd in (["vm", "down", "nope"], ["vm", "ssh", "nope", "--", "true"]):
        r = invoke(*cmd)
        assert r.exit_code == 1
        assert "czonectl: error: no VM named 'nope' (known: other)" in r.output


def test_duplicate_name(fake_artifacts: dict) -> None:
    add_record("vm0")
    r = invoke("vm", "up", "--name", "vm0", "--dry-run")
    assert r.exit_code == 1
    assert "czonectl: error: a VM named 'vm0' already exists (running)" in r.output


def test_busy_port(fake_artifacts: dict) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = invoke("vm", "up", "--ssh-port", str(port), "--dry-run")
    assert r.exit_code == 1
    assert f"czonectl: error: port {port} on 127.0.0.1 is already in use" in r.output


def test_invalid_name() -> None:
    r = invoke("vm", "up", "--name", "../x", "--dry-run")
    assert r.exit_code == 1 and "invalid VM name" in r.output


def test_dry_run_prints_argv(fake_artifacts: dict, isolated_env: Path,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accel, "probe_kvm", lambda *a, **k: pytest.fail("probed"))
    r = invoke("vm", "up", "--name", "t1", "--memory", "768", "--cpus", "2",
               "--ssh-port", "2299", "--dry-run")
    assert r.exit_code == 0, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1
    argv = shlex.split(lines[0])
    assert argv[0] == str(fake_artifacts["qemu"])
    assert argv[argv.index("-kernel") + 1] == str(fake_artifacts["vmlinux"])
    assert argv[argv.index("-m") + 1].startswith("768M,")
    assert argv[argv.index("-smp") + 1] == "2"
    assert argv[argv.index("-accel") + 1] == "tcg,thread=single"
    assert "ICH9-LPC.disable_s3=1" in argv
    assert "user,id=n0,hostfwd=tcp:127.0.0.1:2299-:22" in argv
    run_dir = isolated_env / "run" / "vms" / "t1"
    assert f"socket,id=qmp0,path={run_dir}/qmp.sock,server=on,wait=off" in argv
    assert not run_dir.exists()
    assert StateDB().list() == []


def test_dry_run_uses_cached_verdict(fake_artifacts: dict, isolated_env: Path) -> None:
    key = accel.cache_key("6.12.0-czone", fake_artifacts["vmlinux"], fake_artifacts["qemu"])
    accel.write_cache(isolated_env / "run", key, "kvm", "probe ok")
    r = invoke("vm", "up", "--dry-run")
    assert r.exit_code == 0, r.output
    assert "-accel kvm -cpu host" in r.output


def test_global_qemu_option(fake_artifacts: dict, tmp_path: Path) -> None:
    r = invoke("--qemu", str(tmp_path / "nope"), "vm", "up", "--dry-run")
    assert r.exit_code == 1 and "QEMU binary" in r.output and "does not exist" in r.output


def test_qemu_exiting_early_shows_stderr(fake_artifacts: dict,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CZONE_ACCEL", "tcg")
    fake_artifacts["qemu"].write_text("#!/bin/sh\necho 'qemu: boom: bad option' >&2\nexit 1\n")
    r = invoke("vm", "up", "--name", "early")
    assert r.exit_code == 1
    assert "czonectl: error: QEMU exited with status 1" in r.output
    assert "qemu: boom: bad option" in r.output
    assert StateDB().list() == []
    run_dir = StateDB().vm_dir("early")
    assert f"logs of the failed boot are kept in {run_dir}/" in r.output
    assert "boom" in (run_dir / "qemu.log").read_text()


def use_fake_qemu(fake_artifacts: dict, monkeypatch: pytest.MonkeyPatch, key: Path) -> None:
    monkeypatch.setenv("CZONE_ACCEL", "tcg")
    fake_artifacts["qemu"].write_text(f'#!/bin/sh\nexec {sys.executable} {FAKE_QEMU} "$@"\n')
    shutil.copy(key, fake_artifacts["key"])


def test_ssh_never_up_keeps_the_logs(fake_artifacts: dict, monkeypatch: pytest.MonkeyPatch,
                                     key: Path) -> None:
    use_fake_qemu(fake_artifacts, monkeypatch, key)
    r = invoke("vm", "up", "--name", "nossh", "--boot-timeout", "1")
    assert r.exit_code == 1, r.output
    assert "czonectl: error: SSH to root@127.0.0.1:" in r.output
    assert "not ready after 1s" in r.output
    run_dir = StateDB().vm_dir("nossh")
    assert f"logs of the failed boot are kept in {run_dir}/ (serial.log, qemu.log)" in r.output
    assert "no sshd here" in (run_dir / "serial.log").read_text()
    assert StateDB().list() == []


def test_launch_without_a_process_start_is_one_line(fake_artifacts: dict, key: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    use_fake_qemu(fake_artifacts, monkeypatch, key)
    monkeypatch.setattr(Machine, "proc_start", property(lambda self: None))
    r = invoke("vm", "up", "--name", "gone")
    assert r.exit_code == 1
    assert "czonectl: error: QEMU of VM gone exited right after it connected to QMP" in r.output
    assert "Traceback" not in r.output and StateDB().list() == []


def test_list_shows_dead_and_json() -> None:
    add_record("alive")
    add_record("gone", pid=dead_pid(), start=1.0)
    r = invoke("vm", "list")
    assert r.exit_code == 0
    rows = {line.split()[0]: line.split()[1] for line in r.output.splitlines()[1:]}
    assert rows == {"alive": "running", "gone": "dead"}
    data = json.loads(invoke("vm", "list", "--json").output)
    assert {d["name"]: d["status"] for d in data} == {"alive": "running", "gone": "dead"}


def test_down_dead_removes_record() -> None:
    add_record("gone", pid=dead_pid(), start=1.0)
    r = invoke("vm", "down", "gone")
    assert r.exit_code == 0 and "was dead" in r.output
    assert StateDB().list() == []


def test_ssh_to_dead_vm() -> None:
    add_record("gone", pid=dead_pid(), start=1.0)
    r = invoke("vm", "ssh", "gone", "--", "true")
    assert r.exit_code == 1 and "VM 'gone' is dead" in r.output


def test_console_script_entry_point() -> None:
    exe = Path(sys.executable).parent / "czonectl"
    r = subprocess.run([str(exe), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "vm" in r.stdout


def test_ssh_connection_refused_is_clean(key: Path) -> None:
    port = free_port()
    add_record("vm0", ssh_port=port, ssh_key=str(key))  # "running" (our pid), port closed
    r = invoke("vm", "ssh", "vm0", "--", "true")
    assert r.exit_code == 1
    assert r.output.startswith(f"czonectl: error: cannot connect to root@127.0.0.1:{port}: "
                               "NoValidConnectionsError")
    assert len(r.output.splitlines()) == 1


def test_mem_of_a_hung_qemu_is_one_line(fake_vm) -> None:  # noqa: ANN001
    p = fake_vm("hung", "hang")
    r = invoke("vm", "mem", "hung")
    assert r.exit_code == 1
    assert r.output.splitlines()[-1] == (
        f"czonectl: error: QMP query-memory-devices to QEMU pid {p.pid} failed: "
        "no answer within 1s (QEMU hung?)")
    assert "Traceback" not in r.output


def test_mem_shows_the_age_of_the_czone_stats(fake_vm, tmp_path: Path) -> None:  # noqa: ANN001
    fake_vm("cz", "czone")
    r = invoke("vm", "mem", "cz")
    assert r.exit_code == 0, r.output
    assert "per-CZone stats as the guest last sent them, no snapshot received yet:" in r.output
    (tmp_path / "cz" / "czone-stats.log").write_text(
        f"77@{time.time() - 30:.6f}:virtio_czone_stats nr_czones=2\n"
        f"77@{time.time() - 2.5:.6f}:virtio_czone_stats nr_czones=1\n")
    r = invoke("vm", "mem", "cz")
    assert re.search(r"per-CZone stats as the guest last sent them, 2\.[56] s ago:\n"
                     r"CZONE .*\n1 +8 +56 +8 +64\n$", r.output), r.output


def test_resize_balloon_waits_for_the_guest(fake_vm) -> None:  # noqa: ANN001
    fake_vm("b1", "ok")
    r = invoke("vm", "resize", "b1", "256", "--timeout", "5")
    assert (r.exit_code, r.output) == (0, "balloon: target 256 MiB, guest at 256 MiB\n")


def test_resize_balloon_honours_the_timeout(fake_vm) -> None:  # noqa: ANN001
    fake_vm("b2", "balloon-stuck")
    r = invoke("vm", "resize", "b2", "256", "--timeout", "0.5")
    assert r.exit_code == 1
    assert r.output == ("czonectl: error: balloon: guest stayed at 536870912, "
                        "wanted 268435456 after 0.5s\n")
    r = invoke("vm", "resize", "b2", "256", "--timeout", "0")
    assert (r.exit_code, r.output) == (0, "balloon target 256 MiB\n")
    r = invoke("vm", "resize", "b2", "1024", "--timeout", "0")
    assert r.exit_code == 1 and "more than its 512 MiB of boot memory" in r.output


def test_down_dead_kills_stray_qemu(tmp_path: Path) -> None:
    """A `vm up` killed mid-launch leaves a dead record and a running QEMU."""
    run_dir = tmp_path / "run" / "vms" / "gone"
    fake = tmp_path / "qemu-system-x86_64"
    fake.symlink_to(sys.executable)
    stray = subprocess.Popen([str(fake), "-c", "import time; time.sleep(60)",
                              f"{run_dir}/serial.log"])
    try:
        StateDB().reserve(VmRecord(
            name="gone", state="starting", pid=dead_pid(), proc_start=1.0,
            qmp_socket=f"{run_dir}/qmp.sock", ssh_port=1, ssh_key="/k", run_dir=str(run_dir),
            accel="tcg", memory_mib=512, cpus=1, created=1.0))
        assert stray.poll() is None
        r = invoke("vm", "down", "gone")
        assert r.exit_code == 0, r.output
        assert "killed 1 stray QEMU process" in r.output
        stray.wait(5)
        assert not psutil.pid_exists(stray.pid)
    finally:
        stray.kill()
        stray.wait()


def test_a_held_lock_times_out_in_one_line(tmp_path):
    import fcntl

    from czone.locking import LockTimeout, flock_within
    with open(tmp_path / "l", "w") as held, open(tmp_path / "l", "w") as other:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(LockTimeout, match="still held after 0s"):
            flock_within(other, 0.05, poll=0.01)
        fcntl.flock(held, fcntl.LOCK_UN)
        flock_within(other, 0.05)
