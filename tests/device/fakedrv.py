"""The fake guest driver of the device scripts: qtest protocol, PCI config
access, virtio-pci modern setup and split rings in guest RAM.

The scripts run QEMU with -accel qtest and drive virtio-czone-pci through
these classes; nothing here stands in for QEMU.
"""
import socket
import struct
import time

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
    def __init__(self, qt, rings=None, qsize=QSIZE):
        self.qt = qt
        self.qsize = qsize
        self.rings = rings or RING
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

    def init(self, want_stats=True, host_reclaim=False):
        qt, c = self.qt, self.common
        qt.w(8, c + 20, 0)
        qt.w(8, c + 20, 1 | 2)
        qt.w(32, c + 0, 0)
        f0 = qt.r(32, c + 4)
        qt.w(32, c + 0, 1)
        f1 = qt.r(32, c + 4)
        self.host_features = f0 | (f1 << 32)
        qt.w(32, c + 8, 0)
        qt.w(32, c + 12, f0 & ((1 if want_stats else 0) | (2 if host_reclaim else 0)))
        qt.w(32, c + 8, 1)
        qt.w(32, c + 12, 1)      # VIRTIO_F_VERSION_1
        qt.w(8, c + 20, 1 | 2 | 8)
        assert self.status() & 8, "FEATURES_OK refused"
        self.num_queues = qt.r(16, c + 18)
        self.notify_addr = []
        for q in range(self.num_queues):
            base = self.rings[q]
            qt.memset(base, 0x10000, 0)
            qt.w(16, c + 22, q)
            qt.w(16, c + 24, self.qsize)
            self.notify_addr.append(self.notify +
                                    qt.r(16, c + 30) * self.notify_mult)
            desc, avail, used = base, base + 16 * self.qsize, base + 0x1000
            for off, addr in ((32, desc), (40, avail), (48, used)):
                qt.w(32, c + off, addr & 0xFFFFFFFF)
                qt.w(32, c + off + 4, addr >> 32)
            qt.w(16, c + 28, 1)
            self.avail_idx[q] = self.used_idx[q] = 0
        qt.w(8, c + 20, 1 | 2 | 8 | 4)

    def cfg(self):
        raw = self.qt.memread(self.devcfg, 80)
        k = ("block_size", "node_id", "addr", "region_size",
             "usable_region_size", "plugged_size", "requested_size",
             "reclaim_seq", "reclaim_czone", "reclaim_idle_ms", "discard_alignment")
        return dict(zip(k, struct.unpack("<QH6xQQQQQQIIQ", raw), strict=True))

    def kick(self, q, descs):
        """descs: list of (addr, len, device_writable). Returns used len or
        None if the buffer was not returned."""
        qt, base = self.qt, self.rings[q]
        for i, (addr, ln, wr) in enumerate(descs):
            flags = (1 if i + 1 < len(descs) else 0) | (2 if wr else 0)
            qt.memwrite(base + 16 * i,
                        struct.pack("<QIHH", addr, ln, flags, i + 1))
        avail = base + 16 * self.qsize
        qt.w(16, avail + 4 + 2 * (self.avail_idx[q] % self.qsize), 0)
        self.avail_idx[q] += 1
        qt.w(16, avail + 2, self.avail_idx[q] & 0xFFFF)
        self.qt.w(16, self.notify_addr[q], q)
        used = base + 0x1000
        for _ in range(50):
            if qt.r(16, used + 2) != (self.used_idx[q] & 0xFFFF):
                e = used + 4 + 8 * (self.used_idx[q] % self.qsize)
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
