"""microVM templates for the SCPV baselines, after Kata Containers' VM factory.

A template is a VM booted once with its RAM in a file (``share=on``), then
paused and saved with ``x-ignore-shared`` migration: the device state goes to
a small file, the RAM stays in the RAM file.  A clone maps that file
copy-on-write (``share=off``), starts with ``-incoming defer`` and loads the
device state: it resumes where the template stopped, without booting, and
shares the template's clean pages with every other clone through the page
cache.

- ``scpv-template``: the template is a booted guest with its agent; a clone
  starts the container and answers.
- ``scpv-snapshot`` (Firecracker snapshots, FaaSnap): the template already
  runs the function's warm server; a clone only resumes and answers.

Templates are kept in ``<run root>/templates/<key>/`` where the key hashes
the builds, the function and the VM's shape, so a rebuild makes new ones.
No SSH connection is open when the template is saved, so the clone's user
networking carries no stale connection.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from czone.errors import CZoneError
from czone.guest.runtime import RuntimeAgent
from czone.qemu.cmdline import VmSpec
from czone.qemu.machine import Machine

MIGRATION_TIMEOUT = 120.0
# The container a snapshot template holds; every clone serves it under this id.
SNAPSHOT_CTR = "warm"


class TemplateError(CZoneError):
    pass


@dataclass(frozen=True)
class Template:
    dir: Path
    warm: bool

    @property
    def ram(self) -> Path:
        return self.dir / "ram"

    @property
    def state(self) -> Path:
        return self.dir / "state"

    def ready(self) -> bool:
        return (self.dir / "done").exists()


def template_key(spec: VmSpec, fn: str, memory_mib: int, warm: bool) -> str:
    shape = {"kernel": str(spec.kernel), "rootfs": str(spec.rootfs), "fnbase": str(spec.fnbase),
             "qemu": str(spec.qemu), "accel": spec.accel, "memory": spec.memory_mib,
             "cpus": spec.cpus, "append": spec.extra_append, "fn": fn, "ctr_mib": memory_mib,
             "warm": warm}
    return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:12]


def _wait_migration(vm: Machine, timeout: float) -> None:
    """Until the migration (either side) completes; events, with a status
    check at the end because a fast one may finish before we listen."""
    deadline = time.monotonic() + timeout
    while True:
        st = vm.qmp("query-migrate").get("status")
        if st == "completed":
            return
        if st in ("failed", "cancelled"):
            raise TemplateError(f"migration {st}: {vm.qmp('query-migrate')}")
        left = deadline - time.monotonic()
        if left <= 0:
            raise TemplateError(f"migration still {st} after {timeout:.0f}s")
        try:
            vm.wait_event("MIGRATION", min(left, 1.0))
        except CZoneError:
            pass


def _ignore_shared(vm: Machine) -> None:
    vm.qmp("migrate-set-capabilities",
           capabilities=[{"capability": "x-ignore-shared", "state": True}])


def template_spec(spec: VmSpec, tpl: Template) -> VmSpec:
    """The template VM itself, its RAM written through to a file in a fresh
    work directory that ``save`` publishes as ``tpl``."""
    work = _work(tpl)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    return replace(spec, ram_file=work / "ram", ram_shared=True, incoming=False)


def _work(tpl: Template) -> Path:
    return tpl.dir.with_name(tpl.dir.name + ".tmp")


def save(vm: Machine, tpl: Template, fn: str, memory_mib: int) -> None:
    """Warm ``fn`` in the booted template VM if a snapshot is asked for, pause
    it, save its device state next to its RAM file, and publish the template."""
    work = _work(tpl)
    if tpl.warm:
        with vm.ssh() as ssh, RuntimeAgent(ssh) as agent:
            agent.start(SNAPSHOT_CTR, fn, memory_mib)
            if not agent.invoke(SNAPSHOT_CTR).get("ok"):
                raise TemplateError(f"the warm-up invocation of {fn} failed")
    vm.qmp("stop")
    _ignore_shared(vm)
    vm.qmp("migrate", uri=f"exec:cat > {shlex.quote(str(work / 'state'))}")
    _wait_migration(vm, MIGRATION_TIMEOUT)
    vm.shutdown()
    (work / "done").write_text(json.dumps({"fn": fn, "warm": tpl.warm, "t": time.time()}))
    shutil.rmtree(tpl.dir, ignore_errors=True)
    work.rename(tpl.dir)


def clone_spec(spec: VmSpec, tpl: Template) -> VmSpec:
    return replace(spec, ram_file=tpl.ram, ram_shared=False, incoming=True)


def resume(vm: Machine, tpl: Template) -> dict[str, Any]:
    """Load the template's device state into a launched clone and run it."""
    t0 = time.monotonic()
    _ignore_shared(vm)
    vm.qmp("migrate-incoming", uri=f"exec:cat {shlex.quote(str(tpl.state))}")
    _wait_migration(vm, MIGRATION_TIMEOUT)
    t1 = time.monotonic()
    vm.qmp("cont")
    return {"incoming_s": t1 - t0}


def guest_id(mode: str, ctr_id: str) -> str:
    """The container's name inside its VM: a snapshot clone serves the one
    its template started."""
    return SNAPSHOT_CTR if mode == "scpv-snapshot" else ctr_id
