"""A private sshd on 127.0.0.1 for the tests: the "remote" host of a
``qemu+ssh://`` URI.  Its own host key, one authorized key, port forwarding
on (czonectl reaches guests through it), nothing else of the system's."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

START_TIMEOUT = 15.0


class PrivateSshd:
    def __init__(self, root: Path, port: int):
        self.root, self.port = root, port
        self.key = root / "client_key"
        self.proc: subprocess.Popen[bytes] | None = None

    def uri(self, socket_path: Path) -> str:
        """A ``qemu+ssh`` URI of the libvirtd listening on ``socket_path``,
        through this sshd (libvirt runs nc there: virt-ssh-helper would
        ignore the socket)."""
        return (f"qemu+ssh://root@127.0.0.1:{self.port}/system?socket={socket_path}"
                f"&keyfile={self.key}&no_verify=1&no_tty=1&proxy=netcat")

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        for key in (self.root / "host_key", self.key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
                           check=True)
        shutil.copy(self.key.with_suffix(".pub"), self.root / "authorized_keys")
        conf = self.root / "sshd_config"
        conf.write_text(f"Port {self.port}\nListenAddress 127.0.0.1\n"
                        f"HostKey {self.root / 'host_key'}\n"
                        f"AuthorizedKeysFile {self.root / 'authorized_keys'}\n"
                        f"PidFile {self.root / 'sshd.pid'}\n"
                        "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
                        "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
                        "AllowTcpForwarding yes\n"
                        # DEBUG1 logs each direct-tcpip channel: the tests see the tunnel
                        "LogLevel DEBUG1\n")
        Path("/run/sshd").mkdir(exist_ok=True)  # its privilege separation dir
        with open(self.root / "sshd.log", "wb") as log:
            self.proc = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(conf)],
                                         stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited: {(self.root / 'sshd.log').read_text()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"sshd did not listen on {self.port}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self.root, ignore_errors=True)

    def log(self) -> str:
        return (self.root / "sshd.log").read_text(errors="replace")

    def save_logs(self, dest: Path) -> None:
        log = self.root / "sshd.log"
        if log.exists():
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy(log, dest / "sshd.log")
