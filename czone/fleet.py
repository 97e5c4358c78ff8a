"""The fleet: libvirt endpoints by name (``czonectl host add NAME URI``), and
which of them a new VM boots on.

A container first goes into a VM of its function wherever that VM runs
(``placement.place``); only a new VM needs a host, and it gets the one with
the most headroom (``placement.choose_host``): the free memory its libvirt
reports, minus what our VMs there were promised and have not touched yet.
A host that does not answer is passed over, with a warning.

Without registered hosts the libvirt backend has one endpoint, ``--connect``
(default qemu:///system); ``--connect`` or ``--host`` pins a VM to one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from czone import libvirt_backend
from czone.errors import CZoneError
from czone.placement import HostView, NoFit, choose_host, unbacked
from czone.state import HostRecord, StateDB, VmRecord, status


class FleetError(CZoneError):
    pass


def promised_mib(vm: VmRecord) -> int:
    """What VM ``vm`` may come to use: its boot memory, plus its device's
    requested size (the balloon's VM has all of it as boot memory)."""
    grows = vm.memory_mode in ("czone", "virtio-mem")
    return vm.memory_mib + (vm.requested_mib if grows else 0)


def host_view(db: StateDB, host: HostRecord) -> HostView:
    """``host`` as placement sees it (LibvirtError if it does not answer)."""
    free = libvirt_backend.node_free(host.uri)
    vms = [v for v in db.list()
           if v.backend == "libvirt" and v.uri == host.uri and status(v) != "dead"]
    promised = sum(unbacked(promised_mib(v), libvirt_backend.domain_rss(host.uri, v.name))
                   for v in vms)
    return HostView(host.name, free, promised, len(vms))


def boot_host(db: StateDB, hosts: list[HostRecord],
              progress: Callable[[str], None]) -> HostRecord:
    """The host of ``hosts`` a new VM boots on."""
    if len(hosts) == 1:
        libvirt_backend.connect(hosts[0].uri)  # an unreachable URI fails before any record
        return hosts[0]
    views = []
    for h in hosts:
        try:
            views.append(host_view(db, h))
        except CZoneError as e:
            progress(f"warning: host {h.name} is passed over: {e}")
    try:
        name = choose_host(views)
    except NoFit:
        raise FleetError(f"no host answers ({', '.join(h.name for h in hosts)})") from None
    return next(h for h in hosts if h.name == name)


def describe(db: StateDB, host: HostRecord) -> dict[str, Any]:
    """``host list``: the host, whether it answers, its node and our VMs there."""
    vms = [v.name for v in db.list() if v.backend == "libvirt" and v.uri == host.uri]
    out: dict[str, Any] = {**host.to_dict(), "vms": vms}
    try:
        out.update(libvirt_backend.node_info(host.uri), reachable=True)
        out["headroom_bytes"] = host_view(db, host).headroom
    except CZoneError as e:
        out.update(reachable=False, error=str(e))
    return out
