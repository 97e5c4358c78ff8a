"""czone-agentd: the guest's container agent.

Listens on the VM's loopback (the host reaches it through an SSH
``direct-tcpip`` channel; containers have network namespaces of their own
and cannot).  Each connection carries newline-delimited JSON: a request
``{"op": ..., ...}`` gets one reply ``{"ok": true, ...}`` or ``{"ok": false,
"errno": "ENOENT", "error": "...", "detail": "..."}``, with the guest-side
time in ``t.agent_ms``.  Several connections are served at once.
"""

from __future__ import annotations

import errno
import json
import socketserver
import sys
import time
import traceback

from containers import AgentFault, Runtime, ms

PORT = 7101
VERSION = 1
MAX_LINE = 16 << 20
DEFAULT_INVOKE_TIMEOUT = 300.0


def _num(req: dict, key: str, default: float | None = None) -> float:
    value = req.get(key, default)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
        raise AgentFault(errno.EINVAL, f"{key!r} must be a non-negative number")
    return value


def _str(req: dict, key: str) -> str:
    value = req.get(key)
    if not isinstance(value, str):
        raise AgentFault(errno.EINVAL, f"{key!r} must be a string")
    return value


def dispatch(rt: Runtime, req: dict) -> dict:
    op = req.get("op")
    if op == "hello":
        return {"version": VERSION}
    if op == "start":
        args = req.get("args")
        if args is not None and (not isinstance(args, list) or not args
                                 or not all(isinstance(a, str) for a in args)):
            raise AgentFault(errno.EINVAL, "'args' must be a non-empty list of strings")
        czone = req.get("czone", True)
        if not isinstance(czone, bool):
            raise AgentFault(errno.EINVAL, "'czone' must be true or false")
        return rt.start(_str(req, "id"), _str(req, "fn"), int(_num(req, "memory_mib")), args,
                        czone)
    if op == "invoke":
        return rt.invoke(_str(req, "id"), req.get("payload"),
                         _num(req, "timeout", DEFAULT_INVOKE_TIMEOUT))
    if op in ("stop", "destroy", "kill"):
        return getattr(rt, op)(_str(req, "id"))
    if op == "reclaim":
        ctr = req.get("id")
        if ctr is not None and not isinstance(ctr, str):
            raise AgentFault(errno.EINVAL, "'id' must be a string")
        return rt.reclaim(ctr, _num(req, "idle_for", 0))
    if op == "stats":
        return rt.stats()
    if op == "list":
        return rt.list()
    raise AgentFault(errno.EINVAL, f"unknown op {op!r}")


def handle_line(rt: Runtime, line: bytes) -> dict:
    t0 = time.monotonic()
    try:
        req = json.loads(line)
        if not isinstance(req, dict):
            raise AgentFault(errno.EINVAL, "a request is a JSON object")
        reply = {"ok": True, **dispatch(rt, req)}
    except AgentFault as e:
        reply = {"ok": False, "errno": e.errno_name, "error": str(e), "detail": e.detail}
    except (ValueError, TypeError) as e:
        reply = {"ok": False, "errno": "EINVAL", "error": f"bad request: {e}", "detail": ""}
    except Exception as e:  # a bug or an OS failure: answer it, keep the connection
        traceback.print_exc()
        reply = {"ok": False, "errno": "EIO", "error": f"{type(e).__name__}: {e}",
                 "detail": ""}
    reply.setdefault("t", {})["agent_ms"] = ms(t0, time.monotonic())
    return reply


class Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        rt = self.server.runtime  # type: ignore[attr-defined]
        while line := self.rfile.readline(MAX_LINE + 1):
            if len(line) > MAX_LINE:
                reply = {"ok": False, "errno": "E2BIG", "error": "request over 16 MiB"}
                self.wfile.write(json.dumps(reply).encode() + b"\n")
                return
            reply = handle_line(rt, line)
            self.wfile.write(json.dumps(reply).encode() + b"\n")
            self.wfile.flush()


class Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


def main() -> int:
    rt = Runtime()
    with Server(("127.0.0.1", PORT), Handler) as srv:
        srv.runtime = rt  # type: ignore[attr-defined]
        print(f"czone-agentd: listening on 127.0.0.1:{PORT}", flush=True)
        try:
            srv.serve_forever()
        finally:
            rt.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
