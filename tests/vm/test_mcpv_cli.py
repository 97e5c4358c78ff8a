"""``czonectl run/invoke/ps/kill/reclaim/stats`` as users run them: separate
processes, real VMs, crash recovery and 20 concurrent runs."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from czone.guest.ssh import SSHClient
from czone.qemu.machine import kill_strays, own_qemu_processes
from tests.vm.test_vm_cli import czonectl

pytestmark = pytest.mark.vm

EXPECTED = json.loads((Path(__file__).resolve().parents[2]
                       / "guest-image/functions/expected.json").read_text())
FN = "float_operation"


@pytest.fixture
def env(artifacts) -> Iterator[dict[str, str]]:
    run = tempfile.mkdtemp(prefix="czr-")
    yield {**os.environ, "CZONE_RUN": run, "CZONE_ACCEL": artifacts.accel}
    kill_strays(Path(run))
    subprocess.run(["rm", "-rf", run], check=False)


def ok(env: dict[str, str], *args: str, timeout: float = 300) -> str:
    r = czonectl(env, *args, timeout=timeout)
    assert r.returncode == 0, f"czonectl {' '.join(args)}: {r.stderr}"
    assert "Traceback" not in r.stderr
    return r.stdout


def fails(env: dict[str, str], *args: str, rc: int = 1) -> str:
    r = czonectl(env, *args)
    assert r.returncode == rc, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    return r.stderr


def ps(env: dict[str, str]) -> list[dict]:
    return json.loads(ok(env, "ps", "--json"))


def db_rows(env: dict[str, str], table: str) -> list[dict]:
    path = Path(env["CZONE_RUN"]) / "state.db"
    if not path.exists():
        return []
    conn = sqlite3.connect(path, timeout=30)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(f"SELECT * FROM {table}")]
    except sqlite3.OperationalError:
        return []
    finally:
        conn.close()


def wait_for(what: str, cond, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_run_invoke_ps_kill_reclaim_stats(env: dict[str, str]) -> None:
    first = json.loads(ok(env, "run", FN, "--json"))
    second = json.loads(ok(env, "run", FN, "--json"))
    assert first["booted"] and not second["booted"]
    assert first["vm"] == second["vm"] and first["czone"] != second["czone"]
    assert first["warmup"]["ok"] and first["startup_s"] > 0

    listed = {c["id"]: c for c in ps(env)}
    assert set(listed) == {first["id"], second["id"]}
    assert all(c["state"] == "running" for c in listed.values())

    r = czonectl(env, "invoke", first["id"])
    assert r.returncode == 0 and json.loads(r.stdout) == EXPECTED[FN]["result"], r.stderr
    bad = fails(env, "invoke", first["id"], json.dumps(EXPECTED[FN]["bad_payload"]), rc=3)
    assert EXPECTED[FN]["bad_error"] in bad
    assert czonectl(env, "invoke", first["id"]).returncode == 0, "the server kept serving"

    stats = json.loads(ok(env, "stats", "--json"))[first["vm"]]
    assert stats["rss_bytes"] > 0 and stats["pss_bytes"] > 0
    assert set(stats["containers"]) == {first["id"], second["id"]}

    killed = ok(env, "kill", second["id"])
    assert "MiB back to the host" in killed
    assert [c["id"] for c in ps(env)] == [first["id"]]
    assert first["vm"] in ok(env, "reclaim")


def test_bad_input_is_one_line(env: dict[str, str]) -> None:
    assert "unknown function 'nope'" in fails(env, "run", "nope")
    assert "more than a VM can hold" in fails(env, "run", FN, "--memory", "60000")
    assert "no container 'ghost'" in fails(env, "invoke", "ghost")
    assert "no container 'ghost'" in fails(env, "kill", "ghost")
    assert "not JSON" in fails(env, "invoke", "ghost", "{oops", rc=2)


def test_a_vm_killed_under_the_agent_loses_its_containers(env: dict[str, str]) -> None:
    first = json.loads(ok(env, "run", FN, "--json"))
    [qemu] = own_qemu_processes(Path(env["CZONE_RUN"]))
    qemu.kill()
    qemu.wait(10)
    [rec] = ps(env)
    assert rec["id"] == first["id"] and rec["state"] == "lost"
    assert "is lost" in fails(env, "invoke", first["id"])
    again = json.loads(ok(env, "run", FN, "--json"))
    assert again["booted"] and again["vm"] != first["vm"]
    assert "record removed" in ok(env, "kill", first["id"])


def test_czonectl_killed_midway_is_reconciled(env: dict[str, str]) -> None:
    # Killed while booting: the next command kills the orphaned QEMU.
    proc = subprocess.Popen([*czonectl_argv(), "run", FN], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for("QEMU", lambda: own_qemu_processes(Path(env["CZONE_RUN"])))
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    [rec] = ps(env)
    assert rec["state"] == "lost"
    assert not own_qemu_processes(Path(env["CZONE_RUN"])), "no VM is leaked"
    ok(env, "kill", rec["id"])

    # Killed while the guest starts the container: the next command finds it running.
    ok(env, "run", FN)
    proc = subprocess.Popen([*czonectl_argv(), "run", FN], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for("a starting container", lambda: any(
        c["state"] == "starting" and c["owner_pid"] == proc.pid
        for c in db_rows(env, "containers")))
    [ctr] = [c for c in db_rows(env, "containers") if c["owner_pid"] == proc.pid]
    [vm] = [v for v in db_rows(env, "vms") if v["name"] == ctr["vm"]]
    with SSHClient("127.0.0.1", vm["ssh_port"], Path(vm["ssh_key"])) as ssh:
        wait_for("the guest to start it", lambda: ctr["id"] in ssh.run(
            "ls /run/czone/ctr").stdout.split(), timeout=60)
    assert proc.poll() is None, "czonectl finished before it could be killed midway"
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    wait_for("the guest to finish the start", lambda: len(
        [c for c in ps(env) if c["state"] == "running"]) == 2, timeout=120)
    assert len(own_qemu_processes(Path(env["CZONE_RUN"]))) == 1

    # Killed in the middle of `kill`: the next command finishes the kill.
    victim = [c for c in ps(env) if c["state"] == "running"][0]
    proc = subprocess.Popen([*czonectl_argv(), "kill", victim["id"]], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for("the kill to start", lambda: any(
        c["id"] == victim["id"] and c["state"] == "stopping"
        for c in db_rows(env, "containers")))
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert victim["id"] not in {c["id"] for c in ps(env)}
    [vm] = [v for v in db_rows(env, "vms") if v["name"] == victim["vm"]]
    with SSHClient("127.0.0.1", vm["ssh_port"], Path(vm["ssh_key"])) as ssh:
        left = ssh.run("ls /run/czone/ctr /sys/fs/cgroup/czone").stdout.split()
    assert victim["id"] not in left, left


def test_twenty_concurrent_runs_share_one_vm(env: dict[str, str]) -> None:
    procs = [subprocess.Popen([*czonectl_argv(), "run", FN, "--json"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(20)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=900)
        assert p.returncode == 0, err
        results.append(json.loads(out))
    assert len({r["vm"] for r in results}) == 1
    assert len({r["czone"] for r in results}) == 20
    assert sum(r["booted"] for r in results) == 1
    rows = ps(env)
    assert len(rows) == 20 and all(c["state"] == "running" for c in rows)
    assert len(own_qemu_processes(Path(env["CZONE_RUN"]))) == 1


def czonectl_argv() -> list[str]:
    from tests.vm.test_vm_cli import CZONECTL

    return [CZONECTL]


@pytest.mark.parametrize("mode", ["scpv-template", "scpv-snapshot"])
def test_scpv_baselines_clone_a_template_instead_of_booting(env: dict[str, str],
                                                           mode: str) -> None:
    first = json.loads(ok(env, "run", FN, "--mode", mode, "--json"))
    second = json.loads(ok(env, "run", FN, "--mode", mode, "--json"))
    assert first["vm"] != second["vm"], "SCPV: a VM per container"
    r = czonectl(env, "invoke", second["id"])
    assert r.returncode == 0 and json.loads(r.stdout) == EXPECTED[FN]["result"], r.stderr
    [vm] = [v for v in db_rows(env, "vms") if v["name"] == second["vm"]]
    serial = (Path(vm["run_dir"]) / "serial.log").read_text(errors="replace")
    assert "Run /sbin/czone-init" not in serial, "the clone booted instead of resuming"
    # Clean pages are shared with the template's RAM file through the page cache.
    stats = json.loads(ok(env, "stats", "--json"))[second["vm"]]
    assert stats["pss_bytes"] < stats["rss_bytes"]
    assert "its VM stopped" in ok(env, "kill", second["id"])
    assert [c["id"] for c in ps(env)] == [first["id"]]
    assert len(own_qemu_processes(Path(env["CZONE_RUN"]))) == 1


def test_vm_ssh_passes_stdin_and_vm_cp_copies(env: dict[str, str], tmp_path: Path) -> None:
    res = json.loads(ok(env, "run", FN, "--json"))
    r = subprocess.run([*czonectl_argv(), "vm", "ssh", res["vm"], "--", "tr a-z A-Z"],
                       env=env, input="hello\n", capture_output=True, text=True, timeout=120)
    assert (r.returncode, r.stdout) == (0, "HELLO\n"), r.stderr
    src = tmp_path / "blob"
    src.write_bytes(bytes(range(256)) * 4096)
    ok(env, "vm", "cp", str(src), f"{res['vm']}:/tmp/blob")
    r = czonectl(env, "vm", "ssh", res["vm"], "--", "sha256sum /tmp/blob; stat -c %a /tmp/blob")
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    assert r.stdout.split() == [digest, "/tmp/blob", "644"], r.stderr
    assert "expected NAME:PATH" in fails(env, "vm", "cp", str(src), "nocolon", rc=2)


@pytest.mark.parametrize("mode, memory_mode", [("mcpv-virtio-mem", "virtio-mem"),
                                               ("mcpv-balloon", "balloon")])
def test_mcpv_baselines_share_a_vm_and_shrink_it_on_kill(env: dict[str, str], mode: str,
                                                        memory_mode: str) -> None:
    """The MCPV baselines: containers of a function share a VM, in no CZone,
    and a kill shrinks the VM by that container (the host's view: the
    device's size or the balloon's, over QMP)."""
    first = json.loads(ok(env, "run", FN, "--mode", mode, "--json"))
    second = json.loads(ok(env, "run", FN, "--mode", mode, "--json"))
    assert first["vm"] == second["vm"] and first["booted"] and not second["booted"]
    assert first["czone"] == second["czone"] == 0, "no CZone in a baseline"
    r = czonectl(env, "invoke", second["id"])
    assert r.returncode == 0 and json.loads(r.stdout) == EXPECTED[FN]["result"], r.stderr
    mib = 1 << 20
    boot = 512 * mib if memory_mode == "balloon" else 0
    stats = json.loads(ok(env, "stats", "--json"))[first["vm"]]
    assert stats["plugged_bytes"] == boot + 2 * 128 * mib, stats
    ok(env, "kill", second["id"])
    stats = json.loads(ok(env, "stats", "--json"))[first["vm"]]
    assert stats["plugged_bytes"] == boot + 128 * mib, "the VM shrank by the container"
    assert [v["requested_mib"] for v in db_rows(env, "vms")] == [128]
    r = czonectl(env, "invoke", first["id"])
    assert r.returncode == 0 and json.loads(r.stdout) == EXPECTED[FN]["result"], r.stderr
