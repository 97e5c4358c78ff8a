"""``vm migrate`` without QEMU: the destination's argv, the saved spec, the
refusals, and what a failed migration does to the source (a fake monitor)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import psutil
import pytest
from click.testing import CliRunner

from czone import migrate
from czone.cli import cli
from czone.qemu.cmdline import VmSpec, build_argv, migration_destination
from czone.qemu.qmp import QmpTimeout
from czone.state import StateDB, VmRecord, process_start
from czone.vmspec import load_spec, save_spec, spec_from_json, spec_to_json

SPEC = VmSpec(name="vm0", memory_mib=512, cpus=1, kernel=Path("/k/vmlinux"),
              rootfs=Path("/i/rootfs.squashfs"), qemu=Path("/q/qemu-system-x86_64"),
              accel="tcg", ssh_port=2222, run_dir=Path("/run/vm0"),
              firmware_dirs=(Path("/usr/share/qemu"),), memory_mode="czone",
              device_memory_mib=1024, requested_mib=256, fnbase=Path("/i/fnbase.squashfs"),
              free_page_reporting=True)


def test_the_destination_is_the_source_listening_elsewhere() -> None:
    dst = migration_destination(SPEC, Path("/run/vm0.ab12cd"), 2300)
    src_argv, dst_argv = build_argv(SPEC), build_argv(dst)
    assert dst_argv[-2:] == ["-incoming", "defer"] and "-incoming" not in src_argv
    # Apart from -incoming, only the run dir's files and the SSH forward differ.
    same = [a.replace("/run/vm0.ab12cd/", "/run/vm0/").replace(":2300-", ":2222-")
            for a in dst_argv[:-2]]
    assert same == src_argv


def test_a_spec_survives_its_file(tmp_path: Path) -> None:
    spec = replace(SPEC, run_dir=tmp_path, extra_args=("-S",))
    assert spec_from_json(spec_to_json(spec)) == spec
    assert load_spec(tmp_path) is None
    save_spec(spec)
    assert load_spec(tmp_path) == spec


def add_vm(name: str, spec: VmSpec, pid: int, mode: str | None = "mcpv") -> VmRecord:
    rec = VmRecord(name=name, state="up", pid=pid, proc_start=process_start(pid),
                   qmp_socket=str(spec.run_dir / "qmp.sock"), ssh_port=spec.ssh_port,
                   ssh_key="/k", run_dir=str(spec.run_dir), accel="tcg", memory_mib=512,
                   cpus=1, created=1.0, fn="matmul", mode=mode, memory_mode="czone",
                   device_mib=1024, requested_mib=256)
    StateDB().reserve(rec)
    return rec


@pytest.fixture
def live(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    """A process that stands for QEMU: psutil reports the argv of ``spec``."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    qemu = tmp_path / "qemu-system-x86_64"
    qemu.write_text("#!/bin/sh\n")
    run_dir = tmp_path / "run" / "vms" / "vm0"
    run_dir.mkdir(parents=True)
    spec = replace(SPEC, qemu=qemu, run_dir=run_dir)
    argv = {"now": build_argv(spec)}
    real_cmdline = psutil.Process.cmdline

    def cmdline(self: psutil.Process) -> list[str]:
        return argv["now"] if self.pid == proc.pid else real_cmdline(self)

    monkeypatch.setattr(psutil.Process, "cmdline", cmdline)
    monkeypatch.setattr(psutil.Process, "exe", lambda self: str(qemu))
    yield spec, proc, argv
    proc.kill()
    proc.wait()


def run(*args: str) -> Any:
    return CliRunner().invoke(cli, list(args))


def test_dry_run_prints_the_destination(live) -> None:  # noqa: ANN001
    spec, proc, _ = live
    save_spec(spec)
    add_vm("vm0", spec, proc.pid)
    r = run("vm", "migrate", "vm0", "--dry-run")
    assert r.exit_code == 0, r.output
    argv = r.output.split()
    assert argv[-2:] == ["-incoming", "defer"]
    assert f"path={spec.run_dir}/qmp.sock" not in r.output
    assert f"{spec.run_dir.parent}/vm0." in r.output
    assert ":2222-" not in r.output


@pytest.mark.parametrize("case, expect", [
    ("no-spec", "kept no spec"),
    ("scpv", "only MCPV and plain VMs migrate"),
    ("other-argv", "does not run the command line"),
    ("qemu-gone", "is gone or was replaced"),
])
def test_refusals_are_one_line_and_leave_the_vm(live, case: str, expect: str) -> None:  # noqa: ANN001
    spec, proc, argv = live
    if case != "no-spec":
        save_spec(spec)
    if case == "other-argv":
        argv["now"] = [*argv["now"], "-S"]
    if case == "qemu-gone":
        spec.qemu.unlink()
    add_vm("vm0", spec, proc.pid, mode="scpv-template" if case == "scpv" else "mcpv")
    for extra in ((), ("--dry-run",)):
        r = run("vm", "migrate", "vm0", *extra)
        assert r.exit_code == 1 and expect in r.output, r.output
        assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1
    assert StateDB().get("vm0").pid == proc.pid and proc.poll() is None


class FakeSource:
    """The source's monitor after a failed migration: statuses in turn."""

    def __init__(self, migrate_status: str, states: list[str], resumes: bool = False):
        self.migrate_status, self.states, self.resumes = migrate_status, states, resumes
        self.calls: list[str] = []

    def qmp(self, cmd: str, /, **args: Any) -> Any:
        self.calls.append(cmd)
        if cmd == "query-migrate":
            return {"status": self.migrate_status}
        if cmd == "migrate_cancel":
            self.migrate_status = "cancelled"
            return {}
        if cmd == "query-status":
            return {"status": self.states[0] if len(self.states) == 1 else self.states.pop(0)}
        if cmd == "cont":
            self.states = ["running"]
            return {}
        raise AssertionError(cmd)

    def wait_event(self, name: str, timeout: float, **match: Any) -> dict[str, Any]:
        self.calls.append(f"wait {name}")
        if self.resumes:
            self.states = ["running"]
            return {"event": name}
        raise QmpTimeout("none")


@pytest.mark.parametrize("status, states, resumes, calls", [
    # QEMU restarted the source itself.
    ("failed", ["running"], False, ["query-migrate", "query-status"]),
    ("failed", ["finish-migrate"], True,
     ["query-migrate", "query-status", "wait RESUME", "query-status"]),
    # Still migrating (our timeout): cancelled, and QEMU restarts it.
    ("active", ["finish-migrate"], True,
     ["query-migrate", "migrate_cancel", "query-migrate", "query-status", "wait RESUME",
      "query-status"]),
    # Completed, the destination failed afterwards: the source waits for cont.
    ("completed", ["postmigrate"], False,
     ["query-migrate", "query-status", "wait RESUME", "query-status", "cont",
      "query-status"]),
])
def test_the_source_runs_again(monkeypatch: pytest.MonkeyPatch, status: str,
                               states: list[str], resumes: bool, calls: list[str]) -> None:
    monkeypatch.setattr(migrate, "RESUME_WAIT", 0.01)
    src = FakeSource(status, states, resumes)
    assert migrate.rescue_source(src) == "running"  # type: ignore[arg-type]
    assert src.calls == calls


def test_a_source_that_stays_down_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(migrate, "RESUME_WAIT", 0.01)
    src = FakeSource("failed", ["shutdown"])
    with pytest.raises(migrate.MigrationError, match="did not resume"):
        migrate.rescue_source(src)  # type: ignore[arg-type]


def test_one_migration_of_a_vm_at_a_time(live) -> None:  # noqa: ANN001
    spec, proc, _ = live
    save_spec(spec)
    add_vm("vm0", spec, proc.pid)
    marker = StateDB().migration_marker("vm0")
    marker.parent.mkdir(parents=True)
    me = os.getpid()
    marker.write_text(json.dumps({"owner_pid": me, "owner_start": process_start(me),
                                  "src_run_dir": str(spec.run_dir),
                                  "dst_run_dir": str(spec.run_dir) + ".x"}))
    r = run("vm", "migrate", "vm0")
    assert r.exit_code == 1 and "is being migrated by another czonectl" in r.output, r.output
    assert marker.exists(), "a live owner's marker stays"
