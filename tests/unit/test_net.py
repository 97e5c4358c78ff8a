from __future__ import annotations

import socket

import pytest

from czone.net import PortBusy, check_port_free, free_port


def test_free_port_is_free() -> None:
    check_port_free(free_port())


def test_busy_port() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(PortBusy, match=f"port {port} .* already in use"):
            check_port_free(port)


def test_invalid_port() -> None:
    with pytest.raises(PortBusy):
        check_port_free(70000)
