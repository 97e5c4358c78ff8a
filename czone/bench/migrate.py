"""``make bench BENCH=migrate``: live migration of a VM with the same three
containers, CZone device against virtio-mem, through the service layer.

Each VM runs three containers of one function; each wrote random data into
its root, and one deleted every other file and was reclaimed (CZone: its
free pages go back to the host, leaving holes in plugged chunks).  The VM
then migrates ``REPS`` times in a row (each migration one repetition, the
containers running on).  Per migration: the bytes QEMU sent
(``query-migrate`` ram.transferred), the pages it looked at (normal and
zero), its total time and downtime, and the device memory's RSS on the
destination.  The table gives medians with min-max, and CZone / virtio-mem
ratios of the medians.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
from pathlib import Path
from typing import Any

from czone import hostmem
from czone.bench.report import table
from czone.bench.startup import _service, _teardown
from czone.qemu import qmp
from czone.qemu.cmdline import DEVICE_MEMFD, MEMORY_DEVICE_ID
from czone.service import MCPV_DEVICE_MIB, VM_BOOT_MIB, Service

FN = os.environ.get("CZONE_BENCH_FN", "float_operation")
REPS = int(os.environ.get("CZONE_BENCH_MIGRATE_REPS", "5"))
# The containers: MiB of data each, and whether every other file is deleted.
CONTAINERS = ((16, False), (48, True), (24, False))
# virtio-mem plugs up front: enough for the three containers.
VMEM_REQUESTED_MIB = 512
PLUG_TIMEOUT = 300.0
MiB = hostmem.MiB
SERVER = ["/usr/bin/python3", "/opt/fn/fnserver.py", FN, "/run/fn/fn.sock"]


def with_data(files: int, drop_every_other: bool) -> list[str]:
    """The container's command: write ``files`` MiB into /data (every other file
    deleted again if asked), then serve ``FN``."""
    script = (f"import os\nos.makedirs('/data')\n"
              f"for i in range({files}):\n"
              f"    open(f'/data/{{i}}', 'wb').write(os.urandom(1 << 20))\n"
              f"if {drop_every_other}:\n"
              f"    [os.unlink(f'/data/{{i}}') for i in range(1, {files}, 2)]\n"
              f"os.execv({SERVER[0]!r}, {SERVER!r})\n")
    return ["/usr/bin/python3", "-c", script]


def _czone_vm(svc: Service) -> str:
    runs = [svc.run(FN, args=with_data(n, drop)) for n, drop in CONTAINERS]
    vm = runs[0].vm
    for r, (_, drop) in zip(runs, CONTAINERS, strict=True):
        if drop:
            svc.vm_reclaim(vm, czone=r.czone)
    return vm


def _vmem_vm(svc: Service) -> str:
    """A plain VM with a virtio-mem device and the same containers, started
    through its agent (the service places containers only in CZone VMs)."""
    dev_id = MEMORY_DEVICE_ID["virtio-mem"]
    spec = svc.vm_spec("bench-vmem", VM_BOOT_MIB, memory_mode="virtio-mem",
                       device_memory_mib=MCPV_DEVICE_MIB, requested_mib=VMEM_REQUESTED_MIB,
                       free_page_reporting=True)
    rec = svc.vm_up(spec)
    machine = svc.machine(rec)
    try:
        qmp.wait_size(machine, dev_id, VMEM_REQUESTED_MIB * MiB, PLUG_TIMEOUT)
    finally:
        machine.close()
    for i, (n, drop) in enumerate(CONTAINERS):
        ctr = f"c{i}"
        svc.ask(rec.name, lambda a, c=ctr, n=n, d=drop: a.start(c, FN, 128, with_data(n, d)),
                retry=False)
        assert svc.ask(rec.name, lambda a, c=ctr: a.invoke(c)).get("ok")
        if drop:
            svc.ask(rec.name, lambda a, c=ctr: a.reclaim(c))
    return rec.name


def _migrations(svc: Service, vm: str) -> list[dict[str, Any]]:
    out = []
    for _ in range(REPS):
        res = svc.vm_migrate(vm)
        ram = res.ram
        rec = svc.db.get(vm)
        out.append({"sent_bytes": ram["transferred"], "normal": ram["normal"],
                    "zero": ram["duplicate"], "total_ms": res.total_time_ms,
                    "downtime_ms": res.downtime_ms, "host_total_s": res.total_s,
                    "dst_device_rss": hostmem.stable_mapping_rss(rec.pid, DEVICE_MEMFD)})
    return out


def _spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):.1f} [{min(xs):.1f}-{max(xs):.1f}]"


def run() -> dict[str, Any]:
    result: dict[str, Any] = {"fn": FN, "containers": CONTAINERS, "reps": REPS, "runs": {}}
    for mode, setup in (("czone", _czone_vm), ("virtio-mem", _vmem_vm)):
        root = Path(tempfile.mkdtemp(prefix=f"czb-mig-{mode[:2]}-"))
        svc = _service(root)
        try:
            result["runs"][mode] = _migrations(svc, setup(svc))
            result["accel"] = svc.accel(probe=False)[0]
        finally:
            svc.close()
            _teardown(svc)
            shutil.rmtree(root, ignore_errors=True)
    kernel, image, qemu = svc.builds
    result |= {"kernel": kernel.release, "image": image.version, "qemu": str(qemu)}
    rows, med = [], {}
    for mode, runs in result["runs"].items():
        sent = [r["sent_bytes"] / MiB for r in runs]
        pages = [(r["normal"] + r["zero"]) * 4096 / MiB for r in runs]
        secs = [r["total_ms"] / 1000 for r in runs]
        rss = [r["dst_device_rss"] / MiB for r in runs]
        med[mode] = (statistics.median(sent), statistics.median(secs))
        rows.append([mode, len(runs), _spread(sent), _spread(pages), _spread(secs),
                     _spread([r["downtime_ms"] for r in runs]), _spread(rss)])
    ratio = [med["czone"][0] / med["virtio-mem"][0], med["czone"][1] / med["virtio-mem"][1]]
    result["ratio_czone_over_vmem"] = {"sent": ratio[0], "time": ratio[1]}
    print(f"live migration of a VM with {len(CONTAINERS)} {FN} containers, "
          f"median [min-max] over {REPS} migrations in a row ({result['accel']}, "
          f"kernel {kernel.release}, image {image.version})")
    print(table(["device", "n", "sent (MiB)", "pages looked at (MiB)", "total (s)",
                 "downtime (ms)", "dest. device RSS (MiB)"], rows))
    print(f"CZone / virtio-mem: sent {ratio[0]:.2f}x, total time {ratio[1]:.2f}x")
    return result
