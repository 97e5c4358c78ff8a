#!/usr/bin/env python3
"""virtio-czone-pci behaviour beyond the request matrix, each against a real
QEMU driven by the fake guest driver (fakedrv.py) over qtest:

- S3: suspend (ACPI PM1a_CNT) and system_wakeup keep the plugged blocks and
  their contents; a system_reset, running or suspended, unplugs everything.
- prealloc: with a backend that cannot back the whole region (a file on a
  16 MiB tmpfs, mounted in a private user+mount namespace), a PLUG that
  cannot be backed answers BUSY; without prealloc the same PLUG is ACKed
  and the first touch kills QEMU with SIGBUS.
- hugetlb (only if the host has 8 free 2 MiB huge pages): DISCARD must be
  huge-page aligned, a discarded page goes back to the pool, and with
  prealloc a PLUG beyond the pool answers BUSY; without prealloc, realize
  warns.
- RamDiscardManager: dump-guest-memory (a real RDM user in QEMU) writes
  exactly the plugged blocks of the region.
- Discards disabled: vfio's type1 container calls
  ram_block_uncoordinated_discard_disable(true).  There is no vfio device
  here, so gdb calls that same function in the running QEMU: it must
  succeed (vfio would be accepted), DISCARD then answers NACK and keeps the
  page, PLUG and UNPLUG still work; re-enabled, DISCARD is ACKed again.
- Stats storm: a real vCPU (TCG, a 20-byte firmware loop) keeps refilling
  the stats queue while the device handles it; QMP must keep answering,
  only the newest snapshot is read, and stats-generation counts them.

Usage: vq_harden.py [QEMU_BINARY]   (default: the QEMU `make qemu` built)
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
    BUSY,
    ERROR,
    NACK,
    REQ_DISCARD,
    REQ_PLUG,
    REQ_STATE,
    REQ_UNPLUG,
    ST_PLUGGED,
    KiB,
    MiB,
    Pci,
    QTest,
    VirtioCZone,
)
from qemu.qmp import QMPClient

QEMU = qemu_binary()
PATH = "/machine/peripheral/czdev0"
LPC_DEVFN = 0x1F << 3       # ICH9 LPC/PM function on q35
PMBASE = 0x600
RAM_PATTERN_AT = 0x02000000  # ordinary guest RAM, below the device region


class Machine:
    """One QEMU under qtest with a virtio-czone-pci device, QMP and qtest."""

    def __init__(self, device_opts="", objects=None, extra=None, wrap=None, accel="qtest"):
        self.tmp = tempfile.mkdtemp()
        self.qsock = os.path.join(self.tmp, "qtest.sock")
        self.msock = os.path.join(self.tmp, "qmp.sock")
        objects = objects or ["memory-backend-memfd,id=cz0,size=1G"]
        args = [QEMU, "-M", "q35", "-nodefaults", "-L", "/usr/share/qemu",
                "-L", "/usr/share/seabios", "-accel", accel,
                "-m", "512M,maxmem=4G", "-display", "none", "-serial", "none"]
        for o in objects:
            args += ["-object", o]
        args += ["-device", "virtio-czone-pci,id=czdev0,memdev=cz0,block-size=2M"
                 + device_opts,
                 "-qtest", f"unix:{self.qsock},server=on,wait=off",
                 "-qtest-log", "/dev/null",
                 "-qmp", f"unix:{self.msock},server=on,wait=off"]
        args += extra or []
        self.proc = subprocess.Popen((wrap or []) + args, stderr=subprocess.PIPE, text=True)

    async def start(self):
        await self.start_qmp_qtest()
        self.dev = VirtioCZone(self.qt)
        self.dev.init()
        cfg = self.dev.cfg()
        self.base, self.bs = cfg["addr"], cfg["block_size"]
        return self

    async def start_qmp_qtest(self):
        for _ in range(200):
            if os.path.exists(self.qsock) and os.path.exists(self.msock):
                break
            if self.proc.poll() is not None:
                raise RuntimeError("QEMU exited: " + self.proc.stderr.read())
            time.sleep(0.05)
        self.qmp = QMPClient("harden")
        await self.qmp.connect(self.msock)
        self.qt = QTest(self.qsock)

    async def qget(self, prop):
        return await self.qmp.execute("qom-get", {"path": PATH, "property": prop})

    async def status(self):
        return (await self.qmp.execute("query-status"))["status"]

    async def wait_status(self, want):
        for _ in range(100):
            if await self.status() == want:
                return True
            await asyncio.sleep(0.05)
        return False

    def acpi_enable(self):
        """What firmware does: PMBASE and ACPI enable in the LPC function."""
        lpc = Pci(self.qt, LPC_DEVFN)
        lpc.wr32(0x40, PMBASE | 1)
        lpc.wr32(0x44, 0x80)

    def guest_s3(self):
        """The guest enters S3: SLP_TYP=1 (QEMU's S3 value) with SLP_EN."""
        self.qt.cmd(f"outw 0x{PMBASE + 4:x} 0x{(1 << 10) | (1 << 13):x}")

    async def stop(self):
        await stop(self.proc, self.qmp)


def pattern(tag, n):
    return (tag * (n // len(tag) + 1))[:n]


async def s3_checks():
    m = await Machine(",requested-size=64M").start()
    qt, dev, base, bs = m.qt, m.dev, m.base, m.bs
    r = dev.req(REQ_PLUG, base, 4 * bs)
    check(r is not None and r[0] == ACK, "S3: PLUG 8M")
    pat = pattern(b"czone-s3-", 4 * bs)
    qt.memwrite(base, pat[:64 * 1024])
    qt.memwrite(base + 4 * bs - 64 * 1024, pat[-64 * 1024:])
    ram_pat = pattern(b"ram-", 4096)
    qt.memwrite(RAM_PATTERN_AT, ram_pat)

    m.acpi_enable()
    m.guest_s3()
    check(await m.wait_status("suspended"), "S3: guest suspended")
    await m.qmp.execute("system_wakeup")
    check(await m.wait_status("running"), "S3: woken up")
    check(await m.qget("size") == 8 * MiB,
          f"S3: plugged size kept across wakeup ({await m.qget('size')})")
    check(qt.memread(base, 64 * 1024) == pat[:64 * 1024] and
          qt.memread(base + 4 * bs - 64 * 1024, 64 * 1024) == pat[-64 * 1024:],
          "S3: pattern in plugged memory kept across wakeup")
    check(qt.memread(RAM_PATTERN_AT, 4096) == ram_pat,
          "S3: ordinary RAM kept across wakeup")
    # The wakeup reset the PCI function, as on real hardware: the driver's
    # restore sets it up again and finds its blocks still plugged.
    dev = m.dev = VirtioCZone(qt)
    dev.init()
    check(dev.cfg()["plugged_size"] == 8 * MiB, "S3: config plugged_size 8M after restore")
    r = dev.req(REQ_STATE, base, 4 * bs)
    check(r is not None and r[0] == ACK and r[1] == ST_PLUGGED,
          f"S3: STATE PLUGGED after restore ({r})")

    # A real reset of a suspended machine unplugs everything.  (The wakeup
    # reset the LPC function too: firmware enables ACPI again.)
    m.acpi_enable()
    m.guest_s3()
    check(await m.wait_status("suspended"), "S3: suspended again")
    await m.qmp.execute("system_reset")
    await asyncio.sleep(0.3)
    check(await m.qget("size") == 0, "S3: system_reset while suspended unplugs all")
    check(qt.memread(base, 64) == bytes(64), "S3: ... and zeroes the memory")
    if await m.status() == "suspended":
        await m.qmp.execute("system_wakeup")

    # And so does a reset of a running machine (plugged first, so it can fail).
    dev = m.dev = VirtioCZone(qt)
    dev.init()
    r = dev.req(REQ_PLUG, base, 2 * bs)
    qt.memwrite(base, pat[:4096])
    check(r is not None and r[0] == ACK and await m.qget("size") == 4 * MiB,
          "S3: PLUG 4M after the reset")
    await m.qmp.execute("system_reset")
    await asyncio.sleep(0.3)
    check(await m.qget("size") == 0 and qt.memread(base, 4096) == bytes(4096),
          "S3: system_reset while running unplugs all and zeroes")
    check(m.proc.poll() is None, "S3: QEMU still running")
    await m.stop()


def small_tmpfs():
    """A wrapper that runs QEMU with a 16 MiB tmpfs at the returned path,
    in its own user and mount namespace (no change to the host's mounts),
    with core dumps off (one check makes QEMU die of SIGBUS)."""
    mnt = tempfile.mkdtemp()
    wrap = ["unshare", "-rm", "sh", "-c",
            f"ulimit -c 0; mount -t tmpfs -o size=16m czt {mnt} && exec \"$@\"", "sh"]
    ok = subprocess.run(wrap + ["true"], capture_output=True).returncode == 0
    return (wrap, mnt) if ok else (None, None)


async def prealloc_checks():
    wrap, mnt = small_tmpfs()
    if wrap is None:
        print("SKIP prealloc: cannot mount a tmpfs in a user namespace here")
        return
    backend = [f"memory-backend-file,id=cz0,size=64M,mem-path={mnt}/cz,share=on"]

    m = await Machine(",requested-size=64M,prealloc=on", objects=backend,
                      wrap=wrap).start()
    dev, base, bs = m.dev, m.base, m.bs
    r = dev.req(REQ_PLUG, base, 4 * bs)
    check(r is not None and r[0] == ACK, f"prealloc: PLUG 8M of a 16M tmpfs: {r}")
    r = dev.req(REQ_PLUG, base + 4 * bs, 8 * bs)
    check(r is not None and r[0] == BUSY and await m.qget("size") == 8 * MiB,
          f"prealloc: PLUG 16M more cannot be backed: BUSY, size stays 8M ({r})")
    pat = pattern(b"prealloc-", 4 * bs)
    m.qt.memwrite(base, pat)
    check(m.qt.memread(base, 4 * bs) == pat, "prealloc: plugged memory usable")
    r = dev.req(REQ_DISCARD, base, 4 * KiB)
    check(r is not None and r[0] == NACK and m.qt.memread(base, 16) == pat[:16],
          f"prealloc: DISCARD answers NACK, page kept ({r})")
    r = dev.req(REQ_UNPLUG, base, 4 * bs)
    r2 = dev.req(REQ_PLUG, base + 4 * bs, 6 * bs)
    check(r and r[0] == ACK and r2 and r2[0] == ACK and await m.qget("size") == 12 * MiB,
          f"prealloc: after UNPLUG 8M, PLUG 12M fits again ({r}, {r2})")
    m.qt.memset(base + 4 * bs, 6 * bs, 0x11)
    check(m.proc.poll() is None, "prealloc: QEMU alive after touching all it plugged")
    await m.stop()

    # The same without prealloc: the plug is ACKed and the touch is fatal.
    m = await Machine(",requested-size=64M", objects=backend, wrap=wrap).start()
    r = m.dev.req(REQ_PLUG, m.base, 12 * m.bs)
    check(r is not None and r[0] == ACK, f"no prealloc: PLUG 24M of a 16M tmpfs ACKed ({r})")
    try:
        m.qt.memset(m.base, 12 * m.bs, 0x22)
    except (RuntimeError, OSError):
        pass
    m.proc.wait(timeout=30)
    check(m.proc.returncode == -7 or m.proc.returncode == 128 + 7,
          f"no prealloc: the first touch beyond 16M kills QEMU (rc {m.proc.returncode})")
    subprocess.run(["rmdir", mnt])


def free_hugepages():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("HugePages_Free:"):
                return int(line.split()[1])
    return 0


NR_HUGEPAGES = "/proc/sys/vm/nr_hugepages"


async def hugetlb_checks():
    """The 2 MiB pool is grown by what the checks need, as root, and put back."""
    try:
        with open(NR_HUGEPAGES) as f:
            pool = int(f.read())
        with open(NR_HUGEPAGES, "w") as f:
            f.write(str(pool + max(0, 8 - free_hugepages())))
    except OSError as e:
        print(f"SKIP hugetlb: cannot grow the huge page pool: {e}")
        return
    try:
        await _hugetlb_checks()
    finally:
        with open(NR_HUGEPAGES, "w") as f:
            f.write(str(pool))


async def _hugetlb_checks():
    if free_hugepages() < 8 or not os.path.exists("/sys/kernel/mm/hugepages/hugepages-2048kB"):
        print("SKIP hugetlb: fewer than 8 free 2 MiB huge pages on this host")
        return
    backend = ["memory-backend-memfd,id=cz0,size=64M,hugetlb=on,hugetlbsize=2M,reserve=off"]
    free0 = free_hugepages()
    m = await Machine(",requested-size=64M", objects=backend).start()
    dev, base = m.dev, m.base
    check(dev.cfg()["discard_alignment"] == 2 * MiB,
          f"hugetlb: config discard_alignment is the huge page size ({dev.cfg()})")
    r = dev.req(REQ_PLUG, base, 4 * MiB)
    m.qt.memset(base, 4 * MiB, 0x33)
    check(r and r[0] == ACK and free_hugepages() == free0 - 2,
          f"hugetlb: PLUG 4M and touch it takes 2 huge pages ({free0} -> {free_hugepages()})")
    r = dev.req(REQ_DISCARD, base, 4 * KiB)
    check(r and r[0] == ERROR, f"hugetlb: DISCARD of 4K is misaligned: ERROR ({r})")
    r = dev.req(REQ_DISCARD, base + 2 * MiB, 2 * MiB)
    free2 = free_hugepages()
    check(r and r[0] == ACK and free2 == free0 - 1 and
          m.qt.memread(base + 2 * MiB, 16) == bytes(16) and m.qt.memread(base, 1) == b"\x33",
          f"hugetlb: DISCARD of one huge page returns it to the pool ({free2})")
    await m.stop()
    err = m.proc.stderr.read()
    check("SIGBUS" in err, f"hugetlb: realize warns without prealloc: {err.strip()!r}")

    m = await Machine(",requested-size=64M,prealloc=on", objects=backend).start()
    dev, base = m.dev, m.base
    free1 = free_hugepages()
    r = dev.req(REQ_PLUG, base, (free1 + 2) * 2 * MiB)
    check(r and r[0] == BUSY and free_hugepages() == free1 and await m.qget("size") == 0,
          f"hugetlb prealloc: PLUG beyond the pool is BUSY and takes nothing ({r})")
    r = dev.req(REQ_PLUG, base, 4 * MiB)
    check(r and r[0] == ACK and free_hugepages() == free1 - 2,
          f"hugetlb prealloc: PLUG 4M takes 2 huge pages at once ({free_hugepages()})")
    await m.stop()


def elf_loads(path):
    """(paddr, size) of each PT_LOAD of an ELF64 core."""
    with open(path, "rb") as f:
        data = f.read(1 << 20)
    phoff, = struct.unpack_from("<Q", data, 32)
    phentsize, phnum = struct.unpack_from("<HH", data, 54)
    out = []
    for i in range(phnum):
        p_type, _, _, _, paddr, filesz, _, _ = struct.unpack_from(
            "<IIQQQQQQ", data, phoff + i * phentsize)
        if p_type == 1:
            out.append((paddr, filesz))
    return out


async def rdm_checks():
    m = await Machine(",requested-size=64M",
                      objects=["memory-backend-memfd,id=cz0,size=64M"]).start()
    dev, base, bs = m.dev, m.base, m.bs
    for off, n in ((0, 1), (4, 2)):
        r = dev.req(REQ_PLUG, base + off * bs, n * bs)
        check(r and r[0] == ACK, f"rdm: PLUG {n} block(s) at block {off}")
    path = os.path.join(m.tmp, "dump.elf")
    await m.qmp.execute("dump-guest-memory", {"paging": False, "protocol": f"file:{path}"})
    loads = [(a - base, n) for a, n in elf_loads(path) if base <= a < base + 64 * MiB]
    check(loads == [(0, bs), (4 * bs, 2 * bs)],
          f"rdm: the dump holds exactly the plugged blocks of the region: {loads}")
    await m.stop()


def gdb_call(pid, expr):
    """Call a function in the running QEMU; returns its int result."""
    p = subprocess.run(["gdb", "-p", str(pid), "-batch", "-nx",
                        "-ex", f"print (int){expr}"],
                       capture_output=True, text=True, timeout=120)
    for line in p.stdout.splitlines():
        if line.startswith("$1 = "):
            return int(line[5:])
    raise RuntimeError(f"gdb {expr}: {p.stdout[-500:]} {p.stderr[-500:]}")


async def discard_disabled_checks():
    if subprocess.run(["sh", "-c", "command -v gdb"], capture_output=True).returncode:
        print("SKIP discards disabled: no gdb")
        return
    m = await Machine(",requested-size=64M").start()
    dev, qt, base, bs = m.dev, m.qt, m.base, m.bs
    r = dev.req(REQ_PLUG, base, 2 * bs)
    pat = pattern(b"keep-me-", 8 * KiB)
    qt.memwrite(base, pat)
    check(r and r[0] == ACK, "discards disabled: PLUG 4M")
    rc = gdb_call(m.proc.pid, "ram_block_uncoordinated_discard_disable(1)")
    check(rc == 0, f"discards disabled: vfio's discard disable succeeds with the device ({rc})")
    if rc == 0:
        r = dev.req(REQ_DISCARD, base, 8 * KiB)
        check(r and r[0] == NACK and qt.memread(base, 8 * KiB) == pat,
              f"discards disabled: DISCARD answers NACK and the pages keep their data ({r})")
        r = dev.req(REQ_PLUG, base + 2 * bs, bs)
        r2 = dev.req(REQ_UNPLUG, base + 2 * bs, bs)
        check(r and r[0] == ACK and r2 and r2[0] == ACK,
              f"discards disabled: PLUG and UNPLUG still work ({r}, {r2})")
        rc = gdb_call(m.proc.pid, "ram_block_uncoordinated_discard_disable(0)")
        r = dev.req(REQ_DISCARD, base, 8 * KiB)
        check(rc == 0 and r and r[0] == ACK and qt.memread(base, 16) == bytes(16),
              f"discards enabled again: DISCARD ACKed and the pages zeroed ({r})")
    check(m.proc.poll() is None, "discards disabled: QEMU still running")
    await m.stop()


STATS_RING = 0x80000     # below 1 MiB: the real-mode loop can reach it
STATS_BUF = 0x90000


def storm_rom(path):
    """A 64 KiB BIOS: at reset, loop forever setting the stats queue's
    avail->idx to used->idx + 8 (a 16-entry ring at STATS_RING; every
    avail slot names descriptor 0), i.e. refill as fast as the device
    consumes."""
    seg = STATS_RING >> 4
    code = bytes([0xFA,                                   # cli
                  0xB0, 0xFF, 0xE6, 0x21, 0xE6, 0xA1,     # mask both PICs: no
                  # pending timer interrupt makes the vCPU take the BQL
                  0xB8, seg & 0xFF, seg >> 8,             # mov ax, seg
                  0x8E, 0xC0,                             # mov es, ax
                  0x26, 0xA1, 0x02, 0x10,                 # loop: mov ax, es:[0x1002]
                  0x05, 0x08, 0x00,                       # add ax, 8
                  0x26, 0xA3, 0x02, 0x01,                 # mov es:[0x0102], ax
                  0xEB, 0xF3])                            # jmp loop
    rom = bytearray(64 * 1024)
    rom[:len(code)] = code
    rom[0xFFF0:0xFFF5] = bytes([0xEA, 0x00, 0x00, 0x00, 0xF0])   # jmp F000:0000
    with open(path, "wb") as f:
        f.write(rom)


async def storm_checks():
    tmp = tempfile.mkdtemp()
    rom = os.path.join(tmp, "storm.rom")
    storm_rom(rom)
    m = Machine(",requested-size=64M",
                extra=["-bios", rom, "-S"], accel="tcg")
    await m.start_qmp_qtest()
    qt = m.qt
    dev = m.dev = VirtioCZone(qt, rings=[0x01000000, STATS_RING])
    dev.init()
    entries = 256                      # what the driver sends at most
    body = struct.pack("<II", entries, 0) + b"".join(
        struct.pack("<I4xQQQQ", i, i, 2 * i, 3 * i, 4 * i) for i in range(entries))
    qt.memwrite(STATS_BUF, body)
    qt.memwrite(STATS_RING, struct.pack("<QIHH", STATS_BUF, len(body), 0, 0))
    # VRING_AVAIL_F_NO_INTERRUPT: an interrupt would make the vCPU stop for
    # the BQL at every block; the loop must run alongside the device.
    qt.w(16, STATS_RING + 16 * 16, 1)
    await m.qmp.execute("cont")
    # Kick every 20 ms from the main loop's side (as an ioeventfd would),
    # without waiting for qtest's answers: a handler that loops for as long
    # as the guest refills never returns.
    kicks, worst, gens = 0, 0.0, []
    try:
        t_end = time.monotonic() + 2.0
        while time.monotonic() < t_end:
            qt.f.write(f"writew 0x{dev.notify_addr[1]:x} 0x1\n")
            qt.f.flush()
            kicks += 1
            t = time.monotonic()
            gens.append(await asyncio.wait_for(m.qget("stats-generation"), 5))
            worst = max(worst, time.monotonic() - t)
            await asyncio.sleep(0.02)
    except TimeoutError:
        worst = float("inf")
    check(worst < 1.0, f"storm: QMP answers during a stats storm ({kicks} kicks,"
          f" worst {worst:.3f} s)")
    check(len(gens) > 10 and gens[-1] >= gens[0] + 10,
          f"storm: stats-generation counts snapshots ({gens[:1]} .. {gens[-1:]})")
    if worst == float("inf"):
        m.proc.kill()
        m.proc.wait()
        return
    await m.qmp.execute("stop")
    for _ in range(kicks):              # the answers to the kicks
        while not qt.f.readline().startswith("OK"):
            pass
    st = await m.qget("stats")
    check(len(st) == entries and st[5] == {"czone": 5, "used": 5, "free": 10,
                                           "backed": 15, "plugged": 20},
          f"storm: the snapshot is the driver's ({len(st)} entries)")
    check(not dev.status() & 0x40, "storm: device not broken")
    await m.stop()


async def publish_and_kick(dev, q, n):
    """Make the first ``n`` ring entries of queue ``q`` available at once, kick
    once, and return how many buffers the device has returned within 5 s."""
    qt, ring = dev.qt, dev.rings[q]
    qt.w(16, ring + 16 * dev.qsize + 2, n)
    qt.w(16, dev.notify_addr[q], q)
    for _ in range(100):
        if qt.r(16, ring + 0x1000 + 2) == n:
            break
        await asyncio.sleep(0.05)
    return qt.r(16, ring + 0x1000 + 2)


async def batch_checks():
    """A queue full of stats buffers is handled 16 at a time, the rest from
    a bottom half: the main loop runs between batches.  Seen from outside,
    each batch keeps its newest snapshot, so 64 buffers and one kick make
    four snapshots; a handler that drains the queue in one go makes one."""
    m = Machine(",requested-size=64M")
    await m.start_qmp_qtest()
    qt, n = m.qt, 64
    dev = m.dev = VirtioCZone(qt, qsize=128)
    dev.init()
    ring = dev.rings[1]
    avail = ring + 16 * dev.qsize
    for i in range(n):
        buf = STATS_BUF + 64 * i
        qt.memwrite(buf, struct.pack("<II", 1, 0) + struct.pack("<I4xQQQQ", i, i, 0, 0, 0))
        qt.memwrite(ring + 16 * i, struct.pack("<QIHH", buf, 48, 0, 0))
        qt.w(16, avail + 4 + 2 * i, i)
    gen0 = await m.qget("stats-generation")
    check(await publish_and_kick(dev, 1, n) == n, f"batch: all {n} buffers returned")
    snapshots = await m.qget("stats-generation") - gen0
    check(snapshots == n // 16, f"batch: {n} buffers after one kick make {snapshots} "
          f"snapshots, one per batch of 16 (the main loop ran between batches)")
    st = await m.qget("stats")
    check([s["czone"] for s in st] == [n - 1], f"batch: the newest snapshot wins ({st})")
    # The request queue is bounded the same way: 64 requests, one kick,
    # all answered, 16 per run of the bottom half (patch 14: the handler only schedules it).
    ring, reqs = dev.rings[0], STATS_BUF + 0x10000
    avail = ring + 16 * dev.qsize
    for i in range(n):
        buf = reqs + 64 * i
        qt.memwrite(buf, struct.pack("<H6xQQI4x", REQ_STATE, m_base(dev), 2 * MiB, 0))
        qt.memwrite(ring + 32 * i, struct.pack("<QIHH", buf, 32, 1, 2 * i + 1)
                    + struct.pack("<QIHH", buf + 32, 16, 2, 0))
        qt.w(16, avail + 4 + 2 * i, 2 * i)
    returned = await publish_and_kick(dev, 0, n)
    answers = [struct.unpack("<H", qt.memread(reqs + 64 * i + 32, 2))[0] for i in range(n)]
    check(returned == n and answers == [ACK] * n,
          f"batch: {n} requests after one kick all answered ({returned})")
    check(not dev.status() & 0x40, "batch: device not broken")
    await m.stop()


async def reclaim_checks():
    """The host's reclaim request reaches the config space; the guest's
    report becomes one CZONE_RECLAIMED event per request, never replayed."""
    m = Machine(",requested-size=64M")
    await m.start_qmp_qtest()
    dev = m.dev = VirtioCZone(m.qt)
    dev.init(host_reclaim=True)
    await m.qmp.execute("qom-set", {"path": PATH, "property": "reclaim",
                                    "value": {"idle-ms": 5000}})
    cfg = dev.cfg()
    check((cfg["reclaim_seq"], cfg["reclaim_czone"], cfg["reclaim_idle_ms"]) == (1, 0, 5000),
          f"reclaim: the request is in the config space ({cfg})")
    check(dev.req(5, 2, 0)[0] == ERROR, "reclaim: a report for a request never made: ERROR")
    r = dev.req(5, 1, 3 * MiB, czone=2)
    check(r[0] == ACK, "reclaim: the report of request 1: ACK")
    ev = await asyncio.wait_for(m.qmp.events.get(), 5)
    while ev["event"] != "CZONE_RECLAIMED":
        ev = await asyncio.wait_for(m.qmp.events.get(), 5)
    check(ev["data"]["seq"] == 1 and ev["data"]["bytes"] == 3 * MiB
          and ev["data"]["czones"] == 2 and ev["data"]["id"] == "czdev0",
          f"reclaim: CZONE_RECLAIMED {ev['data']}")
    check(dev.req(5, 1, 3 * MiB)[0] == ERROR, "reclaim: the same report again: ERROR")
    await m.stop()


def m_base(dev):
    return dev.cfg()["addr"]


ONLY = os.environ.get("VQ_ONLY")     # e.g. VQ_ONLY=storm: run one group
for group in (s3_checks, prealloc_checks, hugetlb_checks, rdm_checks,
              discard_disabled_checks, batch_checks, reclaim_checks, storm_checks):
    if not ONLY or group.__name__.startswith(ONLY):
        asyncio.run(group())
finish()
