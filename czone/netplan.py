"""The bridged network's plan: which namespace, which address, tap and MAC a
VM gets.  Pure: the service layer allocates under the state store's lock
and records the result; ``czone/bridge.py`` makes it real with pyroute2.

Every bridged VM sits in one /24 inside a network namespace of its own
(``CZONE_NETNS``), so the subnet can never clash with the host's networks.
Host number ``i`` (2-254) gives the VM address ``10.77.0.i``, the tap
``czt<i>`` and the MAC ``52:54:00:77:00:<i>``: one number names all three,
so recovery can find a VM's tap from its record alone.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
from collections.abc import Iterable

from czone.errors import CZoneError
from czone.qemu.cmdline import NET_MODES, TapNic

SUBNET = ipaddress.ip_network("10.77.0.0/24")
# The bridge's own address in the namespace: what a client on the bridge
# (the tests, or an operator's process in the namespace) connects from.
BRIDGE_ADDRESS = f"{SUBNET.network_address + 1}/{SUBNET.prefixlen}"
BRIDGE = "czbr0"
FIRST_HOST, LAST_HOST = 2, SUBNET.num_addresses - 2
TAP_PREFIX = "czt"
DEFAULT_NETNS = "czone-net"
NETNS_ENV = "CZONE_NETNS"
# `czone-` and then what a file name and `ip netns` accept.
NETNS_RE = re.compile(r"czone-[A-Za-z0-9_.-]{1,40}")

NET_HELP = ("user: QEMU's user-mode network only; bridge: also a NIC with a static address "
            f"on a bridge in network namespace $CZONE_NETNS (default {DEFAULT_NETNS}), "
            "which needs root.  SSH goes through user mode either way.")


class NetError(CZoneError):
    pass


def check_net_mode(net: str) -> str:
    if net not in NET_MODES:
        raise NetError(f"unknown network mode {net!r} (use one of: {', '.join(NET_MODES)})")
    return net


def netns_name(name: str | None = None) -> str:
    """The namespace czonectl owns: ``name``, else $CZONE_NETNS, else the default."""
    name = name or os.environ.get(NETNS_ENV) or DEFAULT_NETNS
    if not NETNS_RE.fullmatch(name):
        raise NetError(f"invalid network namespace name {name!r}: it must start with "
                       "'czone-' followed by 1-40 letters, digits, '_', '.' or '-'")
    return name


def nic_for(host: int) -> TapNic:
    if not FIRST_HOST <= host <= LAST_HOST:
        raise ValueError(f"host number {host} outside {FIRST_HOST}-{LAST_HOST}")
    return TapNic(f"{SUBNET.network_address + host}/{SUBNET.prefixlen}",
                  f"52:54:00:77:{host >> 8:02x}:{host & 0xFF:02x}")


def nic_at(address: str) -> TapNic:
    """The NIC of a recorded address."""
    return nic_for(host_of(address))


def host_of(address: str) -> int:
    """The host number of a VM address in ``SUBNET``."""
    ip = ipaddress.ip_interface(address).ip
    if ip not in SUBNET:
        raise ValueError(f"{address} is not in {SUBNET}")
    return int(ip) - int(SUBNET.network_address)


def tap_name(address: str) -> str:
    return f"{TAP_PREFIX}{host_of(address)}"


def staging_tap_name(run_dir: str | os.PathLike[str]) -> str:
    """The name a libvirt VM's tap has in the host's namespace, where libvirtd
    opens it, before czonectl moves it into its namespace as ``tap_name``:
    unique per VM *and* per state store (the VM's run dir, which is under
    the store's root), within IFNAMSIZ."""
    return "czl" + hashlib.sha1(str(run_dir).encode()).hexdigest()[:10]


def allocate(used: Iterable[str]) -> TapNic:
    """The lowest free address, given the addresses (CIDR) already recorded."""
    taken = {host_of(a) for a in used}
    for host in range(FIRST_HOST, LAST_HOST + 1):
        if host not in taken:
            return nic_for(host)
    raise NetError(f"no free address left in {SUBNET}: {len(taken)} VMs hold one; "
                   "`czonectl vm down` some, or use --net user")
