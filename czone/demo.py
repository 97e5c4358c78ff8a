"""``python -m czone.demo``: three containers in one VM, one dies, one idles.

Everything printed about memory is the host's view: the QEMU process's RSS.
"""

from __future__ import annotations

import time

from czone import hostmem
from czone.bench.guestvm import booted
from czone.guest.agent import GuestAgent
from czone.qemu import qmp
from czone.qemu.machine import Machine

MiB = hostmem.MiB
CTR_MIB = 160


def show(vm: Machine, what: str) -> None:
    print(f"{what:<44} host RSS {hostmem.stable_rss(vm.pid) // MiB:>5} MiB, "
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
    before = hostmem.stable_rss(vm.pid)
    res = ag.reclaim(ids["a"])
    print(f"container a freed {freed} MiB, idle reclaim returned "
          f"{(before - hostmem.stable_rss(vm.pid)) / MiB:.0f} MiB ({res['discarded']} pages); "
          f"a intact: {ag.verify('a')} pages checked")
    show(vm, "now")


def main() -> int:
    with booted("demo", 768, memory_mode="czone", device_memory_mib=1024,
                requested_mib=1024) as (vm, accel), \
            vm.ssh() as ssh, GuestAgent(ssh) as ag:
        print(f"accelerator: {accel}")
        demo(vm, ag)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
