"""Where a libvirt URI's QEMU runs, and how czonectl reaches its guests.

A *local* endpoint (``qemu:///system``, a Unix socket, or TCP to this
machine's loopback) runs QEMU here: czonectl finds its process, reads its
files and connects to the guest's SSH forward on 127.0.0.1.  Any other
endpoint, and every ``qemu+ssh`` one (the way to reach another machine), is
*remote*: the console streams through libvirt, the guest's SSH forward
(127.0.0.1 on that host) is reached through a ``direct-tcpip`` channel of
an SSH connection to the host (the same user, port and ``keyfile`` as the
URI, the SSH agent and default keys, known_hosts read only), and host memory comes
from libvirt's domain statistics.
"""

from __future__ import annotations

import getpass
import ipaddress
import threading
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paramiko

from czone.guest.ssh import SSHClient, SshError

SSH_TRANSPORTS = ("ssh", "libssh", "libssh2")
KNOWN_HOSTS = Path("/etc/ssh/ssh_known_hosts")
CONNECT_TIMEOUT = 15.0

_lock = threading.Lock()
_jumps: dict[tuple[str, str, int, str | None], paramiko.SSHClient] = {}


class EndpointError(SshError):
    """A remote host's side of reaching a guest failed (an SshError: the
    callers that retry a guest connection retry this too)."""


@dataclass(frozen=True)
class Endpoint:
    uri: str
    transport: str
    host: str
    port: int | None
    user: str | None
    params: dict[str, str] = field(default_factory=dict)

    @property
    def remote(self) -> bool:
        return self.transport in SSH_TRANSPORTS or not is_loopback(self.host)


def is_loopback(host: str) -> bool:
    """``host`` names this machine's loopback ("" too: no host in the URI)."""
    if host in ("", "localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse(uri: str | None) -> Endpoint | None:
    """The endpoint of ``uri`` (None: no URI, a QEMU process of ours)."""
    if not uri:
        return None
    u = urllib.parse.urlsplit(uri)
    transport = u.scheme.partition("+")[2]
    try:
        port = u.port
    except ValueError:
        raise EndpointError(f"bad port in libvirt URI {uri}") from None
    return Endpoint(uri, transport, u.hostname or "", port, u.username,
                    dict(urllib.parse.parse_qsl(u.query)))


def is_remote(uri: str | None) -> bool:
    ep = parse(uri)
    return ep is not None and ep.remote


def _jump(ep: Endpoint) -> paramiko.SSHClient:
    """This process's SSH connection to ``ep``'s host (opened once)."""
    user = ep.user or getpass.getuser()
    port = ep.port or 22
    keyfile = ep.params.get("keyfile")
    key = (user, ep.host, port, keyfile)
    with _lock:
        client = _jumps.get(key)
        transport = client.get_transport() if client is not None else None
        if transport is not None and transport.is_active():
            return client  # type: ignore[return-value]
        if client is not None:
            client.close()
        client = paramiko.SSHClient()
        for known in (Path.home() / ".ssh" / "known_hosts", KNOWN_HOSTS):
            _load_known(client.get_host_keys(), known)
        # libvirt's no_verify=1: an unknown host key is accepted, in memory only
        client.set_missing_host_key_policy(paramiko.AutoAddPolicy()
                                           if ep.params.get("no_verify") == "1"
                                           else paramiko.RejectPolicy())
        try:
            client.connect(ep.host, port, username=user, key_filename=keyfile,
                           timeout=CONNECT_TIMEOUT, banner_timeout=CONNECT_TIMEOUT,
                           auth_timeout=CONNECT_TIMEOUT)
        except (paramiko.SSHException, OSError) as e:
            client.close()
            raise EndpointError(f"cannot reach host {user}@{ep.host}:{port} of {ep.uri} by "
                                f"SSH: {type(e).__name__}: {e}") from None
        _jumps[key] = client
        return client


def _load_known(keys: paramiko.HostKeys, path: Path) -> None:
    """The entries of known_hosts file ``path`` that paramiko understands,
    read only: nothing is ever written back (``SSHClient.load_host_keys``
    would make paramiko rewrite the file, losing what it cannot parse, such
    as ``@cert-authority`` lines, which are skipped here)."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return
    for line in lines:
        try:
            entry = paramiko.hostkeys.HostKeyEntry.from_line(line)
        except Exception:  # InvalidHostKey, or a key type paramiko lacks
            continue
        if entry is not None and entry.key is not None:
            for name in entry.hostnames:
                keys.add(name, entry.key.get_name(), entry.key)


def tunnel(ep: Endpoint, port: int) -> Any:
    """A channel to 127.0.0.1:``port`` on ``ep``'s host (a socket for paramiko)."""
    transport = _jump(ep).get_transport()
    assert transport is not None
    try:
        return transport.open_channel("direct-tcpip", ("127.0.0.1", port), ("127.0.0.1", 0),
                                      timeout=CONNECT_TIMEOUT)
    except (paramiko.SSHException, OSError) as e:
        raise EndpointError(f"host {ep.host} of {ep.uri} refused a tunnel to its port "
                            f"{port}: {e}") from None


def guest_ssh(uri: str | None, port: int, key: Path) -> SSHClient:
    """An SSH client for the guest whose forward is port ``port`` on the
    host of ``uri`` (a QEMU process of ours when None)."""
    ep = parse(uri)
    if ep is None or not ep.remote:
        return SSHClient("127.0.0.1", port, key)
    return SSHClient(ep.host, port, key, sock=lambda: tunnel(ep, port))
