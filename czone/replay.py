"""``czonectl replay``: drive real VMs with the invocations of a trace.

One scheduler thread releases each invocation at its time; a pool of
workers serves them through the service layer, each worker with its own
``Service`` (its own SSH sessions and store connection).  An invocation
takes a warm container of its function or starts one (a cold start); a
container idle for the keep-alive is killed, which in MCPV destroys its
CZone and gives its memory back (the MCPV baselines shrink their VM by
virtio-mem or the balloon instead).  A sampler thread reads the RSS and PSS of
every QEMU process of the run with psutil.  Every invocation, kill and
sample is a JSON line, flushed as it happens: an interrupted replay keeps
what it measured.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import psutil

from czone.errors import CZoneError
from czone.functions import memory_for
from czone.replay_policy import WarmPool, summarize
from czone.service import Service
from czone.trace import Invocation

# replay mode -> the service layer's run mode
MODES = {"mcpv-czone": "mcpv", "mcpv-virtio-mem": "mcpv-virtio-mem",
         "mcpv-balloon": "mcpv-balloon", "scpv-template": "scpv-template",
         "scpv-snapshot": "scpv-snapshot"}
MCPV = ("mcpv-czone", "mcpv-virtio-mem", "mcpv-balloon")
SAMPLE_INTERVAL = 1.0
DRAIN_TIMEOUT = 900.0


class ReplayError(CZoneError):
    pass


@dataclass(frozen=True)
class Options:
    mode: str
    keep_alive: float = 60.0
    reclaim_idle_after: float | None = None
    workers: int = 16
    sample_interval: float = SAMPLE_INTERVAL
    keep_vms: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ReplayError(f"unknown mode {self.mode!r} (one of {', '.join(MODES)})")
        if self.keep_alive < 0:
            raise ReplayError(f"--keep-alive must not be negative, not {self.keep_alive}")
        if self.reclaim_idle_after is not None:
            if self.reclaim_idle_after <= 0:
                raise ReplayError("--reclaim-idle-after must be positive")
            if self.mode != "mcpv-czone":
                raise ReplayError(f"--reclaim-idle-after needs CZones (mcpv-czone), not "
                                  f"{self.mode}")
        if self.workers < 1:
            raise ReplayError(f"--workers must be at least 1, not {self.workers}")


class _Log:
    """JSON lines, one writer at a time, each flushed at once."""

    def __init__(self, f: IO[str]):
        self.f, self.lock = f, threading.Lock()

    def write(self, rec: dict[str, Any]) -> None:
        with self.lock:
            self.f.write(json.dumps(rec, default=str) + "\n")
            self.f.flush()


class Replay:
    def __init__(self, make_service: Callable[[], Service], opts: Options, out: IO[str],
                 progress: Callable[[int, int], None] = lambda _done, _total: None):
        self.make_service, self.opts = make_service, opts
        self.log = _Log(out)
        self.progress = progress
        self.pool = WarmPool(opts.keep_alive)
        self.mode = MODES[opts.mode]
        self._local = threading.local()
        self._services: list[Service] = []
        self._services_lock = threading.Lock()
        self._stop = threading.Event()
        self._invocations: list[dict[str, Any]] = []
        self._memory: list[tuple[float, int]] = []
        self._t0 = 0.0

    # -- per-thread services ---------------------------------------------------

    def _svc(self) -> Service:
        svc = getattr(self._local, "svc", None)
        if svc is None:
            svc = self._local.svc = self.make_service()
            with self._services_lock:
                self._services.append(svc)
        return svc

    def _now(self) -> float:
        return time.monotonic() - self._t0

    # -- the work --------------------------------------------------------------

    def prepare(self, functions: Sequence[str]) -> None:
        """SCPV templates and snapshots are built before the clock starts: a
        replay measures serving, not the one-time build."""
        svc = self._svc()
        svc.accel()
        if self.opts.mode in MCPV:
            return
        for fn in sorted(set(functions)):
            spec = svc.vm_spec_for("probe", self.mode, memory_for(fn), 0)
            svc.template(spec, fn, memory_for(fn), warm=self.mode == "scpv-snapshot")

    def serve(self, ev: Invocation) -> None:
        svc = self._svc()
        started = self._now()
        rec: dict[str, Any] = {"kind": "inv", "t": ev.t, "fn": ev.function,
                               "trace_id": ev.trace_id, "lag_s": started - ev.t}
        ctr = self.pool.acquire(ev.function)
        try:
            if ctr is None:
                rec["cold"] = True
                res = svc.run(ev.function, self.mode)
                ctr = res.id
                self.pool.add_busy(ctr, ev.function, self._now())
                reply = res.warmup      # the invocation that started it
                rec.update(startup_s=res.startup_s, vm=res.vm, booted=res.booted)
            else:
                rec["cold"] = False
                reply, _ = svc.invoke(ctr)
        except CZoneError as e:
            if ctr is not None:
                self.pool.drop(ctr)
            rec.update(ok=False, error=str(e), ctr=ctr, e2e_s=self._now() - ev.t)
        else:
            self.pool.release(ctr, self._now())
            rec.update(ok=bool(reply.get("ok")), error=reply.get("error"), ctr=ctr,
                       run_ms=reply.get("run_ms"), e2e_s=self._now() - ev.t)
        self.log.write(rec)
        self._invocations.append(rec)

    def _kill(self, ctr: str) -> None:
        try:
            res = self._svc().kill(ctr)
            self.log.write({"kind": "kill", "t": self._now(), "ctr": ctr,
                            "returned_bytes": res.returned_bytes})
        except CZoneError as e:
            self.log.write({"kind": "kill", "t": self._now(), "ctr": ctr, "error": str(e)})

    def _reclaim(self) -> None:
        try:
            got = self._svc().reclaim(idle_for=self.opts.reclaim_idle_after or 0.0)
            self.log.write({"kind": "reclaim", "t": self._now(), "vms": got})
        except CZoneError as e:
            self.log.write({"kind": "reclaim", "t": self._now(), "error": str(e)})

    def _sample(self, root_pids: Callable[[], list[int]]) -> None:
        while True:
            rss = pss = n = 0
            for pid in root_pids():
                try:
                    m = psutil.Process(pid).memory_full_info()
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                rss, pss, n = rss + m.rss, pss + m.pss, n + 1
            t = self._now()
            self._memory.append((t, pss))
            self.log.write({"kind": "mem", "t": t, "rss": rss, "pss": pss, "vms": n})
            if self._stop.wait(self.opts.sample_interval):
                return

    def run(self, events: Sequence[Invocation]) -> dict[str, Any]:
        """Replay ``events``; returns the summary (also the log's last line)."""
        self.prepare([e.function for e in events])
        db = self._svc().db
        before = {v.name for v in db.list()}

        def pids() -> list[int]:
            return [v.pid for v in db.list() if v.name not in before and v.pid]

        pending: list[Future[None]] = []
        sampler = threading.Thread(target=self._sample, args=(pids,), daemon=True)
        period = (self.opts.reclaim_idle_after or 0) / 2
        next_reclaim = period if period else float("inf")
        self._t0 = time.monotonic()
        sampler.start()
        self.log.write({"kind": "start", "mode": self.opts.mode, "events": len(events),
                        "keep_alive_s": self.opts.keep_alive,
                        "reclaim_idle_after_s": self.opts.reclaim_idle_after})
        try:
            with ThreadPoolExecutor(self.opts.workers, thread_name_prefix="replay") as ex:
                for i, ev in enumerate(events):
                    next_reclaim = self._tick(ex, pending, until=ev.t, next_reclaim=next_reclaim,
                                              period=period)
                    pending.append(ex.submit(self.serve, ev))
                    self.progress(i, len(events))
                # after the last invocation: until every container expired
                deadline = time.monotonic() + DRAIN_TIMEOUT
                while any(not f.done() for f in pending) or self.pool.all():
                    if time.monotonic() > deadline:
                        raise ReplayError(f"containers still busy or warm {DRAIN_TIMEOUT:.0f}s "
                                          "after the last invocation")
                    nxt = self.pool.next_expiry()
                    step = 1.0 if nxt is None else max(0.05, min(1.0, nxt - self._now()))
                    next_reclaim = self._tick(ex, pending, until=self._now() + step,
                                              next_reclaim=next_reclaim, period=period)
                for f in pending:
                    f.result()
        finally:
            self._stop.set()
            sampler.join(timeout=10)
            self._cleanup(before)
        summary = {"kind": "summary", "mode": self.opts.mode,
                   **summarize(self._invocations, self._memory)}
        self.log.write(summary)
        return summary

    def _tick(self, ex: ThreadPoolExecutor, pending: list[Future[None]], until: float,
              next_reclaim: float, period: float) -> float:
        """Wait until ``until`` (replay seconds), expiring containers and
        starting idle reclaims on the way."""
        while True:
            now = self._now()
            for ctr in self.pool.expire(now):
                pending.append(ex.submit(self._kill, ctr))
            if now >= next_reclaim:
                pending.append(ex.submit(self._reclaim))
                next_reclaim += period
            if now >= until:
                return next_reclaim
            expiry = self.pool.next_expiry()
            wake = min(until, next_reclaim, until if expiry is None else expiry)
            if self._stop.wait(max(0.0, wake - now)):
                raise ReplayError("replay stopped")

    def _cleanup(self, before: set[str]) -> None:
        """Staged: containers first, then (unless kept) the VMs this replay
        booted; best effort, every step logged."""
        for ctr in self.pool.all():
            self.pool.drop(ctr)
            self._kill(ctr)
        svc = self._svc()
        if not self.opts.keep_vms:
            for v in svc.db.list():
                if v.name not in before:
                    try:
                        svc.vm_down(v.name, timeout=10)
                    except CZoneError as e:
                        self.log.write({"kind": "cleanup", "vm": v.name, "error": str(e)})
        with self._services_lock:
            for s in self._services:
                s.close()
            self._services.clear()
        self._local = threading.local()


def replay(make_service: Callable[[], Service], opts: Options, events: Sequence[Invocation],
           out_path: Path, progress: Callable[[int, int], None] = lambda _d, _t: None
           ) -> dict[str, Any]:
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with open(out_path, "a") as out:
        return Replay(make_service, opts, out, progress).run(events)
