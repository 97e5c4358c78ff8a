"""The one boot sequence of every VM: records, templates, benchmarks and
the test factory all boot through ``boot_machine``."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from czone import template
from czone.errors import CZoneError
from czone.guest.runtime import AGENT_MARKER
from czone.qemu.cmdline import INIT_MARKER, READY_MARKER, VmSpec
from czone.qemu.machine import Machine

BOOT_TIMEOUT = 180.0


class BootError(CZoneError):
    pass


def boot_machine(spec: VmSpec, ssh_key: Path, timeout: float = BOOT_TIMEOUT,
                 tpl: template.Template | None = None,
                 machine: Machine | None = None) -> tuple[Machine, dict[str, float]]:
    """Launch ``spec`` and wait until it serves: the one boot sequence of every
    VM (records, benchmarks and tests alike).  A boot waits for the kernel to
    hand over to init, for sshd, for an SSH command and, with a function base
    image, for the agent; a clone of template ``tpl`` loads its state instead
    of booting.  Returns the machine and the seconds each stage took from the
    launch; on failure QEMU is stopped and the error carries its logs.
    ``machine``: the not yet launched Machine of ``spec`` to boot (a libvirt
    domain's); by default a QEMU process of ours."""
    machine = machine or Machine(spec, ssh_key=ssh_key)
    t0 = time.monotonic()
    times: dict[str, float] = {}
    try:
        machine.launch()
        if machine.pid is None or machine.proc_start is None:
            raise BootError(f"QEMU of VM {spec.name} exited right after it connected "
                               f"to QMP; see {machine.qemu_log}")
        if tpl is not None:
            template.resume(machine, tpl)
            times["resume_s"] = time.monotonic() - t0
        else:
            for key, marker in (("init_s", INIT_MARKER), ("sshd_s", READY_MARKER)):
                machine.wait_for_console(marker, timeout)
                times[key] = time.monotonic() - t0
        machine.wait_ssh(timeout).close()
        times["ssh_ready_s"] = time.monotonic() - t0
        if spec.fnbase is not None and tpl is None:
            machine.wait_for_console(AGENT_MARKER, timeout)
            times["agent_s"] = time.monotonic() - t0
    except BaseException:
        machine.shutdown(timeout=3.0)
        raise
    return machine, times


@contextmanager
def booted(spec: VmSpec, ssh_key: Path,
           timeout: float = BOOT_TIMEOUT) -> Iterator[tuple[Machine, dict[str, float]]]:
    """A VM without a record, for benchmarks: booted, then shut down."""
    machine, times = boot_machine(spec, ssh_key, timeout)
    with machine:
        yield machine, times
