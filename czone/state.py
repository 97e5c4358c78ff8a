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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

import psutil

from czone.artifacts import cache_dir
from czone.endpoint import is_remote
from czone.errors import CZoneError
from czone.libvirt_backend import domain_status
from czone.qemu.machine import live_process

# "unknown": a VM on another machine whose libvirt does not answer (it may
# well run; nothing may treat it as dead).
Status = Literal["running", "starting", "dead", "unknown"]

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
);
CREATE TABLE IF NOT EXISTS containers (
    id TEXT PRIMARY KEY,
    vm TEXT NOT NULL,
    fn TEXT NOT NULL,
    memory_mib INTEGER NOT NULL,
    state TEXT NOT NULL,
    owner_pid INTEGER NOT NULL,
    owner_start REAL NOT NULL,
    czone INTEGER,
    startup_s REAL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS hosts (
    name TEXT PRIMARY KEY,
    uri TEXT NOT NULL UNIQUE,
    added REAL NOT NULL
)
"""
# Columns added to ``vms`` after its first version: (name, SQL type and default).
VM_COLUMNS_V2 = (("fn", "TEXT"), ("mode", "TEXT"), ("memory_mode", "TEXT NOT NULL DEFAULT 'none'"),
                 ("device_mib", "INTEGER NOT NULL DEFAULT 0"),
                 ("requested_mib", "INTEGER NOT NULL DEFAULT 0"))
# Version 3, bridged networking: the mode, and for "bridge" the namespace, the
# VM's address (CIDR) and its tap there.  Older records read as "user".
VM_COLUMNS_V3 = (("net", "TEXT NOT NULL DEFAULT 'user'"), ("netns", "TEXT"),
                 ("net_addr", "TEXT"), ("tap", "TEXT"))
# Version 4, the backend: "qemu" (a QEMU process of ours) or "libvirt" (a
# domain at ``uri``).  Older records read as "qemu".
VM_COLUMNS_V4 = (("backend", "TEXT NOT NULL DEFAULT 'qemu'"), ("uri", "TEXT"))


class StateError(CZoneError):
    """The SQLite store failed (locked past the timeout, unreadable, ...)."""


class UnknownVm(CZoneError):
    pass


class VmNotRunning(CZoneError):
    pass


class DuplicateVm(CZoneError):
    pass


class InvalidName(CZoneError):
    pass


class HostError(CZoneError):
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
    fn: str | None = None
    mode: str | None = None
    memory_mode: str = "none"
    device_mib: int = 0
    requested_mib: int = 0
    net: str = "user"
    netns: str | None = None
    net_addr: str | None = None
    tap: str | None = None
    backend: str = "qemu"
    uri: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def pid_matches(pid: int, proc_start: float) -> bool:
    return live_process(pid, proc_start) is not None


def status(record: VmRecord) -> Status:
    """A libvirt VM's state is libvirt's once it is up (a domain destroyed
    behind our back is dead); if libvirt cannot be asked, its QEMU pid's,
    or ``unknown`` on another machine, where no process of it is here."""
    if record.backend == "libvirt" and record.state != "starting" and record.uri:
        seen = domain_status(record.uri, record.name)
        if seen is not None:
            return seen  # type: ignore[return-value]
        if is_remote(record.uri):
            return "unknown"
    if not pid_matches(record.pid, record.proc_start):
        return "dead"
    return "starting" if record.state == "starting" else "running"


class StateDB:
    def __init__(self, root: Path | None = None):
        self.root = root or run_root()
        self.path = self.root / "state.db"

    def vm_dir(self, name: str) -> Path:
        return self.root / "vms" / name

    def migration_marker(self, name: str) -> Path:
        """Written by the czonectl that migrates VM ``name`` for as long as it
        does; one left by a dead owner is settled by ``reconcile``."""
        return self.root / "migrations" / f"{name}.json"

    def migration_markers(self) -> list[Path]:
        return sorted((self.root / "migrations").glob("*.json"))

    def _connect(self) -> sqlite3.Connection:
        try:
            return self._open()
        except sqlite3.OperationalError as e:
            raise StateError(f"the state store {self.path}: {e}") from None

    def _open(self) -> sqlite3.Connection:
        self.root.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=60.0)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.executescript(SCHEMA)
        have = {r[1] for r in conn.execute("PRAGMA table_info(vms)")}
        for col, sqltype in VM_COLUMNS_V2 + VM_COLUMNS_V3 + VM_COLUMNS_V4:
            if col not in have:
                try:
                    conn.execute(f"ALTER TABLE vms ADD COLUMN {col} {sqltype}")
                except sqlite3.OperationalError as e:
                    if "duplicate column" not in str(e):  # another process was first
                        raise
        return conn

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken at once (BEGIN IMMEDIATE): a placement
        decision and the records it implies are atomic across processes."""
        conn = self._connect()
        conn.isolation_level = None
        try:
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as e:  # busy past the timeout
                raise StateError(f"the state store {self.path}: {e}") from None
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        finally:
            conn.close()

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        conn = self._connect()
        try:
            with conn:
                return conn.execute(sql, args).fetchall()
        except sqlite3.OperationalError as e:
            raise StateError(f"the state store {self.path}: {e}") from None
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

    def reserve_launch(self, name: str,
                       assign: Callable[[list[VmRecord]], dict[str, Any]] | None = None,
                       **values: Any) -> VmRecord:
        """Reserve ``name`` for a launch owned by this process; ``assign``, given
        every record, adds values decided in the same transaction (an address)."""
        validate_name(name)
        me = os.getpid()
        with self.transaction() as conn:
            if assign is not None:
                values = {**values, **assign(vms_in(conn))}
            rec = VmRecord(name=name, state="starting", pid=me, proc_start=process_start(me),
                           created=time.time(), **values)
            taken = bool(conn.execute("SELECT 1 FROM vms WHERE name=?", (name,)).fetchall())
            if not taken:
                vm_insert(conn, rec)
        if taken:
            self.ensure_free(name)
            raise DuplicateVm(f"another czonectl was creating or removing VM {name!r} "
                              "at the same time; try again")
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

    def set_vm(self, name: str, **values: Any) -> None:
        sets = ", ".join(f"{k}=?" for k in values)
        self._query(f"UPDATE vms SET {sets} WHERE name=?", (*values.values(), name))

    def ctrs(self) -> list[CtrRecord]:
        return [CtrRecord(**dict(r))
                for r in self._query("SELECT * FROM containers ORDER BY created")]

    def ctr(self, ctr_id: str) -> CtrRecord:
        rows = self._query("SELECT * FROM containers WHERE id=?", (ctr_id,))
        if not rows:
            raise UnknownContainer(f"no container {ctr_id!r} (`czonectl ps` lists them)")
        return CtrRecord(**dict(rows[0]))

    def set_ctr(self, ctr_id: str, **values: Any) -> None:
        sets = ", ".join(f"{k}=?" for k in values)
        self._query(f"UPDATE containers SET {sets} WHERE id=?", (*values.values(), ctr_id))

    def remove_ctr(self, ctr_id: str) -> None:
        self._query("DELETE FROM containers WHERE id=?", (ctr_id,))

    # -- the fleet: libvirt endpoints by name --------------------------------

    def hosts(self) -> list[HostRecord]:
        return [HostRecord(**dict(r)) for r in self._query("SELECT * FROM hosts ORDER BY name")]

    def host(self, name: str) -> HostRecord:
        rows = self._query("SELECT * FROM hosts WHERE name=?", (name,))
        if not rows:
            known = ", ".join(h.name for h in self.hosts()) or "none; `czonectl host add`"
            raise HostError(f"no host named {name!r} (known: {known})")
        return HostRecord(**dict(rows[0]))

    def add_host(self, name: str, uri: str) -> HostRecord:
        if not NAME_RE.fullmatch(name):
            raise InvalidName(f"invalid host name {name!r}: use 1-32 letters, digits, '_', '.', "
                              "'-' starting with a letter or digit")
        rec = HostRecord(name, uri, time.time())
        with self.transaction() as conn:
            for row in conn.execute("SELECT name, uri FROM hosts WHERE name=? OR uri=?",
                                    (name, uri)):
                raise HostError(f"host {row['name']!r} already has "
                                + ("that name" if row["name"] == name else f"URI {uri}")
                                + f" ({row['uri']})")
            conn.execute("INSERT INTO hosts (name, uri, added) VALUES (?, ?, ?)",
                         (rec.name, rec.uri, rec.added))
        return rec

    def remove_host(self, name: str) -> HostRecord:
        """Forget host ``name``; refused while a VM record is on it."""
        with self.transaction() as conn:
            rows = conn.execute("SELECT * FROM hosts WHERE name=?", (name,)).fetchall()
            if not rows:
                raise HostError(f"no host named {name!r}")
            rec = HostRecord(**dict(rows[0]))
            vms = [r[0] for r in conn.execute(
                "SELECT name FROM vms WHERE backend='libvirt' AND uri=? ORDER BY name",
                (rec.uri,))]
            if vms:
                raise HostError(f"host {name!r} holds VM(s) {', '.join(vms)}; migrate them "
                                "away or `czonectl vm down` them first")
            conn.execute("DELETE FROM hosts WHERE name=?", (name,))
        return rec


@dataclass
class HostRecord:
    """A libvirt endpoint of the fleet, by a name of the operator's."""

    name: str
    uri: str
    added: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def host_of(vm: VmRecord, hosts: list[HostRecord]) -> str:
    """Where ``vm`` runs, for people: its host's name, else its URI, else
    ``local`` (a QEMU process of ours)."""
    if vm.backend != "libvirt" or not vm.uri:
        return "local"
    return next((h.name for h in hosts if h.uri == vm.uri), vm.uri)


CtrState = Literal["starting", "running", "stopping", "lost"]


@dataclass
class CtrRecord:
    """A function container.  ``owner_*`` is the czonectl process that is
    starting or stopping it; a dead owner means the operation was cut short."""

    id: str
    vm: str
    fn: str
    memory_mib: int
    state: str
    owner_pid: int
    owner_start: float
    czone: int | None
    startup_s: float | None
    created: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def owner_alive(self) -> bool:
        return pid_matches(self.owner_pid, self.owner_start)


class UnknownContainer(CZoneError):
    pass


def ctr_insert(conn: sqlite3.Connection, rec: CtrRecord) -> None:
    cols = [f.name for f in fields(CtrRecord)]
    conn.execute(f"INSERT INTO containers ({','.join(cols)}) VALUES "
                 f"({','.join('?' * len(cols))})", tuple(getattr(rec, c) for c in cols))


def vm_insert(conn: sqlite3.Connection, rec: VmRecord) -> None:
    validate_name(rec.name)
    cols = [f.name for f in fields(VmRecord)]
    conn.execute(f"INSERT INTO vms ({','.join(cols)}) VALUES ({','.join('?' * len(cols))})",
                 tuple(getattr(rec, c) for c in cols))


def vms_in(conn: sqlite3.Connection) -> list[VmRecord]:
    return [VmRecord(**dict(r)) for r in conn.execute("SELECT * FROM vms ORDER BY created")]


def ctrs_in(conn: sqlite3.Connection) -> list[CtrRecord]:
    return [CtrRecord(**dict(r))
            for r in conn.execute("SELECT * FROM containers ORDER BY created")]
