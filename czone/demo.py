"""``python -m czone.demo``: three containers in one VM, one dies, one idles.

Everything printed about memory is the host's view: the QEMU process's RSS.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from czone import accel, artifacts, hostmem
from czone.guest.agent import GuestAgent
from czone.net import free_port
from czone.qemu import qmp
from czone.qemu.machine import Machine, spec_for
from czone.state import run_root

MiB = hostmem.MiB
CTR_MIB = 160


def rss(vm: Machine) -> int:
    return hostmem.settle(lambda: hostmem.rss_bytes(vm.pid), timeout=120).value


def show(vm: Machine, what: str) -> None:
    print(f"{what:<44} host RSS {rss(vm) // MiB:>5} MiB, "
          f"plugged {qmp.device_size(vm, 'czdev0') // MiB:>5} MiB")


def demo(vm: Machine, ag: GuestAgent) -> None:
    show(vm, "booted, no container")
    ids = {name: ag.create(256) for name in ("a", "b", "c")}
    for name, cz in ids.items():
        ag.spawn(name, cz, 256, thp=False)
    ag.interleave(list(ids), CTR_MIB, step_kib=64)
    show(vm, f"3 containers, {CTR_MIB} MiB each, interleaved")

    ag.kill("b")
    with hostmem.RssWatch(vm.pid) as w:
        t0 = time.monotonic()
        res = ag.destroy(ids["b"])
        before, after, latency = w.finish(t0)
    print(f"container b destroyed: {(before - after) / MiB:.0f} MiB back to the host in "
          f"{latency * 1000:.0f} ms ({res['released']} chunks, {res['migrated']} pages "
          f"migrated); a and c intact: {ag.verify('a') + ag.verify('c')} pages checked")

    freed = ag.punch("a", 64) // 1024
    before = rss(vm)
    res = ag.reclaim(ids["a"])
    print(f"container a freed {freed} MiB, idle reclaim returned "
          f"{(before - rss(vm)) / MiB:.0f} MiB ({res['discarded']} pages); "
          f"a intact: {ag.verify('a')} pages checked")
    show(vm, "now")


def main() -> int:
    kernel, image, qemu = artifacts.kernel(), artifacts.image(), artifacts.qemu_binary()
    fw = tuple(artifacts.firmware_dirs())
    acc, why = accel.detect(kernel.release, kernel.vmlinux, image.rootfs, qemu, fw, run_root())
    print(f"accelerator: {acc} ({why})")
    run_dir = Path(tempfile.mkdtemp(prefix="czone-demo-"))
    spec = spec_for("demo", run_dir, kernel, image, qemu, acc, free_port(), 768, 1,
                    memory_mode="czone", device_memory_mib=1024, requested_mib=1024)
    vm = Machine(spec, ssh_key=image.ssh_key)
    try:
        vm.launch()
        vm.wait_boot(120)
        with vm.wait_ssh(120) as ssh, GuestAgent(ssh) as ag:
            demo(vm, ag)
    finally:
        vm.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
