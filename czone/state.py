"""Durable records of the VMs this host runs (SQLite), so that a later
``czonectl`` process can find, show and stop them.

A record is written *before* QEMU starts, in state ``starting``, with the
pid of the ``czonectl`` process that owns the launch; the PRIMARY KEY makes
that reservation atomic, so two ``vm up`` with one name cannot both launch.
Once QEMU is up the record takes QEMU's pid and state ``up``.  Each pid is
stored with its process start time, so a pid reused by another process
reads as dead rather than as our VM.
"""

from __future__ import annotations

import os
import re
import sqlite3
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

import psutil

from czone.artifacts import cache_dir
from czone.errors import CZoneError
from czone.qemu.machine import live_process

Status = Literal["running", "starting", "dead"]

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")

SCHEMA = """
CREATE TABLE IF NOT EXISTS vms (
    name TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    pid INTEGER NOT NULL,
    proc_start REAL NOT NULL,
    qmp_socket TEXT NOT NULL,
    ssh_port INTEGER,
    ssh_key TEXT,
    run_dir TEXT NOT NULL,
    accel TEXT NOT NULL,
    memory_mib INTEGER NOT NULL,
    cpus INTEGER NOT NULL,
    created REAL NOT NULL
)
"""


class UnknownVm(CZoneError):
    pass


class VmNotRunning(CZoneError):
    pass


class DuplicateVm(CZoneError):
    pass


class InvalidName(CZoneError):
    pass


def run_root() -> Path:
    return Path(os.environ.get("CZONE_RUN") or cache_dir() / "run")


def validate_name(name: str) -> str:
    if not NAME_RE.fullmatch(name):
        raise InvalidName(f"invalid VM name {name!r}: use 1-32 letters, digits, '_', '.', '-' "
                          "starting with a letter or digit")
    return name


def process_start(pid: int) -> float:
    return psutil.Process(pid).create_time()


@dataclass
class VmRecord:
    name: str
    state: str
    pid: int
    proc_start: float
    qmp_socket: str
    ssh_port: int | None
    ssh_key: str | None
    run_dir: str
    accel: str
    memory_mib: int
    cpus: int
    created: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def pid_matches(pid: int, proc_start: float) -> bool:
    return live_process(pid, proc_start) is not None


def status(record: VmRecord) -> Status:
    if not pid_matches(record.pid, record.proc_start):
        return "dead"
    return "starting" if record.state == "starting" else "running"


class StateDB:
    def __init__(self, root: Path | None = None):
        self.root = root or run_root()
        self.path = self.root / "state.db"

    def vm_dir(self, name: str) -> Path:
        return self.root / "vms" / name

    def _connect(self) -> sqlite3.Connection:
        self.root.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=30.0)
        conn.row_factory = sqlite3.Row
        conn.execute(SCHEMA)
        return conn

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        conn = self._connect()
        try:
            with conn:
                return conn.execute(sql, args).fetchall()
        finally:
            conn.close()

    def reserve(self, record: VmRecord) -> None:
        """Insert a new record; a name already present (alive or dead) is an error."""
        validate_name(record.name)
        cols = [f.name for f in fields(VmRecord)]
        sql = f"INSERT INTO vms ({','.join(cols)}) VALUES ({','.join('?' * len(cols))})"
        try:
            self._query(sql, tuple(getattr(record, c) for c in cols))
        except sqlite3.IntegrityError:
            self.ensure_free(record.name)
            # The record that was in the way is already gone again.
            raise DuplicateVm(f"another czonectl was creating or removing VM {record.name!r} "
                              "at the same time; try again") from None

    def ensure_free(self, name: str) -> None:
        """Raise DuplicateVm if a record named ``name`` exists."""
        try:
            existing = self.get(name)
        except UnknownVm:
            return
        st = status(existing)
        hint = (f"run `czonectl vm down {name}` to remove it" if st == "dead"
                else "pick another --name")
        raise DuplicateVm(f"a VM named {name!r} already exists ({st}); {hint}")

    def reserve_launch(self, name: str, **values: Any) -> VmRecord:
        """Reserve ``name`` for a launch owned by this process."""
        me = os.getpid()
        rec = VmRecord(name=name, state="starting", pid=me, proc_start=process_start(me),
                       created=time.time(), **values)
        self.reserve(rec)
        return rec

    def mark_up(self, name: str, pid: int, proc_start: float) -> None:
        self._query("UPDATE vms SET state='up', pid=?, proc_start=? WHERE name=?",
                    (pid, proc_start, name))

    def get(self, name: str) -> VmRecord:
        rows = self._query("SELECT * FROM vms WHERE name=?", (name,))
        if not rows:
            known = ", ".join(r.name for r in self.list()) or "none"
            raise UnknownVm(f"no VM named {name!r} (known: {known})")
        return VmRecord(**dict(rows[0]))

    def running(self, name: str) -> VmRecord:
        """The record of ``name``, which must be running."""
        rec = self.get(name)
        st = status(rec)
        if st != "running":
            raise VmNotRunning(f"VM {name!r} is {st}" + (
                f"; `czonectl vm down {name}` removes it" if st == "dead" else ""))
        return rec

    def list(self) -> list[VmRecord]:
        return [VmRecord(**dict(r)) for r in self._query("SELECT * FROM vms ORDER BY created")]

    def remove(self, name: str) -> None:
        self._query("DELETE FROM vms WHERE name=?", (name,))
