"""Per-container function server: newline-delimited JSON over a Unix socket.

Usage: python3 fnserver.py FUNC SOCKET_PATH

FUNC is a module next to this file that defines DEFAULT_PAYLOAD and
handle(payload).  It is imported once, then every request runs handle().

Request, one line:  {"payload": {...}}   (null or missing: DEFAULT_PAYLOAD)
Reply, one line:    {"ok": true, "result": ..., "run_ms": 1.2}
               or   {"ok": false, "error": "ValueError: ...", "run_ms": 1.2}
"""

import importlib.util
import json
import os
import signal
import socket
import stat
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
MAX_LINE = 16 * 1024 * 1024


def load_function(name):
    """The module FUNC, or None if this directory has no such function."""
    path = os.path.join(HERE, name + ".py")
    if not name.isidentifier() or not os.path.isfile(path):
        return None
    # pyaes.py and chameleon.py share their library's name: libraries must come first
    # on sys.path, and the function module gets a name of its own.
    sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != os.path.realpath(HERE)]
    sys.path.append(HERE)
    spec = importlib.util.spec_from_file_location("fn_" + name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    if not callable(getattr(module, "handle", None)) or not hasattr(module, "DEFAULT_PAYLOAD"):
        return None
    return module


def error_text(exc):
    return f"{type(exc).__name__}: {exc}"


def parse_request(line, default_payload):
    """The payload of one request line; ValueError if the line is malformed."""
    request = json.loads(line.decode())  # UnicodeDecodeError, JSONDecodeError: ValueErrors
    if not isinstance(request, dict):
        raise ValueError("request is not a JSON object")
    payload = request.get("payload")
    if payload is None:
        return dict(default_payload)
    if not isinstance(payload, dict):
        raise ValueError("payload is not a JSON object")
    return payload


def answer(module, line):
    """The reply line (bytes, newline-terminated) to one request line."""
    try:
        payload = parse_request(line, module.DEFAULT_PAYLOAD)
    except ValueError as exc:
        reply = {"ok": False, "error": error_text(exc), "run_ms": 0.0}
    else:
        start = time.perf_counter()
        try:
            reply = {"ok": True, "result": module.handle(payload)}
        except Exception as exc:
            reply = {"ok": False, "error": error_text(exc)}
        reply["run_ms"] = (time.perf_counter() - start) * 1000.0
    try:
        text = json.dumps(reply, allow_nan=False)
    except (TypeError, ValueError) as exc:
        text = json.dumps({"ok": False, "error": "result is not JSON: " + error_text(exc),
                           "run_ms": reply["run_ms"]})
    return text.encode() + b"\n"


def serve_connection(module, conn):
    with conn, conn.makefile("rb") as reader:
        while True:
            line = reader.readline(MAX_LINE + 1)
            if not line.endswith(b"\n"):
                if len(line) > MAX_LINE:
                    conn.sendall(b'{"ok": false, "error": "request line longer than 16 MiB"'
                                 b', "run_ms": 0.0}\n')
                return  # EOF, possibly mid-line: the client is gone
            conn.sendall(answer(module, line))


def bind(path):
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            sys.exit(f"fnserver: {path} exists and is not a socket")
        os.unlink(path)
    except FileNotFoundError:
        pass
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(16)
    return server


def stop(signum, frame):
    sys.exit(0)


def main(argv):
    if len(argv) != 3:
        print("usage: fnserver.py FUNC SOCKET_PATH", file=sys.stderr)
        return 2
    name, path = argv[1], argv[2]
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    module = load_function(name)
    if module is None:
        print(f"fnserver: unknown function {name!r}", file=sys.stderr)
        return 2
    server = bind(path)
    try:
        print("ready", flush=True)
        # Whoever waited for "ready" may stop reading: later prints go to stderr.
        os.dup2(2, 1)
        while True:
            conn, _ = server.accept()
            try:
                serve_connection(module, conn)
            except OSError:
                pass  # the client went away while we were reading or replying
    finally:
        server.close()
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


if __name__ == "__main__":
    sys.exit(main(sys.argv))
