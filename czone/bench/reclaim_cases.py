"""The reclaim benchmark's measured cases, one VM per memory mode.

Each VM runs four containers of ``size`` MiB (one that dies, three live
neighbours) that touched their memory interleaved in 64 KiB steps, so the
dying container's pages lie scattered among live ones.  Every figure is
the host's: the QEMU process's RSS and its memfds' allocation, sampled by
``hostmem.RssWatch``.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from czone.bench import reclaim_raw as raw
from czone.bench.guestvm import booted
from czone.bench.reclaim_stats import (
    BLOCK_MIB,
    Sample,
    cap_mib,
    device_mib,
    median_round,
    shrink_steps,
    step_mib,
)
from czone.errors import CZoneError
from czone.guest.agent import GuestAgent
from czone.hostmem import MiB, RssWatch, rss_bytes
from czone.qemu import qmp
from czone.qemu.cmdline import MEMORY_DEVICE_ID
from czone.qemu.machine import Machine

DYING = "dying"
AGAIN = "again"
NEIGHBOURS = ("n1", "n2", "n3")
STEP_KIB = 64
BASE_MIB = 512
PLUG_TIMEOUT = 300.0
SHRINK_TIMEOUT = 60.0
UNTIL_LIMIT = 180.0
FPR_WINDOW = 20.0
BALLOON_TIMEOUT = 120.0
GUEST_ROUND_TRIPS = 7
WARM_ROUNDS = 3


def measure(pid: int, resident: int, request: Callable[[], object],
            wait: Callable[[], object] = lambda: None, **finish: float) -> Sample:
    """Time ``request`` from the host's view: from the call until RSS stops falling.

    ``done_s`` is when ``wait`` returned: the answer, or the device at its new size.
    """
    with RssWatch(pid) as w:
        t0 = time.monotonic()
        request()
        wait()
        done = time.monotonic() - t0
        before, after, latency = w.finish(t0, **finish)
    return Sample(latency, before, after, resident, {"done_s": done})


# -- the guest side ------------------------------------------------------

@contextmanager
def agent_in(vm: Machine) -> Iterator[GuestAgent]:
    with vm.ssh() as ssh, GuestAgent(ssh) as agent:
        yield agent


def populate(agent: GuestAgent, czones: list[int], size_mib: int) -> int:
    """Spawn the dying container and its neighbours, touch interleaved; bytes it touched."""
    names = [DYING, *NEIGHBOURS]
    for name, czone in zip(names, czones, strict=True):
        agent.spawn(name, czone, size_mib, thp=False)
    agent.interleave(names, size_mib, STEP_KIB)
    return agent.touch(DYING, 0) * 1024


def verify_neighbours(agent: GuestAgent, size_mib: int) -> int:
    """Every neighbour page still holds its pattern; raises otherwise."""
    want = size_mib * MiB // 4096
    pages = 0
    for name in NEIGHBOURS:
        got = agent.verify(name)
        if got != want:
            raise CZoneError(f"neighbour {name} verified {got} pages, expected {want}")
        pages += got
    return pages


def median_time(ask: Callable[[Any], object], prepare: Callable[[], Any] = lambda: None,
                rounds: int = GUEST_ROUND_TRIPS) -> float:
    """Median seconds of ``ask(prepare())`` over a few rounds; ``prepare`` is not timed."""
    times = []
    for _ in range(rounds):
        arg = prepare()
        t0 = time.monotonic()
        ask(arg)
        times.append(time.monotonic() - t0)
    return sorted(times)[len(times) // 2]


def fixed_costs(agent: GuestAgent, live: int) -> dict[str, float]:
    """The guest's fixed cost, from the host: a no-op agent round trip (``stat``),
    the round trip of destroying a CZone that never had a chunk, and that of
    destroying one whose container touched 1 MiB: the protocol's whole round
    trip (the chunk taken back, one ``UNPLUG`` to the device and its answer)
    with little for the host to punch.  A container that touched nothing may
    not have taken a chunk yet."""
    n = itertools.count()

    def one_chunk() -> int:
        czone, name = agent.create(2 * BLOCK_MIB), f"fixed{next(n)}"
        agent.spawn(name, czone, BLOCK_MIB, thp=False)
        agent.touch(name, 1)
        agent.kill(name)
        return czone

    return {"stat_round_trip_s": median_time(lambda _: agent.stat(live)),
            "empty_destroy_s": median_time(agent.destroy, lambda: agent.create(BLOCK_MIB)),
            "one_chunk_destroy_s": median_time(agent.destroy, one_chunk)}


# -- the cases -------------------------------------------------------------

def czone_destroy(size_mib: int) -> tuple[Sample, Sample, dict[str, Sample], str]:
    """Case 1: the dying container's CZone is destroyed; its chunks are unplugged.

    Then the same again in this VM, warm, ``WARM_ROUNDS`` times: a new CZone of
    the same size, touched, killed and destroyed.  Under TCG the first destroy
    in a VM includes the translation of the guest's destroy path, which a KVM
    guest never pays; the comparison with a host process's punch uses the
    warm ones.

    Case 5's raw discards run beside them, while this VM is up and idle: the
    same machine load.  The one-hole punch of the same bytes (the driver
    places a CZone's blocks side by side, so QEMU punches one hole) brackets
    each warm destroy, and the repetition keeps the round whose excess over
    its budget is the median (``median_round``); the punch in 2 MiB holes,
    what QEMU does for blocks scattered among other CZones', brackets the
    first destroy."""
    dev = device_mib(size_mib)
    with booted("rcl-cz", BASE_MIB, memory_mode="czone", device_memory_mib=dev,
                requested_mib=dev) as (vm, accel), agent_in(vm) as agent:
        ids = [agent.create(cap_mib(size_mib)) for _ in range(4)]
        resident = populate(agent, ids, size_mib)
        agent.kill(DYING)
        stat = agent.stat(ids[0])
        fixed = fixed_costs(agent, ids[1])
        beside = {"memfd_2m": raw.memfd_punch(size_mib, BLOCK_MIB)}
        cold = destroyed(vm, agent, ids[0], resident)
        beside["memfd_2m_after"] = raw.memfd_punch(size_mib, BLOCK_MIB)
        cold.extra |= {**fixed, "stat_before": stat,
                       "verified_pages": verify_neighbours(agent, size_mib)}

        rounds = [warm_round(vm, agent, size_mib, f"{AGAIN}{i}") for i in range(WARM_ROUNDS)]
        warm, beside["memfd"], beside["memfd_after"] = median_round(
            rounds, fixed["one_chunk_destroy_s"])
        beside["anon"] = raw.anon_dontneed(size_mib)
        warm.extra |= {**fixed, "verified_pages": verify_neighbours(agent, size_mib)}
    return cold, warm, beside, accel


def warm_round(vm: Machine, agent: GuestAgent, size_mib: int,
               name: str) -> tuple[Sample, Sample, Sample]:
    """A second destroy in the VM, bracketed by one-hole punches of the same bytes:
    a new CZone, a container touching ``size_mib`` in it, killed, destroyed."""
    czone = agent.create(cap_mib(size_mib))
    agent.spawn(name, czone, size_mib, thp=False)
    agent.touch(name, size_mib)
    resident = agent.touch(name, 0) * 1024
    agent.kill(name)
    before = raw.memfd_punch(size_mib)
    warm = destroyed(vm, agent, czone, resident)
    return warm, before, raw.memfd_punch(size_mib)


def destroyed(vm: Machine, agent: GuestAgent, czone: int, resident: int) -> Sample:
    answer: dict[str, int] = {}
    before = unplug_requests(vm)
    sample = measure(vm.pid, resident, lambda: answer.update(agent.destroy(czone)))
    sample.extra["destroy"] = answer | {"unplug_requests": unplug_requests(vm) - before}
    return sample


def unplug_requests(vm: Machine) -> int:
    """UNPLUG requests the driver sent so far (its debugfs counter): one per
    run of contiguous blocks, so a destroy's count says how many holes QEMU
    punched."""
    with vm.ssh() as ssh:
        out = ssh.check("cat /sys/kernel/debug/virtio_czone/*/state").stdout
    counts = [int(line.split()[1]) for line in out.splitlines()
              if line.startswith("unplug_requests ")]
    if len(counts) != 1:
        raise CZoneError(f"expected one virtio-czone device's unplug_requests, got {out!r}")
    return counts[0]


def virtio_mem(size_mib: int) -> tuple[Sample, Sample]:
    """Cases 2 and 3: shrink by the container's size, then on until RSS fell that much."""
    dev, dev_id = device_mib(size_mib), MEMORY_DEVICE_ID["virtio-mem"]
    with booted("rcl-vmem", BASE_MIB, memory_mode="virtio-mem", device_memory_mib=dev,
                requested_mib=dev) as (vm, _), agent_in(vm) as agent:
        qmp.wait_size(vm, dev_id, dev * MiB, PLUG_TIMEOUT)
        resident = populate(agent, [0] * 4, size_mib)
        agent.kill(DYING)
        target = dev - size_mib
        shrink = measure(vm.pid, resident, lambda: qmp.set_requested_size(vm, dev_id, target * MiB),
                         lambda: reached(vm, dev_id, target, SHRINK_TIMEOUT))
        size = qmp.device_size(vm, dev_id) // MiB
        shrink.extra |= {"requested_mib": target, "size_mib": size, "reached": size == target,
                         "verified_pages": verify_neighbours(agent, size_mib)}
        until = shrink_until(vm, dev_id, shrink, target, size_mib)
        until.extra["verified_pages"] = verify_neighbours(agent, size_mib)
        # the stepping harness's own cost, reported beside the latency
        until.extra["qmp_rtt_s"] = median_time(lambda _: qmp.device_size(vm, dev_id))
    return shrink, until


def reached(vm: Machine, dev_id: str, mib: int, timeout: float) -> bool:
    # size-change events come at most once a second: poll, or every step of case 3
    # would wait up to a second
    try:
        qmp.wait_size(vm, dev_id, mib * MiB, timeout, poll=0.02)
    except qmp.QmpTimeout:
        return False
    return True


def shrink_until(vm: Machine, dev_id: str, shrink: Sample, start_mib: int,
                 size_mib: int) -> Sample:
    """Case 3: from case 2's state, lower the size in steps until RSS fell by 99% of
    the container.  Latency = the operator's active time: case 2's (request until the
    device had shrunk and RSS stopped falling) plus the steps' (first request until
    RSS stopped falling or the loop gave up); the pause between the two is not counted."""
    want = 0.99 * shrink.resident
    outcome: list[Any] = []

    def steps() -> None:
        outcome.extend(shrink_steps(
            start_mib, step_mib(size_mib),
            enough=lambda: shrink.before - rss_bytes(vm.pid) >= want,
            resize=lambda mib: (qmp.set_requested_size(vm, dev_id, mib * MiB),
                                reached(vm, dev_id, mib, SHRINK_TIMEOUT))[1],
            deadline=time.monotonic() + UNTIL_LIMIT))

    more = measure(vm.pid, shrink.resident, steps)
    requested, why = outcome
    first = max(shrink.latency_s, shrink.extra["done_s"])
    steps_s = max(more.latency_s, more.extra["done_s"]) if requested != start_mib else 0.0
    return Sample(first + steps_s, shrink.before, more.after, shrink.resident,
                  {"requested_mib": requested, "stopped": why, "step_mib": step_mib(size_mib),
                   "steps_s": steps_s,
                   "steps": 1 + (start_mib - requested) // step_mib(size_mib)})


def balloon(size_mib: int) -> tuple[Sample, Sample]:
    """Case 4: free page reporting after the kill, then a balloon inflate by the size."""
    mem = BASE_MIB + device_mib(size_mib)
    with booted("rcl-bal", mem, memory_mode="balloon") as (vm, _), agent_in(vm) as agent:
        resident = populate(agent, [0] * 4, size_mib)
        fpr = measure(vm.pid, resident, lambda: agent.kill(DYING),
                      lambda: time.sleep(FPR_WINDOW))
        fpr.extra |= {"window_s": FPR_WINDOW, "verified_pages": verify_neighbours(agent, size_mib)}
        target = qmp.balloon_actual(vm) - size_mib * MiB
        inflate = measure(vm.pid, resident, lambda: qmp.balloon_target(vm, target),
                          lambda: wait_balloon(vm, target, BALLOON_TIMEOUT))
        inflate.extra |= {"target": target, "actual": qmp.balloon_actual(vm),
                         "verified_pages": verify_neighbours(agent, size_mib)}
    return fpr, inflate


def wait_balloon(vm: Machine, target: int, timeout: float) -> bool:
    try:
        qmp.wait_balloon(vm, target, timeout, poll=0.02)
    except qmp.QmpTimeout:
        return False
    return True
