"""Boot one benchmark guest on our kernel and image and run commands in it."""

from __future__ import annotations

import functools
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from czone import accel as accel_mod
from czone import artifacts, vmboot
from czone.errors import CZoneError
from czone.net import free_port
from czone.qemu.machine import Machine
from czone.state import run_root
from czone.vmspec import spec_for

BOOT_TIMEOUT = 120.0
TB_SIZE_MIB = int(os.environ.get("CZONE_BENCH_TB_SIZE", "64"))


@functools.cache
def _artifacts() -> tuple[artifacts.Kernel, artifacts.Image, Path, str]:
    """Resolved once per run, so that a rebuild meanwhile cannot mix builds."""
    kernel, image, qemu = artifacts.kernel(), artifacts.image(), artifacts.qemu_binary()
    accel, _ = accel_mod.detect(kernel.release, kernel.vmlinux, image.rootfs, qemu,
                                tuple(artifacts.firmware_dirs()), run_root())
    return kernel, image, qemu, accel


@contextmanager
def booted(name: str, memory_mib: int, extra_append: str = "",
           **extra: object) -> Iterator[tuple[Machine, str]]:
    """A booted VM (on the probed accelerator) and the accelerator's name."""
    kernel, image, qemu, accel = _artifacts()
    with tempfile.TemporaryDirectory(prefix=f"czb-{name}-") as d:
        # the same translation cache for every benchmark VM (startup.TB_SIZE_MIB)
        extra.setdefault("tb_size_mib", TB_SIZE_MIB)
        spec = spec_for(name, Path(d), kernel, image, qemu, accel, free_port(), memory_mib,
                        extra_append=extra_append, **extra)
        with vmboot.booted(spec, image.ssh_key, BOOT_TIMEOUT) as (vm, _):
            yield vm, accel


def run(vm: Machine, cmd: str, timeout: float = 1800) -> str:
    with vm.ssh() as ssh:
        res = ssh.run(f"{cmd} 2>&1", timeout=timeout)
    if res.rc:
        raise CZoneError(f"guest command {cmd!r} failed ({res.rc}):\n{res.stdout}")
    return res.stdout


def samples(out: str, kind: str) -> list[dict[str, int]]:
    """Parse ``kind key=value ...`` lines printed by czone_bench."""
    rows = []
    for line in out.splitlines():
        if line.startswith(kind + " "):
            rows.append({k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", line)})
    return rows
