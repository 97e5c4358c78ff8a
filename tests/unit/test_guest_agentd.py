"""The guest agent's protocol, bundle and ioctl encoding, on the host (no VM)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
AGENT_DIR = REPO / "guest-image/rootfs/usr/local/lib/czone-agent"
sys.path.insert(0, str(AGENT_DIR))

import agentd  # noqa: E402
import bundle  # noqa: E402
import czonedev  # noqa: E402
from containers import AgentFault  # noqa: E402


class FakeRuntime:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def start(self, ctr_id: str, fn: str, memory_mib: int, args: list | None,
              czone: bool) -> dict:
        self.calls.append(("start", ctr_id, fn, memory_mib) + (() if czone else ("no czone",)))
        if fn == "nope":
            raise AgentFault(2, f"unknown function {fn!r}")
        return {"czone": 7}

    def invoke(self, ctr_id: str, payload: object, timeout: float) -> dict:
        self.calls.append(("invoke", ctr_id, payload, timeout))
        return {"reply": {"ok": True, "result": 1}}

    def kill(self, ctr_id: str) -> dict:
        raise AgentFault(16, f"container {ctr_id!r} busy", "crun: some stderr")

    def stats(self) -> dict:
        raise KeyError("a bug")


def ask(rt: FakeRuntime, req: object) -> dict:
    line = req if isinstance(req, bytes) else json.dumps(req).encode()
    return agentd.handle_line(rt, line)


def test_requests_are_dispatched_with_their_arguments() -> None:
    rt = FakeRuntime()
    r = ask(rt, {"op": "start", "id": "c1", "fn": "matmul", "memory_mib": 128})
    assert r["ok"] is True and r["czone"] == 7 and r["t"]["agent_ms"] >= 0
    ask(rt, {"op": "invoke", "id": "c1", "payload": {"n": 3}, "timeout": 5})
    assert rt.calls == [("start", "c1", "matmul", 128), ("invoke", "c1", {"n": 3}, 5)]
    ask(rt, {"op": "start", "id": "c2", "fn": "matmul", "memory_mib": 128, "czone": False})
    assert rt.calls[-1] == ("start", "c2", "matmul", 128, "no czone")


@pytest.mark.parametrize("req, errno_name, text", [
    (b"{not json", "EINVAL", "bad request"),
    ([1, 2], "EINVAL", "a request is a JSON object"),
    ({"op": "frobnicate"}, "EINVAL", "unknown op 'frobnicate'"),
    ({"op": "start", "id": "c", "fn": "matmul", "memory_mib": 64, "czone": "no"}, "EINVAL",
     "'czone' must be true or false"),
    ({"op": "start", "fn": "matmul", "memory_mib": 64}, "EINVAL", "'id' must be a string"),
    ({"op": "start", "id": "c", "fn": "f", "memory_mib": -1}, "EINVAL", "non-negative"),
    ({"op": "invoke", "id": "c", "timeout": True}, "EINVAL", "'timeout'"),
    ({"op": "start", "id": "c", "fn": "f", "memory_mib": 64, "args": "sh"}, "EINVAL", "'args'"),
    ({"op": "start", "id": "c", "fn": "nope", "memory_mib": 64}, "ENOENT", "unknown function"),
])
def test_bad_requests_get_an_errno_and_one_line(req: object, errno_name: str,
                                               text: str) -> None:
    r = ask(FakeRuntime(), req)
    assert r["ok"] is False and r["errno"] == errno_name and text in r["error"]


def test_a_fault_carries_its_detail() -> None:
    r = ask(FakeRuntime(), {"op": "kill", "id": "c9"})
    assert (r["errno"], r["detail"]) == ("EBUSY", "crun: some stderr")


def test_an_unexpected_exception_is_an_answer_not_a_dropped_connection(
        capsys: pytest.CaptureFixture) -> None:
    r = ask(FakeRuntime(), {"op": "stats"})
    assert (r["ok"], r["errno"], r["error"]) == (False, "EIO", "KeyError: 'a bug'")
    assert "Traceback" in capsys.readouterr().err


def test_bundle_config_isolates_and_limits() -> None:
    cfg = bundle.config("c1", "matmul", 128, Path("/run/czone/ctr/c1"))
    assert {n["type"] for n in cfg["linux"]["namespaces"]} == \
        {"pid", "mount", "ipc", "uts", "network"}
    assert cfg["linux"]["resources"]["memory"]["limit"] == 128 << 20
    assert cfg["linux"]["cgroupsPath"] == "/czone/c1"
    assert cfg["root"]["path"] == "/run/czone/ctr/c1/rootfs"
    assert cfg["process"]["args"][-2:] == ["matmul", "/run/fn/fn.sock"]
    assert all(v == [] for v in cfg["process"]["capabilities"].values())
    binds = [m for m in cfg["mounts"] if m["type"] == "bind"]
    assert binds == [{"destination": "/run/fn", "type": "bind",
                      "source": "/run/czone/ctr/c1/sock",
                      "options": ["rbind", "rw", "nosuid", "nodev", "noexec"]}]


def test_ids_and_function_names_cannot_escape_the_bundle_root() -> None:
    for bad in ("../x", "a/b", "", "A", "-x", "x" * 64):
        assert not bundle.ID_RE.fullmatch(bad)
    assert not bundle.FN_RE.fullmatch("../etc")


def uapi_ioctls() -> dict[str, int]:
    """The request number of every CZone ioctl, computed from the UAPI header
    as the kernel series defines it: ``CZONE_IOC(dir, nr, NAME)``, which
    encodes the struct's ``CZONE_NAME_SIZE_VER0`` rather than its sizeof()."""
    text = "\n".join(line[1:] for p in sorted((REPO / "kernel-patches/6.12.x").glob("*.patch"))
                     for line in p.read_text().splitlines()
                     if line.startswith("+") and not line.startswith("+++"))
    assert "_IOC(dir, CZONE_IOC_MAGIC, nr, CZONE_##name##_SIZE_VER0)" in text
    sizes = {m[1]: int(m[2]) for m in re.finditer(r"#define CZONE_(\w+)_SIZE_VER0 (\d+)", text)}
    magic = int(re.search(r"#define CZONE_IOC_MAGIC\s+(0x\w+)", text)[1], 16)
    dirs = {"_IOC_READ | _IOC_WRITE": 3, "_IOC_WRITE": 1, "_IOC_READ": 2}
    return {m[1]: (dirs[m[2]] << 30) | (sizes[m[4]] << 16) | (magic << 8) | int(m[3], 16)
            for m in re.finditer(r"#define CZONE_IOC_(\w+)\s+CZONE_IOC\(([^,]+), (0x\w+), "
                                 r"(\w+)\)", text)}


def test_ioctl_numbers_match_the_uapi_header(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []

    def fake_ioctl(fd: int, request: int, buf: bytearray) -> int:
        seen.append((request, bytes(buf[:8])))
        return 0

    monkeypatch.setattr(czonedev.fcntl, "ioctl", fake_ioctl)
    monkeypatch.setattr(czonedev.os, "open", lambda *a: 3)
    dev = czonedev.CZoneDev()
    dev.create(4 << 20)
    dev.destroy(5)
    dev.stat(5)
    dev.reclaim(5)
    want = uapi_ioctls()
    assert [r for r, _ in seen] == [want[k] for k in ("CREATE", "DESTROY", "STAT", "RECLAIM")]
    # Every struct starts with its own size.
    assert seen[0][1] == (24).to_bytes(4, "little") + bytes(4)


def test_caps_are_whole_chunks() -> None:
    assert czonedev.cap_for(1) == 2 << 20
    assert czonedev.cap_for(128) == 128 << 20
    assert czonedev.cap_for(129) == 130 << 20
