"""Boot to SSH-ready: launch → kernel hands over to init → sshd up → a command ran."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from czone import accel as accel_mod
from czone import artifacts
from czone.bench.guestvm import TB_SIZE_MIB
from czone.bench.report import median, table
from czone.net import free_port
from czone.qemu.cmdline import Accel
from czone.state import run_root
from czone.vmboot import booted
from czone.vmspec import spec_for

TIMEOUT = 120.0


def boot_once(accel: Accel, memory_mib: int, workdir: Path) -> dict[str, float]:
    kernel, image, qemu = artifacts.kernel(), artifacts.image(), artifacts.qemu_binary()
    spec = spec_for("bench", workdir, kernel, image, qemu, accel, free_port(), memory_mib,
                    tb_size_mib=TB_SIZE_MIB)
    with booted(spec, image.ssh_key, TIMEOUT) as (_, times):
        return {k: times[k] for k in ("init_s", "sshd_s", "ssh_ready_s")}


def run(rounds: int = 5, memory_mib: int = 512) -> dict[str, Any]:
    kernel = artifacts.kernel()
    image = artifacts.image()
    probed, why = accel_mod.detect(kernel.release, kernel.vmlinux, image.rootfs,
                                   artifacts.qemu_binary(), tuple(artifacts.firmware_dirs()),
                                   run_root())
    accels: list[Accel] = ["tcg"] + (["kvm"] if probed == "kvm" else [])
    result: dict[str, Any] = {"kernel": kernel.release, "image": image.version,
                              "memory_mib": memory_mib, "probe": [probed, why], "runs": {}}
    rows = []
    for accel in accels:
        samples = []
        for _ in range(rounds):
            with tempfile.TemporaryDirectory(prefix="czb-") as d:
                samples.append(boot_once(accel, memory_mib, Path(d)))
        result["runs"][accel] = samples
        rows.append([accel, rounds] + [median([s[k] for s in samples])
                                       for k in ("init_s", "sshd_s", "ssh_ready_s")])
    print(f"boot to SSH-ready, {memory_mib} MiB guest, medians (accelerator probe: {why})")
    print(table(["accel", "rounds", "to init (s)", "sshd up (s)", "SSH ready (s)"], rows))
    return result
