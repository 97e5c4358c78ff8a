"""A ``VmSpec`` for our kernel and image: the layer above ``czone/qemu/``,
which knows nothing of the artifact cache."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from czone.artifacts import Image, Kernel, firmware_dirs
from czone.qemu.cmdline import Accel, VmSpec


def spec_for(name: str, run_dir: Path, kernel: Kernel, image: Image, qemu: Path, accel: Accel,
             ssh_port: int | None, memory_mib: int = 512, cpus: int = 1,
             **extra: Any) -> VmSpec:
    """A VmSpec for our kernel and image, with Debian's firmware dirs."""
    return VmSpec(name=name, memory_mib=memory_mib, cpus=cpus, kernel=kernel.vmlinux,
                  rootfs=image.rootfs, fnbase=image.fnbase, qemu=qemu, accel=accel,
                  ssh_port=ssh_port, run_dir=run_dir, firmware_dirs=tuple(firmware_dirs()), **extra)
