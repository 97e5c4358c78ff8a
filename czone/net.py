"""Host-side networking: user-mode forwards on 127.0.0.1 (the bridge is czone/bridge.py)."""

from __future__ import annotations

import errno
import socket

from czone.errors import CZoneError

HOST = "127.0.0.1"


class PortBusy(CZoneError):
    pass


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def check_port_free(port: int) -> None:
    if not 0 < port < 65536:
        raise PortBusy(f"port {port} is not a valid TCP port (1-65535)")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # As QEMU's forward does: TIME_WAIT leftovers don't count, a listener does.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise PortBusy(f"port {port} on {HOST} is already in use; "
                               "pick another --ssh-port or omit it") from None
            raise PortBusy(f"cannot use port {port} on {HOST}: {e.strerror}") from None
