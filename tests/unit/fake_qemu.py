"""A stand-in QEMU for unit tests: speaks just enough QMP on the sockets named
in its argv (``-chardev socket,...,path=P,server=on|off``).

``FAKE_QEMU`` picks the behaviour: ``ok`` answers every command with {}
(``quit`` exits), ``hang`` never answers anything but the handshake, ``die``
exits at the first command, ``silent`` connects but never greets, ``czone``
has a virtio-czone device with one CZone.  In every
mode but ``balloon-stuck``, a balloon target is reached 0.2 s after the
``balloon`` command, with a BALLOON_CHANGE event.  A ``file`` chardev gets
one line of "serial console".
"""

import json
import os
import re
import socket
import sys
import threading
import time

MODE = os.environ.get("FAKE_QEMU", "ok")
BALLOON = {"actual": 512 << 20}
GREETING = {"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7},
                                "package": "fake"}, "capabilities": []}}


def send(conn: socket.socket, msg: dict) -> None:
    conn.sendall(json.dumps(msg).encode() + b"\r\n")


def inflate(conn: socket.socket, target: int) -> None:
    if MODE != "balloon-stuck":
        time.sleep(0.2)
        BALLOON["actual"] = target
        send(conn, {"event": "BALLOON_CHANGE", "data": {"actual": target},
                    "timestamp": {"seconds": int(time.time()), "microseconds": 0}})


CZONE_DEVICE = {"type": "virtio-czone", "data": {"id": "czdev0", "size": 64 << 20,
                                                 "requested-size": 1 << 30, "max-size": 1 << 30}}
CZONE_STATS = [{"czone": 1, "used": 8 << 20, "free": 56 << 20, "backed": 8 << 20,
                "plugged": 64 << 20}]
RETURNS = {"query-memory-devices": lambda: [CZONE_DEVICE] if MODE == "czone" else [],
           "qom-get": lambda: CZONE_STATS, "query-balloon": lambda: dict(BALLOON)}


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
        name = cmd["execute"]
        reply = {"return": RETURNS.get(name, dict)(),
                 **({"id": cmd["id"]} if "id" in cmd else {})}
        if cmd["execute"] == "qmp_capabilities":
            send(conn, reply)
        elif MODE == "die":
            os._exit(3)
        elif MODE != "hang":
            send(conn, reply)
            if name == "quit":
                os._exit(0)
            if name == "balloon":
                threading.Thread(target=inflate, args=(conn, cmd["arguments"]["value"]),
                                 daemon=True).start()


def accept_forever(srv: socket.socket) -> None:
    while True:
        threading.Thread(target=serve, args=(srv.accept()[0],), daemon=True).start()


def main() -> None:
    for spec in [a for a in sys.argv if a.startswith("file,")]:
        with open(re.search(r"path=([^,]+)", spec).group(1), "w") as f:
            # The guest "boots" to init and reports sshd, which never answers.
            f.write("Run /sbin/czone-init as init process\nczone-init: ready (fake)\n"
                    "fake serial console: no sshd here\n")
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
