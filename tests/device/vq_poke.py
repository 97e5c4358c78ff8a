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
import socket
import struct
import subprocess
import tempfile
import time

from checks import check, finish, qemu_binary, stop
from qemu.qmp import QMPClient

from czone import hostmem

QEMU = qemu_binary()
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

REQ_PLUG, REQ_UNPLUG, REQ_UNPLUG_ALL, REQ_DISCARD, REQ_STATE = range(5)
ACK, NACK, BUSY, ERROR = range(4)
RESP = {ACK: "ACK", NACK: "NACK", BUSY: "BUSY", ERROR: "ERROR"}
ST_PLUGGED, ST_UNPLUGGED, ST_MIXED = range(3)

BAR = 0xC0000000          # where we map the modern memory BAR (BAR4)
RING = [0x01000000, 0x01100000]   # ring memory in guest RAM, per queue
BUF = 0x01200000          # request/response buffers
QSIZE = 16



class QTest:
    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX)
        for _ in range(100):
            try:
                self.s.connect(path)
                break
            except OSError:
                time.sleep(0.1)
        self.f = self.s.makefile("rw")

    def cmd(self, line):
        self.f.write(line + "\n")
        self.f.flush()
        while True:
            r = self.f.readline().strip()
            if r.startswith("IRQ"):
                continue
            if not r.startswith("OK"):
                raise RuntimeError(f"qtest {line!r}: {r!r}")
            return r[3:]

    def outl(self, port, v): self.cmd(f"outl 0x{port:x} 0x{v:x}")
    def inl(self, port): return int(self.cmd(f"inl 0x{port:x}"), 16)

    def r(self, bits, addr):
        return int(self.cmd(f"read{ {8: 'b', 16: 'w', 32: 'l', 64: 'q'}[bits]} 0x{addr:x}"), 16)

    def w(self, bits, addr, v):
        self.cmd(f"write{ {8: 'b', 16: 'w', 32: 'l', 64: 'q'}[bits]} 0x{addr:x} 0x{v:x}")

    def memwrite(self, addr, data):
        self.cmd(f"write 0x{addr:x} {len(data)} 0x{data.hex()}")

    def memread(self, addr, size):
        return bytes.fromhex(self.cmd(f"read 0x{addr:x} {size}")[2:])

    def memset(self, addr, size, val):
        self.cmd(f"memset 0x{addr:x} {size} 0x{val:x}")


class Pci:
    """Type 1 config access on bus 0."""
    def __init__(self, qt, devfn):
        self.qt, self.devfn = qt, devfn

    def _addr(self, reg):
        return 0x80000000 | (self.devfn << 8) | (reg & 0xFC)

    def rd32(self, reg):
        self.qt.outl(0xCF8, self._addr(reg))
        return self.qt.inl(0xCFC)

    def rd8(self, reg):
        return (self.rd32(reg) >> ((reg & 3) * 8)) & 0xFF

    def wr32(self, reg, v):
        self.qt.outl(0xCF8, self._addr(reg))
        self.qt.outl(0xCFC, v)


class VirtioCZone:
    def __init__(self, qt):
        self.qt = qt
        for devfn in range(256):
            p = Pci(qt, devfn)
            if p.rd32(0) == (0x107C << 16) | 0x1AF4:
                self.pci = p
                break
        else:
            raise RuntimeError("virtio-czone PCI function not found")
        p = self.pci
        p.wr32(0x20, BAR)        # BAR4 low (64-bit memory BAR)
        p.wr32(0x24, 0)          # BAR4 high
        p.wr32(0x04, p.rd32(0x04) | 0x6)   # memory space + bus master
        self.caps = {}
        cap = p.rd8(0x34)
        while cap:
            if p.rd8(cap) == 0x09:
                typ, bar = p.rd8(cap + 3), p.rd8(cap + 4)
                off = p.rd32(cap + 8)
                mult = p.rd32(cap + 16) if typ == 2 else 0
                if bar == 4 and typ not in self.caps:
                    self.caps[typ] = (BAR + off, mult)
            cap = p.rd8(cap + 1)
        self.common = self.caps[1][0]
        self.isr = self.caps[3][0]
        self.devcfg = self.caps[4][0]
        self.notify, self.notify_mult = self.caps[2]
        self.avail_idx = [0, 0]
        self.used_idx = [0, 0]

    def status(self):
        return self.qt.r(8, self.common + 20)

    def init(self, want_stats=True):
        qt, c = self.qt, self.common
        qt.w(8, c + 20, 0)
        qt.w(8, c + 20, 1 | 2)
        qt.w(32, c + 0, 0)
        f0 = qt.r(32, c + 4)
        qt.w(32, c + 0, 1)
        f1 = qt.r(32, c + 4)
        self.host_features = f0 | (f1 << 32)
        qt.w(32, c + 8, 0)
        qt.w(32, c + 12, f0 & (1 if want_stats else 0))
        qt.w(32, c + 8, 1)
        qt.w(32, c + 12, 1)      # VIRTIO_F_VERSION_1
        qt.w(8, c + 20, 1 | 2 | 8)
        assert self.status() & 8, "FEATURES_OK refused"
        self.num_queues = qt.r(16, c + 18)
        self.notify_addr = []
        for q in range(self.num_queues):
            base = RING[q]
            qt.memset(base, 0x10000, 0)
            qt.w(16, c + 22, q)
            qt.w(16, c + 24, QSIZE)
            self.notify_addr.append(self.notify +
                                    qt.r(16, c + 30) * self.notify_mult)
            desc, avail, used = base, base + 16 * QSIZE, base + 0x1000
            for off, addr in ((32, desc), (40, avail), (48, used)):
                qt.w(32, c + off, addr & 0xFFFFFFFF)
                qt.w(32, c + off + 4, addr >> 32)
            qt.w(16, c + 28, 1)
            self.avail_idx[q] = self.used_idx[q] = 0
        qt.w(8, c + 20, 1 | 2 | 8 | 4)

    def cfg(self):
        raw = self.qt.memread(self.devcfg, 56)
        k = ("block_size", "node_id", "addr", "region_size",
             "usable_region_size", "plugged_size", "requested_size")
        return dict(zip(k, struct.unpack("<QH6xQQQQQ", raw), strict=True))

    def kick(self, q, descs):
        """descs: list of (addr, len, device_writable). Returns used len or
        None if the buffer was not returned."""
        qt, base = self.qt, RING[q]
        for i, (addr, ln, wr) in enumerate(descs):
            flags = (1 if i + 1 < len(descs) else 0) | (2 if wr else 0)
            qt.memwrite(base + 16 * i,
                        struct.pack("<QIHH", addr, ln, flags, i + 1))
        avail = base + 16 * QSIZE
        qt.w(16, avail + 4 + 2 * (self.avail_idx[q] % QSIZE), 0)
        self.avail_idx[q] += 1
        qt.w(16, avail + 2, self.avail_idx[q] & 0xFFFF)
        self.qt.w(16, self.notify_addr[q], q)
        used = base + 0x1000
        for _ in range(50):
            if qt.r(16, used + 2) != (self.used_idx[q] & 0xFFFF):
                e = used + 4 + 8 * (self.used_idx[q] % QSIZE)
                self.used_idx[q] += 1
                return qt.r(32, e + 4)
            time.sleep(0.01)
        return None

    def req(self, typ, addr=0, size=0, czone=1, out_len=32, in_len=10):
        body = struct.pack("<H6xQQI4x", typ, addr, size, czone)
        body = (body + bytes(64))[:out_len]
        self.qt.memwrite(BUF, body)
        self.qt.memset(BUF + 0x100, 16, 0xFF)
        descs = [(BUF, out_len, False)]
        if in_len:
            descs.append((BUF + 0x100, in_len, True))
        n = self.kick(0, descs)
        if n is None:
            return None
        t, st = struct.unpack("<H6xH", self.qt.memread(BUF + 0x100, 10))
        return t, st, n

    def stats(self, entries, nr=None, buf_len=None):
        data = struct.pack("<II", len(entries) if nr is None else nr, 0)
        for e in entries:
            data += struct.pack("<I4xQQQQ", *e)
        if buf_len is not None:
            data = (data + bytes(buf_len))[:buf_len]
        self.qt.memwrite(BUF + 0x1000, data)
        return self.kick(1, [(BUF + 0x1000, len(data), False)])


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
    expect("PLUG beyond requested_size (64M)",
           dev.req(REQ_PLUG, base + bs, 64 * MiB), NACK)
    expect("PLUG up to requested_size", dev.req(REQ_PLUG, base + bs, 62 * MiB),
           ACK)
    expect("PLUG one more block", dev.req(REQ_PLUG, base + 64 * MiB, bs), NACK)
    check(await qget("size") == 64 * MiB, "size 64M")
    check(dev.cfg()["plugged_size"] == 64 * MiB, "config plugged_size 64M")
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
    n = dev.stats([], nr=0xFFFFFFFF)
    check(n is None and dev.status() & 0x40, "stats nr_czones = 2^32-1")
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
    expect("device works after reset", dev.req(REQ_PLUG, base, bs), ACK)

    # ---- system reset unplugs everything
    qt.memset(base, bs, 0x77)
    await qmp.execute("system_reset")
    await asyncio.sleep(0.5)
    check(await qget("size") == 0, "size 0 after system_reset")
    check(qt.memread(base, 16) == bytes(16), "memory zeroed after reset")
    check(await qget("stats") == [], "stats cleared after reset")
    check(proc.poll() is None, "QEMU still running")
    await stop(proc, qmp)


asyncio.run(main())
