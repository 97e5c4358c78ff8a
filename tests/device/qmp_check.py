#!/usr/bin/env python3
"""QMP checks for virtio-czone-pci (no guest driver needed).

Usage: qmp_check.py [QEMU_BINARY]   (default: the QEMU `make qemu` built)
Starts QEMU itself, runs the checks, prints PASS/FAIL lines, exits non-zero
on any failure.
"""
import asyncio
import os
import subprocess
import tempfile
import time

from checks import check, finish, qemu_binary, stop
from qemu.qmp import ExecuteError, QMPClient

QEMU = qemu_binary()
MiB = 1 << 20
GiB = 1 << 30
BASE = ["-M", "q35", "-nodefaults", "-L", "/usr/share/qemu",
        "-L", "/usr/share/seabios", "-accel", "tcg",
        "-m", "512M,maxmem=4G", "-display", "none", "-serial", "none"]


def bad_cmdline(extra, expect, what):
    """QEMU must refuse to start, with @expect in its message."""
    try:
        p = subprocess.run([QEMU] + BASE + ["-S"] + extra, capture_output=True,
                           text=True, timeout=30)
    except subprocess.TimeoutExpired:
        check(False, f"{what}: QEMU started (still running after 30 s)")
        return
    msg = p.stderr.strip().splitlines()
    msg = msg[-1] if msg else ""
    check(p.returncode != 0 and expect in msg,
          f"{what}: rc={p.returncode} msg={msg!r}")


async def qmp_checks():
    sock = os.path.join(tempfile.mkdtemp(), "qmp.sock")
    args = [QEMU] + BASE + [
        "-object", "memory-backend-memfd,id=cz0,size=1G",
        "-device", "virtio-czone-pci,id=czdev0,memdev=cz0,block-size=2M,"
                   "requested-size=0",
        "-qmp", f"unix:{sock},server=on,wait=off"]
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True)
    for _ in range(100):
        if os.path.exists(sock):
            break
        time.sleep(0.1)
    qmp = QMPClient("qdev")
    await qmp.connect(sock)
    try:
        devs = await qmp.execute("query-memory-devices")
        print("query-memory-devices:", devs)
        cz = [d for d in devs if d["type"] == "virtio-czone"]
        check(len(cz) == 1, "query-memory-devices lists one virtio-czone")
        d = cz[0]["data"]
        check(d.get("id") == "czdev0" and d["size"] == 0 and
              d["requested-size"] == 0 and d["max-size"] == GiB and
              d["block-size"] == 2 * MiB and d["node"] == 0 and
              d["memdev"] == "/objects/cz0" and d["memaddr"] != 0,
              f"device info fields {d}")

        path = "/machine/peripheral/czdev0"
        await qmp.execute("qom-set", {"path": path,
                                      "property": "requested-size",
                                      "value": 64 * MiB})
        rs = await qmp.execute("qom-get", {"path": path,
                                           "property": "requested-size"})
        check(rs == 64 * MiB, f"qom-set requested-size 64M -> {rs}")
        devs = await qmp.execute("query-memory-devices")
        check(devs[0]["data"]["requested-size"] == 64 * MiB,
              "query-memory-devices shows requested-size 64M")

        for val, what in ((64 * MiB + 4096, "misaligned"),
                          (2 * GiB, "too large")):
            try:
                await qmp.execute("qom-set", {"path": path,
                                              "property": "requested-size",
                                              "value": val})
                check(False, f"qom-set {what} requested-size refused")
            except ExecuteError as e:
                check(True, f"qom-set {what} requested-size refused: {e}")
        rs = await qmp.execute("qom-get", {"path": path,
                                           "property": "requested-size"})
        check(rs == 64 * MiB, "requested-size unchanged after refusals")

        try:
            await qmp.execute("qom-set", {"path": path, "property": "size",
                                          "value": 0})
            check(False, "size is read-only")
        except ExecuteError as e:
            check(True, f"size is read-only: {e}")
        try:
            await qmp.execute("qom-set", {"path": path,
                                          "property": "block-size",
                                          "value": 4 * MiB})
            check(False, "block-size fixed after realize")
        except ExecuteError as e:
            check(True, f"block-size fixed after realize: {e}")
        # No guest driver here: a reclaim request would never be answered.
        try:
            await qmp.execute("qom-set", {"path": path, "property": "reclaim",
                                          "value": {"czone": 1}})
            check(False, "reclaim refused without a driver")
        except ExecuteError as e:
            check("not ready" in str(e), f"reclaim refused without a driver: {e}")
        rec = await qmp.execute("qom-get", {"path": path, "property": "reclaim"})
        check(rec.get("seq", 0) == 0, f"no reclaim request recorded: {rec}")

        size = await qmp.execute("qom-get", {"path": path, "property": "size"})
        check(size == 0, f"qom-get size -> {size}")
        stats = await qmp.execute("qom-get", {"path": path,
                                              "property": "stats"})
        check(stats == [], f"qom-get stats -> {stats!r}")
        bs = await qmp.execute("qom-get", {"path": path,
                                           "property": "block-size"})
        check(bs == 2 * MiB, f"qom-get block-size -> {bs}")

        st = await qmp.execute("x-query-virtio-status",
                               {"path": path + "/virtio-backend"})
        check(st["device-id"] == 60 and st["name"] == "virtio-czone",
              f"x-query-virtio-status name={st['name']} "
              f"id={st['device-id']} "
              f"features={st['host-features']['dev-features']}")
        caps = await qmp.execute("query-migrate-capabilities")
        check(isinstance(caps, list), "query-migrate-capabilities answers")

        # (system_reset's unplug-all is checked by vq_poke.py and vq_harden.py,
        # after plugging: here nothing was plugged, so size 0 proves nothing.)
        hmp = await qmp.execute("human-monitor-command",
                                {"command-line": "info memory-devices"})
        check("virtio-czone" in hmp, "HMP info memory-devices:\n" + hmp)
        hmp = await qmp.execute("human-monitor-command",
                                {"command-line": "info numa"})
        check("node 0" in hmp, "HMP info numa:\n" + hmp)
        await qmp.execute("quit")
    finally:
        try:
            await qmp.disconnect()
        except EOFError:
            pass
        proc.wait(timeout=30)
        err = proc.stderr.read()
        if err:
            print("qemu stderr:", err)


async def start(extra):
    sock = os.path.join(tempfile.mkdtemp(), "qmp.sock")
    proc = subprocess.Popen([QEMU] + BASE + ["-S"] + extra +
                            ["-qmp", f"unix:{sock},server=on,wait=off"],
                            stderr=subprocess.PIPE, text=True)
    for _ in range(100):
        if os.path.exists(sock) or proc.poll() is not None:
            break
        time.sleep(0.1)
    qmp = QMPClient("qdev")
    await qmp.connect(sock)
    return proc, qmp


async def backend_checks():
    """Other backends than memfd: anonymous RAM and a file."""
    shm = tempfile.mkdtemp(dir="/dev/shm")
    for what, obj in (
            ("memory-backend-ram",
             "memory-backend-ram,id=cz0,size=256M"),
            ("memory-backend-file (tmpfs, share=on)",
             f"memory-backend-file,id=cz0,size=256M,mem-path={shm}/cz,"
             "share=on"),
            ("memory-backend-memfd share=off",
             "memory-backend-memfd,id=cz0,size=256M,share=off")):
        proc, qmp = await start(["-object", obj, "-device",
                                 "virtio-czone-pci,id=cz,memdev=cz0,"
                                 "block-size=4M,requested-size=8M"])
        devs = await qmp.execute("query-memory-devices")
        d = devs[0]["data"]
        check(d["max-size"] == 256 << 20 and d["block-size"] == 4 << 20 and
              d["requested-size"] == 8 << 20, f"{what}: {d}")
        await stop(proc, qmp)
    subprocess.run(["rm", "-rf", shm])


async def hotplug_checks():
    """device_add on a PCIe root port works; device_del is refused."""
    proc, qmp = await start([
        "-object", "memory-backend-memfd,id=cz0,size=512M",
        "-object", "memory-backend-memfd,id=cz1,size=512M",
        "-device", "virtio-czone-pci,id=czA,memdev=cz0",
        "-device", "pcie-root-port,id=rp0,chassis=1"])
    await qmp.execute("cont")
    await qmp.execute("device_add", {"driver": "virtio-czone-pci",
                                     "id": "czB", "memdev": "cz1",
                                     "bus": "rp0",
                                     "requested-size": 32 << 20})
    devs = await qmp.execute("query-memory-devices")
    ids = sorted(d["data"]["id"] for d in devs)
    addrs = sorted(d["data"]["memaddr"] for d in devs)
    check(ids == ["czA", "czB"] and addrs[1] >= addrs[0] + (512 << 20),
          f"hotplugged second device: {[d['data'] for d in devs]}")
    try:
        await qmp.execute("device_add", {"driver": "virtio-czone-pci",
                                         "id": "czC", "memdev": "cz1",
                                         "bus": "rp0"})
        check(False, "hotplug with busy memdev refused")
    except ExecuteError as e:
        check("busy" in str(e), f"hotplug with busy memdev refused: {e}")
    try:
        await qmp.execute("device_del", {"id": "czB"})
        check(False, "device_del refused")
    except ExecuteError as e:
        check(True, f"device_del refused: {e}")
    st = await qmp.execute("human-monitor-command",
                           {"command-line": "qom-get czA stats"})
    check("".join(st.split()) == "[]", f"HMP qom-get stats: {st!r}")
    await stop(proc, qmp)


async def stats_vq_off_check():
    proc, qmp = await start([
        "-object", "memory-backend-memfd,id=cz0,size=256M",
        "-device", "virtio-czone-pci,id=cz,memdev=cz0,stats-vq=off"])
    st = await qmp.execute("x-query-virtio-status",
                           {"path": "/machine/peripheral/cz/virtio-backend"})
    check(st["num-vqs"] == 1 and
          not any("STATS_VQ" in f for f in st["host-features"]["dev-features"]) and
          any("HOST_RECLAIM" in f for f in st["host-features"]["dev-features"]),
          f"stats-vq=off: num-vqs={st['num-vqs']} "
          f"dev-features={st['host-features']['dev-features']}")
    await stop(proc, qmp)


async def migration_ended(qmp):
    """Poll query-migrate (no events asked for) until it has ended."""
    for _ in range(300):
        st = await qmp.execute("query-migrate")
        if st.get("status") in ("completed", "failed", "cancelled"):
            break
        await asyncio.sleep(0.1)
    return st


async def wait_migrated(qmp, what):
    st = await migration_ended(qmp)
    check(st.get("status") == "completed", f"{what}: {st}")
    return st


async def refused_with_return_path():
    """As czonectl migrates (return-path on both sides): a destination that
    refuses the device state fails the migration on the source, which runs on."""
    sock = os.path.join(tempfile.mkdtemp(), "mig.sock")
    caps = {"capabilities": [{"capability": "return-path", "state": True}]}
    dproc, dqmp = await start(czone_args(block="4M") + ["-incoming", "defer"])
    await dqmp.execute("migrate-set-capabilities", caps)
    await dqmp.execute("migrate-incoming", {"uri": f"unix:{sock}"})
    sproc, sqmp = await start(czone_args())
    await sqmp.execute("cont")
    await sqmp.execute("migrate-set-capabilities", caps)
    await sqmp.execute("migrate", {"uri": f"unix:{sock}"})
    st = await migration_ended(sqmp)
    try:
        rc = dproc.wait(30)
    except subprocess.TimeoutExpired:
        rc = None
    for _ in range(50):
        run = (await sqmp.execute("query-status"))["status"]
        if run == "running":
            break
        await asyncio.sleep(0.1)
    check(st.get("status") == "failed" and rc not in (0, None) and run == "running",
          f"refused with return-path: source migration {st.get('status')}, "
          f"source {run}, destination exited {rc}")
    await stop(sproc, sqmp)
    if dproc.poll() is None:
        dproc.kill()
        dproc.wait()


def load_refused(extra, state, expect, what):
    """A destination whose device does not match the saved one must refuse
    the state, saying why, and exit."""
    try:
        p = subprocess.run([QEMU] + BASE + ["-S"] + extra +
                           ["-incoming", f"exec:cat {state}"],
                           capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        check(False, f"{what}: the destination still runs after 60 s")
        return
    err = p.stderr.strip()
    check(p.returncode != 0 and expect in err, f"{what}: rc={p.returncode} {err!r}")


def czone_args(size="1G", block="2M", extra=""):
    return ["-object", f"memory-backend-memfd,id=cz0,size={size}",
            "-device", f"virtio-czone-pci,id=czdev0,memdev=cz0,block-size={block},"
                       f"requested-size=0{extra}"]


async def migration_checks():
    """The device migrates (no blocker), its state arrives, and a destination
    with another geometry refuses the state."""
    state = os.path.join(tempfile.mkdtemp(), "state")
    proc, qmp = await start(czone_args())
    path = "/machine/peripheral/czdev0"
    await qmp.execute("qom-set", {"path": path, "property": "requested-size",
                                  "value": 64 * MiB})
    await qmp.execute("migrate", {"uri": f"exec:cat > {state}"})
    await wait_migrated(qmp, "migration of a VM with virtio-czone")
    await stop(proc, qmp)

    proc, qmp = await start(czone_args() + ["-incoming", f"exec:cat {state}"])
    await wait_migrated(qmp, "the same device loads the state")
    rs = await qmp.execute("qom-get", {"path": path,
                                       "property": "requested-size"})
    check(rs == 64 * MiB, f"requested-size migrated (argv says 0): {rs}")
    await stop(proc, qmp)

    proc, qmp = await start(czone_args() + ["-only-migratable"])
    devs = await qmp.execute("query-memory-devices")
    check(proc.poll() is None and len(devs) == 1,
          "-only-migratable accepts the device")
    await stop(proc, qmp)

    load_refused(czone_args(block="4M"), state,
                 "'block-size' changed from 0x200000 to 0x400000",
                 "another block size refused")
    load_refused(czone_args(extra=",memaddr=0x140000000"), state,
                 "'memaddr' changed from 0x100000000 to 0x140000000",
                 "another region address refused")
    await refused_with_return_path()
    # The RAM section comes first and catches a region of another size.
    load_refused(czone_args(size="2G"), state,
                 "Size mismatch: 0000:00:01.0/cz0: 0x40000000 != 0x80000000",
                 "another region size refused")


asyncio.run(qmp_checks())
asyncio.run(migration_checks())
asyncio.run(stats_vq_off_check())
asyncio.run(backend_checks())
asyncio.run(hotplug_checks())

MEMFD = ["-object", "memory-backend-memfd,id=cz0,size=1G"]
bad_cmdline(MEMFD + ["-device", "virtio-czone-pci,memdev=cz0,block-size=3M"],
            "power of two", "block-size 3M")
bad_cmdline(MEMFD + ["-device", "virtio-czone-pci,memdev=cz0,block-size=1K"],
            "at least", "block-size 1K")
bad_cmdline(["-object", "memory-backend-memfd,id=cz0,size=3M",
             "-device", "virtio-czone-pci,memdev=cz0,block-size=2M"],
            "multiple", "region not a multiple of block-size")
bad_cmdline(["-device", "virtio-czone-pci"], "'memdev' property",
            "missing memdev")
bad_cmdline(MEMFD + ["-device", "virtio-czone-pci,memdev=cz0",
                     "-device", "virtio-czone-pci,memdev=cz0"],
            "busy memdev", "memdev used twice")
bad_cmdline(MEMFD + ["-device",
                     "virtio-czone-pci,memdev=cz0,requested-size=3M"],
            "multiple", "requested-size not a multiple of block-size")
bad_cmdline(MEMFD + ["-device",
                     "virtio-czone-pci,memdev=cz0,requested-size=2G"],
            "cannot exceed", "requested-size beyond memdev")
bad_cmdline(MEMFD + ["-device", "virtio-czone-pci,memdev=cz0,node=1"],
            "numa", "node out of range")
bad_cmdline(MEMFD + ["-device", "virtio-czone-pci,memdev=cz0,memaddr=0x1000"],
            "aligned", "misaligned memaddr")
bad_cmdline(["-object", "memory-backend-memfd,id=cz0,size=64M,prealloc=on",
             "-device", "virtio-czone-pci,memdev=cz0"],
            "preallocation enabled", "memdev with prealloc=on")
# A private file mapping is refused, and the file keeps its contents
# (realize used to punch holes into it).
shm = tempfile.mkdtemp(dir="/dev/shm")
private = os.path.join(shm, "private")
content = (b"czone-file-content-" * (4 * MiB // 19 + 1))[:4 * MiB]
with open(private, "wb") as f:
    f.write(content)
bad_cmdline(["-object", f"memory-backend-file,id=cz0,size=4M,mem-path={private},"
             "share=off", "-device", "virtio-czone-pci,memdev=cz0"],
            "private file mapping", "memory-backend-file share=off")
with open(private, "rb") as f:
    check(f.read() == content, "the private file's contents are intact")
subprocess.run(["rm", "-rf", shm])
finish()
