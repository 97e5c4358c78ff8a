"""The guest's function server (guest-image/functions/fnserver.py), on stdlib-only functions."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

FUNCTIONS = Path(__file__).resolve().parents[2] / "guest-image" / "functions"
FNSERVER = FUNCTIONS / "fnserver.py"
EXPECTED = json.loads((FUNCTIONS / "expected.json").read_text())
TIMEOUT = 10.0
MAX_LINE = 16 * 1024 * 1024


class Server:
    def __init__(self, func: str, sock_path: Path, fnserver: Path = FNSERVER) -> None:
        self.sock_path = sock_path
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
        self.proc = subprocess.Popen([sys.executable, str(fnserver), func, str(sock_path)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)

    def wait_ready(self) -> None:
        ready, _, _ = select.select([self.proc.stdout], [], [], TIMEOUT)
        assert ready, "no ready line in time"
        assert self.proc.stdout.readline() == b"ready\n"

    def connect(self) -> Client:
        return Client(self.sock_path)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=TIMEOUT)
        self.proc.stdout.close()
        self.proc.stderr.close()


class Client:
    def __init__(self, sock_path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(str(sock_path))
        self.reader = self.sock.makefile("rb")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> dict:
        line = self.reader.readline()
        assert line.endswith(b"\n"), f"no reply line, got {line!r}"
        return json.loads(line)

    def request(self, payload: object = None) -> dict:
        self.send(json.dumps({"payload": payload}).encode() + b"\n")
        return self.reply()

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # A short directory: AF_UNIX paths are limited to 108 bytes, pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="fns"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def start(sock_dir: Path) -> Iterator:
    servers: list[Server] = []

    def start_server(func: str = "float_operation", ready: bool = True) -> Server:
        server = Server(func, sock_dir / "fn.sock")
        servers.append(server)
        if ready:
            server.wait_ready()
        return server

    yield start_server
    for server in servers:
        server.stop()


def assert_serves(server: Server, func: str = "float_operation") -> None:
    client = server.connect()
    try:
        reply = client.request()
        assert reply["ok"] is True and reply["result"] == EXPECTED[func]["result"]
    finally:
        client.close()
    assert server.proc.poll() is None


@pytest.mark.parametrize("func", ["float_operation", "json_dumps_loads"])
def test_default_request_answers_the_expected_result(start, func: str) -> None:
    server = start(func)
    client = server.connect()
    reply = client.request()
    assert reply["ok"] is True
    assert reply["result"] == EXPECTED[func]["result"]
    assert isinstance(reply["run_ms"], float) and reply["run_ms"] > 0
    client.send(b"{}\n")
    assert client.reply()["result"] == EXPECTED[func]["result"]
    client.close()


def test_payload_is_passed_to_the_function(start) -> None:
    client = start().connect()
    assert client.request({"n": 3})["result"]["n"] == 3
    client.close()


@pytest.fixture
def echo_server(sock_dir: Path) -> Iterator[Server]:
    """fnserver.py next to a function that returns its payload."""
    (sock_dir / "fnserver.py").write_bytes(FNSERVER.read_bytes())
    (sock_dir / "echo.py").write_text(
        'DEFAULT_PAYLOAD = {"default": True}\n\ndef handle(payload):\n    return payload\n')
    server = Server("echo", sock_dir / "fn.sock", fnserver=sock_dir / "fnserver.py")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def test_payload_null_or_missing_means_the_default_payload(echo_server: Server) -> None:
    client = echo_server.connect()
    assert client.request(None)["result"] == {"default": True}
    client.send(b"{}\n")
    assert client.reply()["result"] == {"default": True}
    assert client.request({"n": 1})["result"] == {"n": 1}
    assert client.request({})["result"] == {}
    client.send(b'{"payload": 5}\n')
    assert client.reply() == {"ok": False, "error": "ValueError: payload is not a JSON object",
                              "run_ms": 0.0}
    client.close()


@pytest.mark.parametrize("func", ["float_operation", "json_dumps_loads"])
def test_bad_payload_answers_value_error_and_serving_goes_on(start, func: str) -> None:
    server = start(func)
    client = server.connect()
    reply = client.request(EXPECTED[func]["bad_payload"])
    assert reply["ok"] is False
    assert reply["error"] == EXPECTED[func]["bad_error"]
    assert reply["error"].startswith("ValueError: ")
    assert client.request()["result"] == EXPECTED[func]["result"]
    client.close()


@pytest.mark.parametrize("line", [b"not json\n", b"[1, 2]\n", b'{"payload": 5}\n',
                                  b'{"payload": [1]}\n', b"\xff\xfe{}\n", b"\n"])
def test_malformed_request_answers_an_error_and_serving_goes_on(start, line: bytes) -> None:
    client = start().connect()
    client.send(line)
    reply = client.reply()
    assert reply["ok"] is False and reply["error"]
    assert client.request()["result"] == EXPECTED["float_operation"]["result"]
    client.close()


def test_client_gone_mid_line_does_not_kill_the_server(start) -> None:
    server = start()
    client = server.connect()
    client.send(b'{"payload": {"n"')
    client.close()
    assert_serves(server)


def test_client_gone_before_its_reply_does_not_kill_the_server(start) -> None:
    server = start()
    for _ in range(3):
        client = server.connect()
        client.send(b'{"payload": {"n": 200000}}\n')
        client.close()
    assert_serves(server)


def test_line_over_16_mib_is_refused_and_closes_the_connection(start) -> None:
    server = start()
    client = server.connect()
    client.send(b"x" * (MAX_LINE + 1))
    reply = client.reply()
    assert reply["ok"] is False and "16 MiB" in reply["error"]
    assert client.reader.readline() == b""
    client.close()
    assert_serves(server)


@pytest.mark.parametrize("func", ["no_such_function", "os", "fnparams", "fnserver"])
def test_unknown_function_exits_2_with_one_line(start, func: str) -> None:
    server = start(func, ready=False)
    out, err = server.proc.communicate(timeout=TIMEOUT)
    assert server.proc.returncode == 2
    assert out == b""
    assert len(err.decode().splitlines()) == 1
    assert func in err.decode()
    assert not server.sock_path.exists()


def test_stale_socket_is_replaced(start, sock_dir: Path) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock_dir / "fn.sock"))
    stale.close()
    assert_serves(start())


@pytest.mark.parametrize("connected", [False, True])
def test_sigterm_exits_0_and_removes_the_socket(start, connected: bool) -> None:
    server = start()
    client = server.connect() if connected else None
    if client:
        assert client.request()["ok"] is True
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=TIMEOUT) == 0
    assert not server.sock_path.exists()
    if client:
        client.close()
