"""A ``VmSpec`` for our kernel and image: the layer above ``czone/qemu/``,
which knows nothing of the artifact cache."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from czone.artifacts import Image, Kernel, firmware_dirs
from czone.errors import CZoneError
from czone.qemu.cmdline import Accel, VmSpec


def spec_for(name: str, run_dir: Path, kernel: Kernel, image: Image, qemu: Path, accel: Accel,
             ssh_port: int | None, memory_mib: int = 512, cpus: int = 1,
             **extra: Any) -> VmSpec:
    """A VmSpec for our kernel and image, with Debian's firmware dirs."""
    return VmSpec(name=name, memory_mib=memory_mib, cpus=cpus, kernel=kernel.vmlinux,
                  rootfs=image.rootfs, fnbase=image.fnbase, qemu=qemu, accel=accel,
                  ssh_port=ssh_port, run_dir=run_dir, firmware_dirs=tuple(firmware_dirs()), **extra)


SPEC_FILE = "spec.json"
# VmSpec fields that hold paths, one or a tuple of them.
_PATHS = ("kernel", "rootfs", "qemu", "run_dir", "fnbase", "ram_file")


def spec_to_json(spec: VmSpec) -> str:
    d = asdict(spec)
    for k, v in d.items():
        if isinstance(v, Path):
            d[k] = str(v)
        elif isinstance(v, tuple):
            d[k] = [str(x) for x in v]
    return json.dumps(d, indent=1, sort_keys=True)


def spec_from_json(text: str) -> VmSpec:
    d = json.loads(text)
    for k in _PATHS:
        if d.get(k) is not None:
            d[k] = Path(d[k])
    d["firmware_dirs"] = tuple(Path(p) for p in d.get("firmware_dirs", ()))
    d["extra_args"] = tuple(d.get("extra_args", ()))
    return VmSpec(**d)


def save_spec(spec: VmSpec) -> None:
    """Keep the spec a VM was launched with in its run dir: a migration
    starts the destination from the very same spec."""
    path = spec.run_dir / SPEC_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(spec_to_json(spec))
    tmp.rename(path)


def load_spec(run_dir: Path) -> VmSpec | None:
    """The spec saved in ``run_dir``, or None if there is none (a VM booted
    before specs were kept)."""
    path = run_dir / SPEC_FILE
    try:
        return spec_from_json(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as e:
        raise CZoneError(f"cannot read the VM spec {path}: {e}") from None
