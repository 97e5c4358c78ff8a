"""Shared by the standalone device scripts: the QEMU to test, PASS/FAIL lines,
exit status, QEMU stop."""

import sys

from czone import artifacts
from czone.errors import CZoneError

_failures = 0


def qemu_binary():
    """The QEMU named on the command line, else the one in the artifact cache
    (``$CZONE_QEMU`` overrides it), as for everything else."""
    if len(sys.argv) > 1:
        return sys.argv[1]
    try:
        return str(artifacts.qemu_binary())
    except CZoneError as e:
        sys.exit(f"{sys.argv[0]}: {e}")


def check(cond, what):
    global _failures
    print(("PASS " if cond else "FAIL ") + what)
    if not cond:
        _failures += 1


def finish():
    print("FAILURES:", _failures)
    sys.exit(1 if _failures else 0)


async def stop(proc, qmp):
    """QMP quit, then wait for the QEMU process."""
    try:
        await qmp.execute("quit")
        await qmp.disconnect()
    except EOFError:
        pass
    proc.wait(timeout=30)
