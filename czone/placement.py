"""Where a new container goes: a pure policy over a snapshot of the VMs.

MCPV (one VM per function, many containers in it):
  1. the function's VM that already has room (requested size minus what its
     containers may use) takes it;
  2. otherwise a VM of the function grows: its requested size goes up, in
     whole device blocks, within the device's maximum;
  3. otherwise a new VM boots.
The MCPV baselines (``mcpv-virtio-mem``, ``mcpv-balloon``) place the same
way; their VMs grow and shrink by virtio-mem or the balloon instead.
SCPV (the baselines): every container gets a VM of its own.
A container goes only into a VM of the network mode it asks for: a bridged
container must be reachable on the bridge.

Memory is counted by the containers' caps, not their current use: a cap is
what a container may grow to, and the device must be able to back it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from czone.errors import CZoneError

Mode = Literal["mcpv", "mcpv-virtio-mem", "mcpv-balloon", "scpv-template", "scpv-snapshot"]
MODES: tuple[Mode, ...] = ("mcpv", "mcpv-virtio-mem", "mcpv-balloon", "scpv-template",
                           "scpv-snapshot")
MCPV_MODES: tuple[Mode, ...] = ("mcpv", "mcpv-virtio-mem", "mcpv-balloon")


class NoFit(CZoneError):
    pass


@dataclass(frozen=True)
class VmView:
    name: str
    fn: str
    mode: Mode
    requested_mib: int
    max_mib: int
    placed_mib: int
    usable: bool = True  # False: dead or being torn down
    net: str = "user"


@dataclass(frozen=True)
class Decision:
    action: Literal["place", "grow", "boot"]
    vm: str | None = None
    # The VM's requested size after the decision (grow and boot).
    requested_mib: int = 0


def round_up(mib: int, block_mib: int) -> int:
    return -(-mib // block_mib) * block_mib


def place(fn: str, memory_mib: int, mode: Mode, vms: Iterable[VmView], max_mib: int,
          block_mib: int, net: str = "user") -> Decision:
    """The decision for one container of ``fn`` with cap ``memory_mib``."""
    if memory_mib <= 0:
        raise NoFit(f"memory must be positive, not {memory_mib} MiB")
    if memory_mib > max_mib:
        raise NoFit(f"{memory_mib} MiB is more than a VM can hold ({max_mib} MiB)")
    if mode not in MCPV_MODES:
        return Decision("boot", requested_mib=round_up(memory_mib, block_mib))
    mine = sorted((v for v in vms
                   if v.usable and v.fn == fn and v.mode == mode and v.net == net),
                  key=lambda v: v.name)
    for vm in mine:
        if vm.placed_mib + memory_mib <= vm.requested_mib:
            return Decision("place", vm.name, vm.requested_mib)
    for vm in mine:
        want = round_up(vm.placed_mib + memory_mib, block_mib)
        if want <= vm.max_mib:
            return Decision("grow", vm.name, max(want, vm.requested_mib))
    return Decision("boot", requested_mib=round_up(memory_mib, block_mib))


# Free memory moves by more than this between two reads on a busy host:
# headrooms this close count as equal.
HEADROOM_NOISE = 128 << 20


@dataclass(frozen=True)
class HostView:
    """A libvirt endpoint as placement sees it: the free memory libvirt
    reports, what our VMs there were promised but have not touched yet
    (their boot memory and requested device size, minus their RSS), and how
    many of our VMs it runs."""

    name: str
    free_bytes: int
    promised_bytes: int = 0
    vms: int = 0

    @property
    def headroom(self) -> int:
        return self.free_bytes - self.promised_bytes


def choose_host(hosts: Iterable[HostView]) -> str:
    """The host a new VM boots on: the most headroom; among hosts within
    ``HEADROOM_NOISE`` of it, the one with the fewest of our VMs, then the
    first name.  A VM that has just booted has touched little of its memory,
    so free memory alone would send the next VM to the same host; and two
    endpoints of one machine report the same free memory."""
    hosts = list(hosts)
    if not hosts:
        raise NoFit("no host of the fleet answers")
    top = max(h.headroom for h in hosts)
    return min((h for h in hosts if top - h.headroom <= HEADROOM_NOISE),
               key=lambda h: (h.vms, h.name)).name


def unbacked(promised_mib: int, rss_bytes: int | None) -> int:
    """What a VM may still take from its host: its promise minus its RSS
    (the whole promise if the RSS is unknown)."""
    return max(0, (promised_mib << 20) - (rss_bytes or 0))
