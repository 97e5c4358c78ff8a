"""A stand-in QEMU for unit tests: speaks just enough QMP on the sockets named
in its argv (``-chardev socket,...,path=P,server=on|off``).

``FAKE_QEMU`` picks the behaviour: ``ok`` answers every command with {}
(``quit`` exits), ``hang`` never answers anything but the handshake, ``die``
exits at the first command, ``silent`` connects but never greets.
"""

import json
import os
import re
import socket
import sys
import threading
import time

MODE = os.environ.get("FAKE_QEMU", "ok")
GREETING = {"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7},
                                "package": "fake"}, "capabilities": []}}


def send(conn: socket.socket, msg: dict) -> None:
    conn.sendall(json.dumps(msg).encode() + b"\r\n")


def commands(conn: socket.socket):  # noqa: ANN201
    """JSON objects as they arrive: QMP clients need not end them with a newline."""
    buf, decoder = "", json.JSONDecoder()
    while data := conn.recv(65536):
        buf += data.decode()
        while buf.strip():
            try:
                cmd, end = decoder.raw_decode(buf.lstrip())
            except json.JSONDecodeError:
                break
            buf = buf.lstrip()[end:]
            yield cmd


def serve(conn: socket.socket) -> None:
    if MODE == "silent":
        time.sleep(3600)
    send(conn, GREETING)
    for cmd in commands(conn):
        reply = {"return": {}, **({"id": cmd["id"]} if "id" in cmd else {})}
        if cmd["execute"] == "qmp_capabilities":
            send(conn, reply)
        elif MODE == "die":
            os._exit(3)
        elif MODE == "ok":
            send(conn, reply)
            if cmd["execute"] == "quit":
                os._exit(0)


def accept_forever(srv: socket.socket) -> None:
    while True:
        threading.Thread(target=serve, args=(srv.accept()[0],), daemon=True).start()


def main() -> None:
    for spec in [a for a in sys.argv if a.startswith("socket,")]:
        path = re.search(r"path=([^,]+)", spec).group(1)
        if "server=on" in spec:
            srv = socket.socket(socket.AF_UNIX)
            srv.bind(path)
            srv.listen()
            threading.Thread(target=accept_forever, args=(srv,), daemon=True).start()
        else:
            conn = socket.socket(socket.AF_UNIX)
            conn.connect(path)
            threading.Thread(target=serve, args=(conn,), daemon=True).start()
    print("fake qemu ready", flush=True)
    time.sleep(3600)


if __name__ == "__main__":
    main()
