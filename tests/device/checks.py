"""PASS/FAIL lines for the standalone device scripts, and their exit status."""

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
