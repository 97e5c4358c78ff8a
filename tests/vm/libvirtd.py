"""A private libvirtd for the tests: Debian's daemon, run as root, but in a
mount namespace of its own where /etc/libvirt, /run/libvirt, /var/lib/libvirt,
/var/cache/libvirt and /var/log/libvirt are directories of the test's, and
with its socket in the test's directory.  The system's libvirt (configured,
running or not) is never touched, and nothing of ours is left behind.

Its qemu.conf runs QEMU as root and leaves file ownership and labels alone:
the artifacts in the shared cache must not be chowned by dynamic ownership.

Several can run at once, as independent hosts (two-host placement,
migration): each has a host UUID of its own (libvirt refuses to migrate a
domain to a host with the source's UUID), its own range of incoming
migration ports, and may also listen on TCP 127.0.0.1:PORT
without authentication, so that it is reached through a remote URI
(``qemu+tcp://127.0.0.1:PORT/system``).  ``hide`` lays an empty directory
over paths in its mount namespace: a host without our QEMU build.
"""

from __future__ import annotations

import contextlib
import shlex
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

import libvirt

# namespace dir -> the system path it hides
DIRS = {"etc": "/etc/libvirt", "run": "/run/libvirt", "lib": "/var/lib/libvirt",
        "cache": "/var/cache/libvirt", "log": "/var/log/libvirt"}
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0

QEMU_CONF = """\
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
stdio_handler = "file"
"""


# Incoming migration ports: a range of its own per daemon (by its index).
MIGRATION_PORT_BASE = 49152
MIGRATION_PORTS = 32


class PrivateLibvirtd:
    def __init__(self, root: Path, index: int = 0, tcp_port: int | None = None,
                 hide: Iterable[str | Path] = ()):
        self.root = root
        self.host_uuid = str(uuid.uuid4())
        self.tcp_port = tcp_port
        self.hide = tuple(Path(p) for p in hide)
        low = MIGRATION_PORT_BASE + index * MIGRATION_PORTS
        self.migration_ports = (low, low + MIGRATION_PORTS - 1)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> Path:
        return self.root / "sock" / "libvirt-sock"

    @property
    def uri(self) -> str:
        return f"qemu:///system?socket={self.socket}"

    @property
    def tcp_uri(self) -> str:
        """Its remote URI (a daemon started with ``tcp_port``)."""
        if self.tcp_port is None:
            raise RuntimeError("this libvirtd does not listen on TCP")
        return f"qemu+tcp://127.0.0.1:{self.tcp_port}/system"

    def _libvirtd_conf(self) -> str:
        conf = (f'unix_sock_dir = "{self.socket.parent}"\n'
                'auth_unix_rw = "none"\nauth_unix_ro = "none"\n'
                f'log_outputs = "3:file:{self.log}"\n'
                f'host_uuid = "{self.host_uuid}"\n')
        if self.tcp_port is not None:
            conf += ('listen_tcp = 1\nlisten_tls = 0\nauth_tcp = "none"\n'
                     f'listen_addr = "127.0.0.1"\ntcp_port = "{self.tcp_port}"\n')
        return conf

    def _qemu_conf(self) -> str:
        low, high = self.migration_ports
        # (migration_address may not be 127.0.0.1 here: the migration asks for it)
        return QEMU_CONF + f"migration_port_min = {low}\nmigration_port_max = {high}\n"

    def _hide_mounts(self) -> list[str]:
        """Shell lines laying an empty directory (or file) over each hidden path."""
        lines = []
        for i, path in enumerate(self.hide):
            empty = self.root / "hidden" / str(i)
            if path.is_dir():
                empty.mkdir(parents=True, exist_ok=True)
            else:
                empty.parent.mkdir(parents=True, exist_ok=True)
                empty.touch()
            lines.append(f"mount --bind {shlex.quote(str(empty))} "
                         f"{shlex.quote(str(path))} || exit 1")
        return lines

    def domain_log(self, domain: str) -> Path:
        return self.root / "log" / "qemu" / f"{domain}.log"

    @property
    def log(self) -> Path:
        return self.root / "libvirtd.log"

    def start(self) -> None:
        for d in (*DIRS, "sock", "log/qemu"):  # a real host has /var/log/libvirt/qemu
            (self.root / d).mkdir(parents=True, exist_ok=True)
        conf = self.root / "etc" / "libvirtd.conf"
        conf.write_text(self._libvirtd_conf())
        (self.root / "etc" / "qemu.conf").write_text(self._qemu_conf())
        mounts = "; ".join([f"mount --bind {self.root / d} {path} || exit 1"
                            for d, path in DIRS.items()] + self._hide_mounts())
        listen = " --listen" if self.tcp_port is not None else ""
        # Its pid file too: the default, /run/libvirtd.pid, is outside /run/libvirt.
        script = (f"mkdir -p {' '.join(DIRS.values())}; {mounts}; "
                  f"exec libvirtd{listen} -f {conf} -p {self.root / 'libvirtd.pid'}")
        with open(self.root / "libvirtd.out", "wb") as out:
            # unshare execs: the Popen's pid is libvirtd's.
            self.proc = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"libvirtd exited with {self.proc.returncode}: "
                                   f"{(self.root / 'libvirtd.out').read_text()}")
            if self.socket.exists():
                with contextlib.suppress(libvirt.libvirtError):
                    libvirt.open(self.uri).close()
                    if self.tcp_port is not None:
                        libvirt.open(self.tcp_uri).close()
                    return
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"libvirtd did not answer at {self.uri} within "
                                   f"{START_TIMEOUT:.0f}s")
            time.sleep(0.2)

    def restart(self) -> None:
        """Stop the daemon alone (its domains' QEMU processes run on) and start
        it again on the same directories: it reattaches to them."""
        assert self.proc is not None
        self.proc.terminate()
        self.proc.wait(STOP_TIMEOUT)
        self.start()

    def connect(self) -> libvirt.virConnect:
        return libvirt.open(self.uri)

    def stop(self) -> list[str]:
        """Destroy and undefine every domain, stop the daemon, remove its
        directories; returns the domains that were still there."""
        left: list[str] = []
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(libvirt.libvirtError):
                conn = self.connect()
                for dom in conn.listAllDomains():
                    left.append(dom.name())
                    with contextlib.suppress(libvirt.libvirtError):
                        if dom.isActive():
                            dom.destroy()
                    with contextlib.suppress(libvirt.libvirtError):
                        dom.undefine()
                conn.close()
            self.proc.terminate()
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self.root, ignore_errors=True)
        return left

    def save_logs(self, dest: Path) -> None:
        dest.mkdir(parents=True, exist_ok=True)
        for f in (self.log, self.root / "libvirtd.out"):
            if f.exists():
                shutil.copy(f, dest / f.name)
        qlogs = self.root / "log" / "qemu"
        if qlogs.is_dir():
            for f in qlogs.glob("*.log"):
                shutil.copy(f, dest / f"libvirt-{f.name}")
