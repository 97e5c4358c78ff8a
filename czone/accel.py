"""Choose KVM or TCG honestly.

An openable /dev/kvm is not enough: nested guests on some hosts open it
fine and then hang in early boot.  So KVM is chosen only when a probe boot
of *our* kernel under KVM reaches the hand-over to init within a short
time.  The verdict is cached in the run dir per (kernel, QEMU) so only the
first command pays for the probe; ``$CZONE_ACCEL=kvm|tcg`` skips it.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from czone.errors import CZoneError
from czone.qemu.cmdline import INIT_MARKER, Accel, VmSpec
from czone.qemu.machine import Machine, VmLaunchError

PROBE_TIMEOUT = 15.0
KVM_GET_API_VERSION = 0xAE00
KVM_API_VERSION = 12
CACHE_FILE = "accel.json"


def kvm_device_usable(dev: str = "/dev/kvm") -> tuple[bool, str]:
    try:
        fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return False, f"{dev} not usable: {e.strerror}"
    try:
        version = fcntl.ioctl(fd, KVM_GET_API_VERSION)
    except OSError as e:
        return False, f"{dev} does not answer KVM_GET_API_VERSION: {e.strerror}"
    finally:
        os.close(fd)
    if version != KVM_API_VERSION:
        return False, f"{dev} has KVM API version {version}, expected {KVM_API_VERSION}"
    return True, f"{dev} is usable"


def cache_key(kernel_release: str, vmlinux: Path, qemu: Path) -> str:
    return f"{kernel_release}|{vmlinux}|{qemu}"


def read_cache(state_dir: Path, key: str) -> tuple[Accel, str] | None:
    try:
        entry = json.loads((state_dir / CACHE_FILE).read_text())[key]
        return entry["accel"], entry["reason"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_cache(state_dir: Path, key: str, accel: Accel, reason: str) -> None:
    path = state_dir / CACHE_FILE
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            data = {}
    except (OSError, ValueError):
        data = {}
    data[key] = {"accel": accel, "reason": reason, "probed": time.time()}
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def forced() -> tuple[Accel, str] | None:
    value = os.environ.get("CZONE_ACCEL", "").strip().lower()
    if not value:
        return None
    if value not in ("kvm", "tcg"):
        raise CZoneError(f"$CZONE_ACCEL must be 'kvm' or 'tcg', not {value!r}")
    return value, "forced by $CZONE_ACCEL"  # type: ignore[return-value]


def probe_kvm(vmlinux: Path, rootfs: Path, qemu: Path, firmware: tuple[Path, ...],
              timeout: float = PROBE_TIMEOUT) -> tuple[bool, str]:
    """Boot our kernel under KVM until it runs init; True if it got there in time."""
    run_dir = Path(tempfile.mkdtemp(prefix="czone-probe-"))
    spec = VmSpec(name="kvm-probe", memory_mib=256, cpus=1, kernel=vmlinux, rootfs=rootfs,
                  qemu=qemu, accel="kvm", ssh_port=None, run_dir=run_dir,
                  firmware_dirs=firmware)
    machine = Machine(spec)
    start = time.monotonic()
    try:
        machine.launch()
        machine.wait_for_console(INIT_MARKER, timeout)
        return True, f"KVM probe boot reached init in {time.monotonic() - start:.1f}s"
    except VmLaunchError as e:
        if machine.is_running():
            return False, f"KVM probe boot did not reach init within {timeout:.0f}s"
        last = (e.qemu_log.strip().splitlines() or [str(e).splitlines()[0]])[-1]
        return False, f"QEMU failed under KVM: {last}"
    finally:
        machine.kill()
        shutil.rmtree(run_dir, ignore_errors=True)


def detect(kernel_release: str, vmlinux: Path, rootfs: Path, qemu: Path,
           firmware: tuple[Path, ...], state_dir: Path, *, reprobe: bool = False,
           timeout: float = PROBE_TIMEOUT) -> tuple[Accel, str]:
    """``(accel, reason)``: forced, cached, or probed (and then cached)."""
    if f := forced():
        return f
    usable, why = kvm_device_usable()
    if not usable:
        return "tcg", why
    key = cache_key(kernel_release, vmlinux, qemu)
    if not reprobe and (hit := read_cache(state_dir, key)):
        return hit[0], f"{hit[1]} (cached)"
    ok, why = probe_kvm(vmlinux, rootfs, qemu, firmware, timeout)
    verdict: tuple[Accel, str] = ("kvm", why) if ok else ("tcg", f"{why}; using TCG")
    write_cache(state_dir, key, *verdict)
    return verdict


def will_probe(kernel_release: str, vmlinux: Path, qemu: Path, state_dir: Path) -> bool:
    """True if ``detect`` would boot a probe VM now (so callers can say so)."""
    return (forced() is None and kvm_device_usable()[0]
            and read_cache(state_dir, cache_key(kernel_release, vmlinux, qemu)) is None)


def cached_or_tcg(kernel_release: str, vmlinux: Path, qemu: Path,
                  state_dir: Path) -> tuple[Accel, str]:
    """Without probing (for --dry-run): forced, cached, else TCG."""
    if f := forced():
        return f
    if hit := read_cache(state_dir, cache_key(kernel_release, vmlinux, qemu)):
        return hit[0], f"{hit[1]} (cached)"
    return "tcg", "not probed (dry run); TCG assumed"
