"""Build artifacts in the content-addressed cache.

Every artifact lives in ``$CZONE_CACHE/<name>/<key>/`` where ``key`` hashes
the inputs that build it: the repo files listed in ``INPUTS`` plus the
version of the Debian source package it starts from.  The build scripts ask
this module for the key (``python3 czone/artifacts.py key kernel``), so the
scripts and the agent can never disagree about which build is current.

Stdlib only: the build scripts run it before the venv exists.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from czone.errors import CZoneError

REPO = Path(__file__).resolve().parents[1]

# artifact -> (repo paths hashed, Debian package whose version is hashed, make target)
INPUTS: dict[str, tuple[tuple[str, ...], str | None, str]] = {
    "kernel": (("kernel-patches", "scripts/build-kernel.sh", "scripts/lib.sh"),
               "linux-source-6.12", "make kernel"),
    "qemu": (("qemu-device", "scripts/build-qemu.sh", "scripts/lib.sh"),
             "qemu-system-data", "make qemu"),
    "image": (("guest-image", "scripts/build-image.sh", "scripts/lib.sh"),
              None, "make image"),
    # the same series and config, plus KASAN, lockdep, DEBUG_VM and DEBUG_LIST
    "kernel-debug": (("kernel-patches", "scripts/build-kernel.sh", "scripts/lib.sh"),
                     "linux-source-6.12", "make kernel-debug"),
    # the same source and config without the series: the run-time baseline
    "kernel-stock": (("kernel-patches/configs", "scripts/build-kernel-stock.sh",
                      "scripts/lib.sh"), "linux-source-6.12", "make kernel-stock"),
}
# The image's in-guest tools compile against the kernel's UAPI headers.
DEPENDS: dict[str, tuple[str, ...]] = {"image": ("kernel",)}

# The device protocol is defined once, by the kernel series; QEMU imports it.
SHARED_HEADER = "include/uapi/linux/virtio_czone.h"
KERNEL_SERIES = "kernel-patches/6.12.x"


class ArtifactMissing(CZoneError):
    def __init__(self, name: str, path: Path):
        self.name, self.path = name, path
        self.make_target = INPUTS[name][2]
        super().__init__(f"{name} artifact not built: {path} is missing; "
                         f"run `{self.make_target}`")


def cache_dir() -> Path:
    return Path(os.environ.get("CZONE_CACHE") or Path.home() / ".cache" / "czone")


def _deb_version(pkg: str) -> str:
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", pkg],
                             capture_output=True, text=True, check=False)
    except FileNotFoundError:
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "not-installed"


def _files(root: Path, rel: str) -> list[Path]:
    p = root / rel
    if p.is_file():
        return [p]
    if not p.is_dir():
        return []
    return sorted(f for f in p.rglob("*") if f.is_file() and "__pycache__" not in f.parts)


def input_key(name: str, root: Path = REPO) -> str:
    """Hash of everything that builds artifact ``name`` (12 hex digits)."""
    paths, deb, _ = INPUTS[name]
    h = hashlib.sha256()
    for rel in paths:
        for f in _files(root, rel):
            h.update(str(f.relative_to(root)).encode() + b"\0")
            h.update(f.read_bytes() + b"\0")
    if deb:
        h.update(f"{deb}={_deb_version(deb)}".encode())
    for dep in DEPENDS.get(name, ()):
        h.update(f"{dep}={input_key(dep, root)}".encode())
    if name == "qemu":
        h.update(shared_header(root).encode())
    return h.hexdigest()[:12]


def shared_header(root: Path = REPO) -> str:
    """The text of SHARED_HEADER as the kernel series leaves it: the patch
    that creates it and every later one that changes it, applied alone."""
    patches = sorted((root / KERNEL_SERIES).glob("*.patch"))
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(["git", "apply", f"--include={SHARED_HEADER}",
                               *map(str, patches)],
                              cwd=tmp, capture_output=True, text=True)
        header = Path(tmp) / SHARED_HEADER
        if proc.returncode != 0 or not header.exists():
            raise CZoneError(f"no {SHARED_HEADER} from {KERNEL_SERIES}: "
                             f"{proc.stderr.strip() or 'no patch creates it'}")
        return header.read_text()


def artifact_dir(name: str) -> Path:
    return cache_dir() / name / input_key(name)


@dataclass(frozen=True)
class Kernel:
    vmlinux: Path
    release: str


@dataclass(frozen=True)
class Image:
    rootfs: Path
    ssh_key: Path
    version: str
    # The function base image: the read-only lower layer of every container.
    fnbase: Path


def _require(name: str, *files: str) -> Path:
    d = artifact_dir(name)
    for f in files:
        if not (d / f).exists():
            raise ArtifactMissing(name, d / f)
    return d


def kernel() -> Kernel:
    """The current kernel: ``$CZONE_KERNEL`` (a vmlinux) when set, the debug
    build when ``$CZONE_KERNEL_FLAVOUR`` is ``debug``, else ``make kernel``'s."""
    if override := os.environ.get("CZONE_KERNEL"):
        return Kernel(Path(override), "external")
    flavour = os.environ.get("CZONE_KERNEL_FLAVOUR", "")
    if flavour not in ("", "debug"):
        raise CZoneError(f"CZONE_KERNEL_FLAVOUR={flavour!r}: want debug, or nothing")
    d = _require("kernel-debug" if flavour else "kernel", "vmlinux", "release")
    return Kernel(d / "vmlinux", (d / "release").read_text().strip())


def kernel_stock() -> Kernel:
    """The stock kernel of ``make kernel-stock`` (no CZone series)."""
    d = _require("kernel-stock", "vmlinux", "release")
    return Kernel(d / "vmlinux", (d / "release").read_text().strip())


def qemu_binary(override: str | os.PathLike | None = None) -> Path:
    """``override``, else ``$CZONE_QEMU``, else the QEMU that ``make qemu`` built."""
    if override or os.environ.get("CZONE_QEMU"):
        p = Path(override or os.environ["CZONE_QEMU"])
        if not p.is_file():
            raise CZoneError(f"QEMU binary {p} does not exist")
        return p
    return _require("qemu", "bin/qemu-system-x86_64") / "bin/qemu-system-x86_64"


def image() -> Image:
    d = _require("image", "rootfs.squashfs", "fnbase.squashfs", "id_ed25519", "version")
    return Image(d / "rootfs.squashfs", d / "id_ed25519", (d / "version").read_text().strip(),
                 d / "fnbase.squashfs")


def firmware_dirs() -> list[Path]:
    """Debian's firmware: the dfsg QEMU tarball ships none."""
    return [Path("/usr/share/qemu"), Path("/usr/share/seabios")]


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[1] == "key" and argv[2] in INPUTS:
        print(input_key(argv[2]))
        return 0
    if len(argv) == 3 and argv[1] == "dir" and argv[2] in INPUTS:
        print(artifact_dir(argv[2]))
        return 0
    if len(argv) == 2 and argv[1] == "shared-header":
        sys.stdout.write(shared_header())
        return 0
    print(f"usage: {argv[0]} key|dir {'|'.join(INPUTS)} | shared-header", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
