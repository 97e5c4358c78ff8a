"""Helpers for tests that run our in-guest C test programs over SSH."""

from __future__ import annotations

import re

from czone.qemu.machine import Machine

# Headers of real kernel problems.  Not "Call Trace": expected OOM reports carry one.
DMESG_BAD = re.compile(
    r"BUG:|WARNING:|Oops|kernel BUG|general protection|Bad page|bad_page|"
    r"Huh VM_FAULT_OOM|soft lockup|rcu.*stall|blocked for more than|UBSAN|KASAN|"
    r"pagealloc: memory corruption|pagealloc: single bit error")

# A guest with ZONE_MOVABLE memory for CZone chunks to come from.
CZONE_VM = {"memory_mib": 1536, "extra_append": "movablecore=1024M"}


# The last line every czt.h program prints when nothing failed.
SUMMARY_OK = "OK: 0 failure(s)"


def run_program(vm: Machine, cmd: str, timeout: float = 600) -> str:
    """Run an in-guest test program; it must exit 0, print no FAIL line and end
    with its own summary line (a crash or an early exit 0 prints none)."""
    with vm.ssh() as ssh:
        res = ssh.run(f"{cmd} 2>&1", timeout=timeout)
    out = res.stdout
    lines = out.splitlines()
    fails = [line for line in lines if line.startswith("FAIL")]
    assert res.rc == 0 and not fails, f"{cmd} exited {res.rc}:\n{out}"
    assert lines and lines[-1] == SUMMARY_OK, f"{cmd} did not end with {SUMMARY_OK!r}:\n{out}"
    return out


def assert_dmesg_clean(vm: Machine) -> None:
    with vm.ssh() as ssh:
        dmesg = ssh.check("dmesg").stdout
    bad = [line for line in dmesg.splitlines() if DMESG_BAD.search(line)]
    assert not bad, "kernel reported problems:\n" + "\n".join(bad)
