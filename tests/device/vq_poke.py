#!/usr/bin/env python3
"""Drive virtio-czone-pci's virtqueues from the host, without a guest.

QEMU runs with -accel qtest; this script plays the guest driver through the
qtest protocol: it programs the PCI BAR, negotiates features over the
virtio-pci modern common config, places split rings in guest RAM, and sends
requests.  It checks every response against the error matrix, the plugged
size, MEMORY_DEVICE_SIZE_CHANGE events, the stats property, the config
change ISR bit, RSS going down on UNPLUG/DISCARD, virtio_error() on
malformed buffers (device NEEDS_RESET, QEMU alive), and unplug-all on
system reset.

Usage: [VQ_TRACE=1] vq_poke.py [QEMU_BINARY]
(default QEMU: the one `make qemu` built; VQ_TRACE=1: -trace virtio_czone_*)
"""
import asyncio
import os
import struct
import subprocess
import tempfile
import time

from checks import check, finish, qemu_binary, stop
from fakedrv import (
    ACK,
    BUF,
    ERROR,
    NACK,
    QSIZE,
    REQ_DISCARD,
    REQ_PLUG,
    REQ_STATE,
    REQ_UNPLUG,
    REQ_UNPLUG_ALL,
    RESP,
    RING,
    ST_MIXED,
    ST_PLUGGED,
    ST_UNPLUGGED,
    GiB,
    KiB,
    MiB,
    QTest,
    VirtioCZone,
)
from qemu.qmp import QMPClient

from czone import hostmem

QEMU = qemu_binary()


def rss_kib(pid):
    return hostmem.rss_bytes(pid) // 1024


async def main():
    tmp = tempfile.mkdtemp()
    qsock, msock = os.path.join(tmp, "qtest.sock"), os.path.join(tmp, "qmp.sock")
    args = [QEMU, "-M", "q35", "-nodefaults", "-L", "/usr/share/qemu",
            "-L", "/usr/share/seabios", "-accel", "qtest",
            "-m", "512M,maxmem=4G", "-display", "none", "-serial", "none",
            "-object", "memory-backend-memfd,id=cz0,size=1G",
            "-device", "virtio-czone-pci,id=czdev0,memdev=cz0,block-size=2M,"
                       "requested-size=64M",
            "-qtest", f"unix:{qsock},server=on,wait=off",
            "-qtest-log", "/dev/null",
            "-qmp", f"unix:{msock},server=on,wait=off"]
    if os.environ.get("VQ_TRACE"):
        args += ["-trace", "virtio_czone_*"]
    proc = subprocess.Popen(args)
    try:
        await run(proc, qsock, msock)
    finally:
        if proc.poll() is None:
            proc.kill()
    finish()


async def run(proc, qsock, msock):
    for _ in range(100):
        if os.path.exists(qsock) and os.path.exists(msock):
            break
        time.sleep(0.1)
    qmp = QMPClient("poke")
    await qmp.connect(msock)
    qt = QTest(qsock)
    path = "/machine/peripheral/czdev0"

    async def qget(prop):
        return await qmp.execute("qom-get", {"path": path, "property": prop})

    async def events():
        """Sizes from MEMORY_DEVICE_SIZE_CHANGE; the event is rate-limited
        to one per second per device, so wait for the trailing one.  Under
        qtest the limiter runs on the virtual clock: step it."""
        qt.cmd("clock_step 1100000000")
        evs = []
        while True:
            try:
                ev = await asyncio.wait_for(qmp.events.get(), 1.5)
            except TimeoutError:
                return evs
            if ev["event"] == "MEMORY_DEVICE_SIZE_CHANGE":
                evs.append(ev["data"]["size"])

    dev = VirtioCZone(qt)
    dev.init()
    cfg = dev.cfg()
    print("config:", {k: hex(v) for k, v in cfg.items()})
    base, bs = cfg["addr"], cfg["block_size"]
    check(bs == 2 * MiB and cfg["region_size"] == GiB and
          cfg["usable_region_size"] == GiB and cfg["requested_size"] == 64 * MiB
          and cfg["plugged_size"] == 0 and base == 4 * GiB,
          "config space")
    check(dev.host_features & 1 and dev.num_queues == 2,
          f"STATS_VQ offered, 2 queues (features 0x{dev.host_features:x})")

    def expect(what, r, typ, state=None):
        ok = r is not None and r[0] == typ and (state is None or r[1] == state)
        got = "no response" if r is None else \
            f"{RESP.get(r[0], r[0])} state={r[1]} len={r[2]}"
        check(ok, f"{what}: {got}")

    # ---- PLUG / NACK / ERROR matrix
    expect("PLUG 2M at start", dev.req(REQ_PLUG, base, bs), ACK)
    # Patterns that the bad requests below must leave alone: the plugged
    # block, the unplugged block next to it, and guest RAM (the last page
    # below the 512M of RAM, and one page far from the rings).
    guarded = [(base, b"plugged-"), (base + bs, b"neighbour"),
               (512 * MiB - 4 * KiB, b"ram-top-"), (0x02000000, b"ram-low-")]

    def write_guarded():
        for addr, tag in guarded:
            qt.memwrite(addr, (tag * 512)[:4096])

    def guarded_intact(what):
        bad = [hex(a) for a, tag in guarded if qt.memread(a, 4096) != (tag * 512)[:4096]]
        check(not bad, f"memory intact after {what} (changed: {bad})")

    write_guarded()
    evs = await events()
    check(evs == [2 * MiB], f"MEMORY_DEVICE_SIZE_CHANGE 2M: {evs}")
    expect("PLUG same block again", dev.req(REQ_PLUG, base, bs), ERROR)
    expect("PLUG overlapping range", dev.req(REQ_PLUG, base, 2 * bs), ERROR)
    expect("PLUG misaligned addr", dev.req(REQ_PLUG, base + bs + 4 * KiB, bs),
           ERROR)
    expect("PLUG misaligned size", dev.req(REQ_PLUG, base + bs, bs + 4 * KiB),
           ERROR)
    expect("PLUG size 0", dev.req(REQ_PLUG, base + bs, 0), ERROR)
    expect("PLUG below region", dev.req(REQ_PLUG, base - bs, bs), ERROR)
    expect("PLUG past region end", dev.req(REQ_PLUG, base + GiB - bs, 2 * bs),
           ERROR)
    expect("PLUG at region end", dev.req(REQ_PLUG, base + GiB, bs), ERROR)
    expect("PLUG overflowing", dev.req(REQ_PLUG, (1 << 64) - bs, 2 * bs),
           ERROR)
    expect("PLUG huge size", dev.req(REQ_PLUG, base, (1 << 64) - bs), ERROR)
    guarded_intact("the bad PLUG requests")
    expect("PLUG beyond requested_size (64M)",
           dev.req(REQ_PLUG, base + bs, 64 * MiB), NACK)
    expect("PLUG up to requested_size", dev.req(REQ_PLUG, base + bs, 62 * MiB),
           ACK)
    expect("PLUG one more block", dev.req(REQ_PLUG, base + 64 * MiB, bs), NACK)
    check(await qget("size") == 64 * MiB, "size 64M")
    check(dev.cfg()["plugged_size"] == 64 * MiB, "config plugged_size 64M")
    check(dev.cfg()["discard_alignment"] == 4096, "config discard_alignment 4K")
    evs = await events()
    check(evs == [64 * MiB], f"MEMORY_DEVICE_SIZE_CHANGE 64M: {evs}")
    md = (await qmp.execute("query-memory-devices"))[0]["data"]
    check(md["size"] == 64 * MiB, "query-memory-devices size 64M")

    # ---- STATE
    expect("STATE plugged", dev.req(REQ_STATE, base, 4 * bs), ACK, ST_PLUGGED)
    expect("STATE unplugged", dev.req(REQ_STATE, base + 64 * MiB, bs), ACK,
           ST_UNPLUGGED)
    expect("STATE mixed", dev.req(REQ_STATE, base + 62 * MiB, 2 * bs), ACK,
           ST_MIXED)
    expect("STATE misaligned", dev.req(REQ_STATE, base + 4 * KiB, bs), ERROR)

    # ---- RSS: touch 64M, unplug 32M, discard 8M of pages
    pid = proc.pid
    r0 = rss_kib(pid)
    for off in range(0, 64 * MiB, MiB):
        qt.memset(base + off, MiB, 0x5A)
    r1 = rss_kib(pid)
    check(r1 - r0 > 60 * 1024, f"RSS after touching 64M: {r0} -> {r1} KiB")
    expect("UNPLUG 32M", dev.req(REQ_UNPLUG, base + 32 * MiB, 32 * MiB), ACK)
    r2 = rss_kib(pid)
    check(r1 - r2 > 30 * 1024, f"RSS after UNPLUG 32M: {r1} -> {r2} KiB")
    evs = await events()
    check(evs == [32 * MiB], f"MEMORY_DEVICE_SIZE_CHANGE 32M: {evs}")
    expect("UNPLUG again", dev.req(REQ_UNPLUG, base + 32 * MiB, bs), ERROR)
    expect("UNPLUG mixed range", dev.req(REQ_UNPLUG, base + 30 * MiB, 2 * bs),
           ERROR)
    expect("DISCARD 8M of pages", dev.req(REQ_DISCARD, base + 4 * KiB,
                                         8 * MiB), ACK)
    r3 = rss_kib(pid)
    check(r2 - r3 > 7 * 1024, f"RSS after DISCARD 8M: {r2} -> {r3} KiB")
    check(await qget("size") == 32 * MiB, "DISCARD keeps size 32M")
    data = qt.memread(base, 8 * KiB)
    check(data[:4 * KiB] == b"\x5a" * 4096 and data[4 * KiB:] == bytes(4096),
          "DISCARD zeroed exactly the discarded pages")
    expect("DISCARD one page", dev.req(REQ_DISCARD, base + 16 * MiB, 4 * KiB),
           ACK)
    expect("DISCARD misaligned addr", dev.req(REQ_DISCARD, base + 512, 4 * KiB),
           ERROR)
    expect("DISCARD misaligned size", dev.req(REQ_DISCARD, base, 512), ERROR)
    expect("DISCARD size 0", dev.req(REQ_DISCARD, base, 0), ERROR)
    expect("DISCARD crossing into unplugged",
           dev.req(REQ_DISCARD, base + 32 * MiB - 4 * KiB, 8 * KiB), ERROR)
    expect("DISCARD in unplugged", dev.req(REQ_DISCARD, base + 40 * MiB,
                                          4 * KiB), ERROR)
    expect("DISCARD outside region", dev.req(REQ_DISCARD, base - 4 * KiB,
                                            4 * KiB), ERROR)
    expect("unknown request type 9", dev.req(9, base, bs), ERROR)
    # RECLAIM_DONE (5) for a reclaim the host never asked for
    expect("RECLAIM_DONE of seq 1 without a request", dev.req(5, 1, 0), ERROR)
    expect("UNPLUG_ALL with size", dev.req(REQ_UNPLUG_ALL, 0, bs), ERROR)

    # ---- requested-size change raises a config interrupt (ISR bit 1)
    qt.r(8, dev.isr)
    await qmp.execute("qom-set", {"path": path, "property": "requested-size",
                                  "value": 16 * MiB})
    check(qt.r(8, dev.isr) & 2, "config change ISR bit after qom-set")
    check(dev.cfg()["requested_size"] == 16 * MiB, "config requested_size 16M")
    expect("PLUG over lowered requested_size",
           dev.req(REQ_PLUG, base + 32 * MiB, bs), NACK)

    # ---- stats
    n = dev.stats([(7, 1 * MiB, 2 * MiB, 3 * MiB, 4 * MiB),
                   (9, 10, 20, 30, 40)])
    check(n == 0, f"stats buffer returned (used len {n})")
    st = await qget("stats")
    check(st == [{"czone": 7, "used": MiB, "free": 2 * MiB,
                  "backed": 3 * MiB, "plugged": 4 * MiB},
                 {"czone": 9, "used": 10, "free": 20, "backed": 30,
                  "plugged": 40}], f"qom-get stats {st}")
    n = dev.stats([(3, 1, 2, 3, 4)], nr=1, buf_len=8 + 40 * 4)
    check(n == 0 and len(await qget("stats")) == 1,
          "stats with spare room in buffer")
    n = dev.stats([], nr=0)
    check(n == 0 and await qget("stats") == [], "empty stats snapshot")

    # ---- UNPLUG_ALL
    expect("UNPLUG_ALL", dev.req(REQ_UNPLUG_ALL), ACK)
    check(await qget("size") == 0, "size 0 after UNPLUG_ALL")
    evs = await events()
    check(evs == [0], f"MEMORY_DEVICE_SIZE_CHANGE 0: {evs}")
    expect("STATE after UNPLUG_ALL", dev.req(REQ_STATE, base, 32 * MiB), ACK,
           ST_UNPLUGGED)
    r4 = rss_kib(pid)
    check(r4 < r0 + 4 * 1024, f"RSS back to start: {r0} -> {r4} KiB")

    # ---- protocol violations: virtio_error, device needs reset, QEMU lives
    expect("PLUG 2M for the guarded pattern", dev.req(REQ_PLUG, base, bs), ACK)
    write_guarded()
    for what, kw in (("short request (16 bytes)", dict(out_len=16)),
                     ("long request (40 bytes)", dict(out_len=40)),
                     ("no response buffer", dict(in_len=0)),
                     ("short response buffer", dict(in_len=4))):
        r = dev.req(REQ_STATE, base, bs, **kw)
        check(r is None and dev.status() & 0x40,
              f"{what}: not answered, NEEDS_RESET set "
              f"(status 0x{dev.status():x})")
        dev.init()
    n = dev.stats([(1, 1, 1, 1, 1)], nr=5)
    check(n is None and dev.status() & 0x40, "stats nr_czones > buffer")
    dev.init()
    n = dev.stats([], buf_len=4)
    check(n is None and dev.status() & 0x40, "stats buffer < header")
    dev.init()
    # 2^32-1 reaches the cap check (which comes first) whatever the buffer;
    # 1025 entries in a buffer that holds them fail only on the cap (1024),
    # and 1024 entries are accepted.
    n = dev.stats([], nr=0xFFFFFFFF, buf_len=8 + 40 * 1025)
    check(n is None and dev.status() & 0x40, "stats nr_czones = 2^32-1")
    dev.init()
    n = dev.stats([], nr=1025, buf_len=8 + 40 * 1025)
    check(n is None and dev.status() & 0x40, "stats nr_czones = 1025 > cap, buffer big enough")
    dev.init()
    n = dev.stats([(i, 1, 2, 3, 4) for i in range(1024)])
    check(n == 0 and len(await qget("stats")) == 1024, "stats nr_czones = 1024 accepted")
    dev.init()
    # malformed descriptor chains: virtqueue_pop() reports them
    avail = RING[0] + 16 * QSIZE
    for what, desc in (
            ("descriptor outside guest memory",
             struct.pack("<QIHH", 0xFFFFFFFF0000, 32, 0, 0)),
            ("looped descriptor chain",
             struct.pack("<QIHH", BUF, 32, 1, 0)),
            ("descriptor next out of range",
             struct.pack("<QIHH", BUF, 32, 1, 200)),
            ("readable after writable descriptor",
             struct.pack("<QIHH", BUF + 0x100, 16, 3, 1) +
             struct.pack("<QIHH", BUF, 32, 0, 0))):
        qt.memwrite(RING[0], desc)
        qt.w(16, avail + 4, 0)
        qt.w(16, avail + 2, 1)
        qt.w(16, dev.notify_addr[0], 0)
        check(dev.status() & 0x40 and proc.poll() is None,
              f"{what} -> NEEDS_RESET")
        dev.init()
    guarded_intact("the protocol violations")
    expect("device works after reset", dev.req(REQ_UNPLUG, base, bs), ACK)
    expect("device works after reset", dev.req(REQ_PLUG, base, bs), ACK)
    n = dev.stats([(5, 1, 2, 3, 4)])
    gen = await qget("stats-generation")
    check(n == 0 and len(await qget("stats")) == 1, "stats snapshot before system_reset")

    # ---- system reset unplugs everything
    qt.memset(base, bs, 0x77)
    await qmp.execute("system_reset")
    await asyncio.sleep(0.5)
    check(await qget("size") == 0, "size 0 after system_reset")
    check(qt.memread(base, 16) == bytes(16), "memory zeroed after reset")
    check(await qget("stats") == [] and await qget("stats-generation") == gen + 1,
          "stats cleared after reset, stats-generation counts it")
    check(proc.poll() is None, "QEMU still running")
    await stop(proc, qmp)


asyncio.run(main())
