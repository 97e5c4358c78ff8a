from __future__ import annotations

import os
import sqlite3
import subprocess
from pathlib import Path

import pytest

from czone.state import (
    DuplicateVm,
    InvalidName,
    StateDB,
    UnknownVm,
    VmRecord,
    process_start,
    run_root,
    status,
    validate_name,
)


def record(name: str = "vm0", pid: int | None = None, start: float | None = None,
           state: str = "up") -> VmRecord:
    pid = pid or os.getpid()
    return VmRecord(name=name, state=state, pid=pid,
                    proc_start=start if start is not None else process_start(pid),
                    qmp_socket="/r/qmp.sock", ssh_port=2222, ssh_key="/k", run_dir="/r",
                    accel="tcg", memory_mib=512, cpus=1, created=1.0)


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_run_root_from_env(isolated_env: Path) -> None:
    assert run_root() == isolated_env / "run"
    assert StateDB().path == isolated_env / "run" / "state.db"


def test_roundtrip() -> None:
    db = StateDB()
    db.reserve(record("a"))
    db.reserve(record("b"))
    assert [r.name for r in db.list()] == ["a", "b"]
    assert db.get("a") == record("a")
    db.remove("a")
    assert [r.name for r in db.list()] == ["b"]


def test_records_survive_a_new_handle() -> None:
    StateDB().reserve(record("a"))
    assert StateDB().get("a").ssh_port == 2222


def test_duplicate_running() -> None:
    db = StateDB()
    db.reserve(record("a"))
    with pytest.raises(DuplicateVm, match="already exists .running.; pick another"):
        db.reserve(record("a"))


def test_duplicate_dead_hints_vm_down() -> None:
    db = StateDB()
    db.reserve(record("a", pid=dead_pid(), start=1.0))
    with pytest.raises(DuplicateVm, match="dead.*czonectl vm down a"):
        db.ensure_free("a")


def test_unknown_lists_known() -> None:
    db = StateDB()
    db.reserve(record("a"))
    with pytest.raises(UnknownVm, match="no VM named 'zz' .known: a"):
        db.get("zz")


def test_status_running_starting_dead() -> None:
    assert status(record()) == "running"
    assert status(record(state="starting")) == "starting"
    assert status(record(pid=dead_pid(), start=1.0)) == "dead"


def test_pid_reuse_is_dead() -> None:
    me = os.getpid()
    assert status(record(pid=me, start=process_start(me) - 100)) == "dead"


def test_reserve_launch_then_mark_up() -> None:
    db = StateDB()
    rec = db.reserve_launch("v", qmp_socket="/q", ssh_port=1, ssh_key=None, run_dir="/r",
                            accel="tcg", memory_mib=64, cpus=1)
    assert rec.pid == os.getpid() and status(db.get("v")) == "starting"
    db.mark_up("v", os.getpid(), process_start(os.getpid()))
    assert status(db.get("v")) == "running"


@pytest.mark.parametrize("name", ["", "-x", "a b", "a/b", "x" * 33, "é"])
def test_invalid_names(name: str) -> None:
    with pytest.raises(InvalidName):
        validate_name(name)


def test_lost_race_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """The INSERT collides with a record that another czonectl removes right after."""
    def collide(self: StateDB, sql: str, args: tuple = ()) -> list:
        if sql.startswith("INSERT"):
            raise sqlite3.IntegrityError("UNIQUE constraint failed: vms.name")
        return []

    monkeypatch.setattr(StateDB, "_query", collide)
    with pytest.raises(DuplicateVm, match="another czonectl was creating or removing VM 'vm0' "
                                          "at the same time; try again"):
        StateDB().reserve(record())


V2_VMS = """CREATE TABLE vms (name TEXT PRIMARY KEY, state TEXT NOT NULL, pid INTEGER NOT NULL,
    proc_start REAL NOT NULL, qmp_socket TEXT NOT NULL, ssh_port INTEGER, ssh_key TEXT,
    run_dir TEXT NOT NULL, accel TEXT NOT NULL, memory_mib INTEGER NOT NULL,
    cpus INTEGER NOT NULL, created REAL NOT NULL, fn TEXT, mode TEXT,
    memory_mode TEXT NOT NULL DEFAULT 'none', device_mib INTEGER NOT NULL DEFAULT 0,
    requested_mib INTEGER NOT NULL DEFAULT 0)"""


def test_a_store_from_before_bridged_networking_reads_as_user_mode() -> None:
    db = StateDB()
    db.root.mkdir(parents=True)
    with sqlite3.connect(db.path) as conn:
        conn.execute(V2_VMS)
        conn.execute("INSERT INTO vms (name, state, pid, proc_start, qmp_socket, run_dir, accel, "
                     "memory_mib, cpus, created) VALUES ('old', 'up', 1, 0, '/q', '/r', 'tcg', "
                     "512, 1, 1.0)")
    old = db.get("old")
    assert (old.net, old.netns, old.net_addr, old.tap) == ("user", None, None, None)
    db.reserve(VmRecord(**{**record("new").to_dict(), "net": "bridge", "netns": "czone-t",
                           "net_addr": "10.77.0.2/24", "tap": "czt2"}))
    assert db.get("new").net_addr == "10.77.0.2/24" and db.get("old").net == "user"


def test_reserve_launch_assigns_inside_its_transaction() -> None:
    db = StateDB()
    seen: list[list[str]] = []

    def assign(vms: list[VmRecord]) -> dict:
        seen.append([v.name for v in vms])
        return {"net": "bridge", "netns": "czone-t", "net_addr": f"10.77.0.{len(vms) + 2}/24"}

    args = dict(qmp_socket="/q", ssh_port=1, ssh_key=None, run_dir="/r", accel="tcg",
                memory_mib=64, cpus=1)
    assert db.reserve_launch("a", assign=assign, **args).net_addr == "10.77.0.2/24"
    assert db.reserve_launch("b", assign=assign, **args).net_addr == "10.77.0.3/24"
    assert seen == [[], ["a"]]
    with pytest.raises(DuplicateVm, match="a VM named 'a' already exists"):
        db.reserve_launch("a", assign=assign, **args)
    assert [v.name for v in db.list()] == ["a", "b"]
