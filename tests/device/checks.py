"""Shared by the standalone device scripts: PASS/FAIL lines, exit status, QEMU stop."""

import sys

_failures = 0


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
