"""The pure parts of a trace replay: the keep-alive pool and the summary.

Nothing here boots a VM or reads a clock by itself: times are passed in,
so the unit tests drive it with plain numbers.
"""

from __future__ import annotations

import math
import statistics
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

GiB = 1 << 30


@dataclass
class Warm:
    ctr: str
    fn: str
    last_used: float
    busy: bool = False


class WarmPool:
    """Containers by function, the usual FaaS keep-alive policy: an
    invocation takes an idle warm container of its function if there is one
    (the most recently used, so that the others can expire), else it is a
    cold start; a container idle for ``keep_alive`` seconds is expired.
    Thread-safe: the replay's workers share one pool."""

    def __init__(self, keep_alive: float):
        if keep_alive < 0:
            raise ValueError(f"keep-alive must not be negative, not {keep_alive}")
        self.keep_alive = keep_alive
        self._ctrs: dict[str, Warm] = {}
        self._lock = threading.Lock()

    def acquire(self, fn: str) -> str | None:
        with self._lock:
            idle = [w for w in self._ctrs.values() if w.fn == fn and not w.busy]
            if not idle:
                return None
            w = max(idle, key=lambda w: w.last_used)
            w.busy = True
            return w.ctr

    def add_busy(self, ctr: str, fn: str, now: float) -> None:
        """A cold start's new container, serving the invocation that started it."""
        with self._lock:
            if ctr in self._ctrs:
                raise ValueError(f"container {ctr} is already in the pool")
            self._ctrs[ctr] = Warm(ctr, fn, now, busy=True)

    def release(self, ctr: str, now: float) -> None:
        with self._lock:
            w = self._ctrs[ctr]
            w.busy, w.last_used = False, now

    def drop(self, ctr: str) -> None:
        """A container that failed: it serves nothing more."""
        with self._lock:
            self._ctrs.pop(ctr, None)

    def expire(self, now: float) -> list[str]:
        """Take out and return the containers idle for at least ``keep_alive``."""
        with self._lock:
            gone = [w.ctr for w in self._ctrs.values()
                    if not w.busy and now - w.last_used >= self.keep_alive]
            for ctr in gone:
                del self._ctrs[ctr]
            return gone

    def next_expiry(self) -> float | None:
        with self._lock:
            idle = [w.last_used for w in self._ctrs.values() if not w.busy]
        return min(idle) + self.keep_alive if idle else None

    def all(self) -> list[str]:
        with self._lock:
            return list(self._ctrs)


def memory_time(samples: Sequence[tuple[float, int]]) -> float:
    """GiB x seconds under a step function of (t, bytes) samples: each value
    holds until the next sample."""
    total = 0.0
    for (t, v), (t_next, _) in zip(samples, samples[1:], strict=False):
        total += v * (t_next - t)
    return total / GiB


def percentile(xs: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile; None (shown n/a) when there is nothing."""
    if not xs:
        return None
    ordered = sorted(xs)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def summarize(invocations: Iterable[Mapping[str, Any]],
              memory: Sequence[tuple[float, int]]) -> dict[str, Any]:
    """What a replay comes to: memory-time (host PSS), the cold-start
    fraction, and end-to-end latency percentiles of the invocations that
    answered.  Failures are counted, never dropped."""
    inv = list(invocations)
    ok = [i for i in inv if i.get("ok")]
    e2e = [i["e2e_s"] for i in ok]
    startup = [i["startup_s"] for i in ok if i.get("cold")]
    return {
        "invocations": len(inv),
        "failed": len(inv) - len(ok),
        "cold": sum(1 for i in inv if i.get("cold")),
        "cold_fraction": (sum(1 for i in inv if i.get("cold")) / len(inv)) if inv else None,
        "e2e_p50_s": percentile(e2e, 50),
        "e2e_p99_s": percentile(e2e, 99),
        "startup_p50_s": percentile(startup, 50),
        "run_ms_median": statistics.median([i["run_ms"] for i in ok]) if ok else None,
        "memory_time_gib_s": memory_time(memory) if len(memory) > 1 else None,
        "peak_pss_bytes": max((v for _, v in memory), default=None),
        "duration_s": (memory[-1][0] - memory[0][0]) if len(memory) > 1 else None,
    }
