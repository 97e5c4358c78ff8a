"""The OCI bundle of one function container: its paths and its config.json.

A bundle lives in ``/run/czone/ctr/<id>/``:

    config.json   the OCI runtime spec below
    meta.json     what the agent needs to find the container again
    rootfs/       overlay mount point (lower: the shared function base image)
    layer/        tmpfs mount point for the overlay's upper and work dirs
    sock/         bind-mounted at /run/fn in the container: the server socket
    log           crun's and the server's stderr

``config`` is a pure function so that it can be unit-tested on the host.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path("/run/czone/ctr")
FNBASE = Path("/run/czone/fnbase")
FN_DIR = "/opt/fn"
SOCK_IN_CTR = "/run/fn/fn.sock"
ID_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")
FN_RE = re.compile(r"[a-z][a-z0-9_]{0,63}")
# cgroup v2 parent of every container's cgroup.
CGROUP_PARENT = "czone"

# The capabilities a function server keeps: none beyond what a plain
# unprivileged process has; root in the container is not root of the VM.
_CAPS: list[str] = []
_MASKED = ["/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
           "/proc/timer_list", "/proc/sched_debug", "/proc/scsi", "/sys/firmware"]
_READONLY = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]


def bundle_dir(ctr_id: str) -> Path:
    return ROOT / ctr_id


def cgroup_path(ctr_id: str) -> str:
    return f"/{CGROUP_PARENT}/{ctr_id}"


def config(ctr_id: str, fn: str, memory_mib: int, bundle: Path) -> dict:
    """The OCI runtime spec (1.0) of function ``fn``'s container ``ctr_id``."""
    limit = memory_mib << 20
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": ["/usr/bin/python3", f"{FN_DIR}/fnserver.py", fn, SOCK_IN_CTR],
            "env": ["PATH=/usr/local/bin:/usr/bin:/bin", "HOME=/root",
                    "PYTHONDONTWRITEBYTECODE=1",
                    # One BLAS thread: a thread per vCPU per container costs
                    # memory and buys nothing for one request at a time.
                    "OPENBLAS_NUM_THREADS=1", "OMP_NUM_THREADS=1"],
            "cwd": "/",
            "noNewPrivileges": True,
            "capabilities": {k: _CAPS for k in
                             ("bounding", "effective", "inheritable", "permitted", "ambient")},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
        },
        "root": {"path": str(bundle / "rootfs"), "readonly": False},
        "hostname": ctr_id,
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=1m"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", f"size={limit}"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/run/fn", "type": "bind", "source": str(bundle / "sock"),
             "options": ["rbind", "rw", "nosuid", "nodev", "noexec"]},
        ],
        "linux": {
            # A network namespace of its own as well: the agent listens on the
            # VM's loopback, which a container must not reach.
            "namespaces": [{"type": t} for t in ("pid", "mount", "ipc", "uts", "network")],
            "cgroupsPath": cgroup_path(ctr_id),
            "resources": {"memory": {"limit": limit}},
            "maskedPaths": _MASKED,
            "readonlyPaths": _READONLY,
        },
    }
