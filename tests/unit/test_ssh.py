from __future__ import annotations

import socket
import time
from pathlib import Path

import paramiko
import pytest

from czone.errors import CZoneError
from czone.guest.ssh import GuestCommandError, Result, SSHClient, SshError, SshTimeout
from czone.net import free_port


def test_wait_ready_times_out_on_closed_port(key: Path) -> None:
    t0 = time.monotonic()
    with pytest.raises(SshTimeout, match=r"root@127.0.0.1:\d+ not ready after 2s"):
        SSHClient("127.0.0.1", free_port(), key).wait_ready(timeout=2)
    assert time.monotonic() - t0 < 10


def test_wait_ready_times_out_on_silent_server(key: Path) -> None:
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        with pytest.raises(SshTimeout):
            SSHClient("127.0.0.1", srv.getsockname()[1], key).wait_ready(timeout=2)


def test_check_aborts_wait(key: Path) -> None:
    def boom() -> None:
        raise CZoneError("vm died")

    with pytest.raises(CZoneError, match="vm died"):
        SSHClient("127.0.0.1", free_port(), key).wait_ready(timeout=30, check=boom)


def test_bad_key(tmp_path: Path) -> None:
    (tmp_path / "k").write_text("junk")
    with pytest.raises(CZoneError, match="cannot load SSH key"):
        SSHClient("127.0.0.1", 1, tmp_path / "k")._load_key()


def test_guest_command_error_message() -> None:
    e = GuestCommandError("false", Result(3, "out\n", "bad thing\n"))
    assert "exited with status 3" in str(e) and "bad thing" in str(e) and e.result.rc == 3


def test_paramiko_reads_openssh_ed25519(key: Path) -> None:
    assert isinstance(SSHClient("h", 1, key)._load_key(), paramiko.Ed25519Key)


def test_run_on_closed_port_is_a_clean_error(key: Path) -> None:
    with pytest.raises(SshError, match="cannot connect to root@127.0.0.1"):
        SSHClient("127.0.0.1", free_port(), key).run("true")
