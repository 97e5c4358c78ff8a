"""flock with a deadline: another czonectl may hold the lock for a while."""

from __future__ import annotations

import fcntl
import time
from typing import IO, Any


class LockTimeout(TimeoutError):
    pass


def flock_within(f: IO[Any], timeout: float, poll: float = 0.1) -> None:
    """Take an exclusive flock on ``f``; LockTimeout after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise LockTimeout(f"still held after {timeout:.0f}s") from None
            time.sleep(poll)
