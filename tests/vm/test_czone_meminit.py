"""virtio-czone under the kernel's memory-init options, judged by the host.

init_on_free, init_on_alloc and page_poison each write or read every page
on one of the allocator's paths.  None of them may make the host back a
chunk that was only plugged, re-fault memory it discarded, or fail the
poison check on a page that was discarded while free.  Each option runs
the same scenario in its own VM, with the default options as the control.
"""

from __future__ import annotations

import pytest

from czone import hostmem
from czone.guest.agent import GuestAgent
from czone.qemu.cmdline import DEVICE_MEMFD
from czone.qemu.machine import Machine

from .guest import assert_dmesg_clean
from .test_czone_virtio import CZONE_VIRTIO_VM, memory_judged, rss

pytestmark = pytest.mark.vm
MiB = hostmem.MiB
SMALL = 48      # one-chunk CZones in the plug check


@pytest.fixture(params=["default", "init_on_free=1", "init_on_alloc=1", "page_poison=1"])
def meminit_vm(request, microvm_factory) -> Machine:
    option = request.param
    extra = {} if option == "default" else {"extra_append": option}
    vm = microvm_factory.boot("czmi", **CZONE_VIRTIO_VM, **extra)
    with vm.ssh() as ssh:
        cmdline = ssh.check("cat /proc/cmdline").stdout.split()
        autoinit = ssh.check("dmesg | grep 'mem auto-init:'").stdout
    if option != "default":
        assert cmdline[-1] == option
    if option.startswith("init_on_"):
        which = "alloc" if option == "init_on_alloc=1" else "free"
        assert f"heap {which}:on" in autoinit, autoinit
    return vm


def test_memory_init_options_keep_the_host_view_true(meminit_vm: Machine) -> None:
    vm = meminit_vm
    debug, judged = memory_judged(vm)
    # KASAN writes the shadow of the pages a destroy readies, in boot memory.
    peak_slack = 8 * MiB + (16 * MiB if debug else 0)
    ssh = vm.ssh()
    with GuestAgent(ssh) as agent:
        # A chunk that is only plugged costs the host nothing: 48 CZones
        # use 1 MiB of a 2 MiB chunk each.
        base = judged()
        czones = [agent.create(4) for _ in range(SMALL)]
        for i, cz in enumerate(czones):
            agent.spawn(f"s{i}", cz, 4, thp=False)
            agent.touch(f"s{i}", 1)
        grown = judged() - base
        backed = sum(agent.stat(cz)["backed"] for cz in czones) * 4096
        assert grown <= SMALL * MiB + SMALL * MiB // 2, \
            f"{SMALL} MiB used in {2 * SMALL} MiB of chunks grew RSS by {grown / MiB:.0f} MiB"
        assert abs(grown - backed) <= 12 * MiB, \
            f"RSS grew {grown / MiB:.0f} MiB, the CZones count {backed / MiB:.0f} MiB backed"
        for i, cz in enumerate(czones):
            agent.kill(f"s{i}")
            assert agent.destroy(cz)["failed"] == 0

        # Discarded free pages are handed out again without a poison report,
        # and a destroy does not write them before it unplugs them.
        cz = agent.create(256)
        agent.spawn("big", cz, 256, thp=False)
        agent.touch("big", 128)
        assert agent.punch("big", 64) == 64 * 1024
        touched = judged()
        res = agent.reclaim(cz)
        assert res["failed"] == 0 and res["discarded"] * 4096 >= 62 * MiB, res
        dropped = touched - judged()
        assert dropped >= 56 * MiB, f"RSS fell by {dropped / MiB:.0f} MiB"
        st = agent.stat(cz)
        assert st["backed"] == st["used"], st
        # Half of the discarded pages go to a second container.
        agent.spawn("again", cz, 64, thp=False)
        agent.touch("again", 32)
        assert agent.verify("big") == 128 * 256
        assert agent.verify("again") == 32 * 256

        before = rss(vm)
        hostmem.reset_peak_rss(vm.pid)
        agent.kill("big")
        agent.kill("again")
        assert agent.destroy(cz)["failed"] == 0
        peak = hostmem.peak_rss_bytes(vm.pid) - before
        assert peak <= peak_slack, \
            f"the destroy backed {peak / MiB:.0f} MiB of discarded memory before it unplugged"
        # What the CZones used is the device's memory: none of it may stay.
        # The whole RSS also grows with the guest's boot memory and TCG's
        # code buffer, so it only gets a coarse bound.
        device = hostmem.stable_mapping_rss(vm.pid, DEVICE_MEMFD)
        assert device <= MiB // 4, \
            f"{device / MiB:.1f} MiB of device memory stayed after every CZone was destroyed"
        kept = judged() - base
        assert kept <= 16 * MiB, f"{kept / MiB:.0f} MiB stayed after every CZone was destroyed"
    ssh.close()
    assert_dmesg_clean(vm)
