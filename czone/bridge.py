"""Bridged networking, made real with pyroute2: a network namespace czonectl
owns, a bridge in it, and one tap per VM (the plan is ``czone/netplan.py``).

QEMU stays in the host's namespace.  czonectl opens the VM's tap from a
thread that entered the namespace (a network namespace is per thread, and a
tun file belongs to the namespace it was opened in), and QEMU inherits the
descriptor (``-netdev tap,fd=N``).  The tap is then made non-persistent, so
its lifetime is QEMU's: a QEMU that dies, however, takes its tap with it.
The bridge and the namespace are removed when the last bridged VM goes.

A namespace is czonectl's if the state store's ``netns/<name>`` marker says
so; the marker is written before the namespace is made and removed after it
is gone, and a namespace of that name without a marker is never touched.
Namespace changes are serialized by ``netns/<name>.lock``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import stat
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from pyroute2 import IPRoute, netns
from pyroute2.netlink.exceptions import NetlinkError

from czone.errors import CZoneError
from czone.locking import LockTimeout, flock_within
from czone.netplan import BRIDGE, BRIDGE_ADDRESS, tap_name
from czone.qemu.cmdline import TapNic

TUN_PATH = Path("/dev/net/tun")
PROC_STATUS = Path("/proc/self/status")
# Capability bits: creating links needs CAP_NET_ADMIN, setns() and the
# namespace's bind mount need CAP_SYS_ADMIN.
NEEDED_CAPS = {"CAP_NET_ADMIN": 12, "CAP_SYS_ADMIN": 21}
# linux/if_tun.h
IFF_TAP, IFF_NO_PI = 0x0002, 0x1000
TUNSETIFF, TUNSETPERSIST = 0x400454CA, 0x400454CB
NS_TIMEOUT = 30.0
LOCK_TIMEOUT = 60.0

T = TypeVar("T")


class BridgeError(CZoneError):
    pass


@contextlib.contextmanager
def _failures(what: str) -> Iterator[None]:
    """Netlink and OS failures as one line that says what was being done."""
    try:
        yield
    except (NetlinkError, OSError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise BridgeError(f"{what}: {why}") from None


def _effective_caps() -> int:
    for line in PROC_STATUS.read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def preflight() -> None:
    """What bridged networking needs of this host, each missing piece as one line."""
    caps = _effective_caps()
    missing = [name for name, bit in NEEDED_CAPS.items() if not caps >> bit & 1]
    if missing:
        raise BridgeError(f"--net bridge needs root ({' and '.join(missing)} missing) to "
                          "create its network namespace, bridge and taps; run czonectl as "
                          "root or use --net user")
    try:
        is_chr = stat.S_ISCHR(os.stat(TUN_PATH).st_mode)
    except OSError:
        is_chr = False
    if not is_chr:
        raise BridgeError(f"--net bridge needs the tun device {TUN_PATH}, which this host "
                          "does not have (modprobe tun); or use --net user")


def exists(name: str) -> bool:
    return name in netns.listnetns()


def in_netns(name: str, fn: Callable[[], T], timeout: float = NS_TIMEOUT) -> T:
    """``fn()`` in a thread that entered namespace ``name`` (which must exist):
    sockets and tun files it opens belong to that namespace, while this
    process and its other threads stay where they are."""
    result: list[Any] = []

    def run() -> None:
        try:
            netns.setns(name, flags=0)  # flags=0: never create it
            result.append((True, fn()))
        except BaseException as e:  # handed to the caller
            result.append((False, e))

    t = threading.Thread(target=run, name=f"netns-{name}", daemon=True)
    t.start()
    t.join(timeout)
    if not result:
        raise BridgeError(f"no answer from network namespace {name} within {timeout:.0f}s")
    ok, value = result[0]
    if not ok:
        if isinstance(value, OSError) and value.errno == errno.ENOENT:
            raise BridgeError(f"network namespace {name} does not exist") from None
        raise value
    return value


class Namespace:
    """Namespace ``name`` as the state store under ``root`` knows it."""

    def __init__(self, name: str, root: Path):
        self.name = name
        self.dir = root / "netns"
        self.marker = self.dir / name

    def ours(self) -> bool:
        return self.marker.exists()

    @contextlib.contextmanager
    def locked(self, timeout: float = LOCK_TIMEOUT) -> Iterator[None]:
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / f"{self.name}.lock", "w") as f:
            try:
                flock_within(f, timeout)
            except LockTimeout as e:
                raise BridgeError(f"the lock of network namespace {self.name} is {e}") from None
            yield

    def _netlink(self, what: str, fn: Callable[[IPRoute], T]) -> T:
        """``fn`` with a route socket opened inside the namespace, from a thread
        that entered it.  Not ``IPRoute(netns=...)``: that forks a helper and
        stops it with SIGTERM, and a fork of czonectl that catches SIGTERM
        (to unwind like Ctrl-C) would run on as a copy of czonectl."""
        def run() -> T:
            with IPRoute() as ipr:
                return fn(ipr)

        with _failures(what):
            return in_netns(self.name, run)

    def ensure(self) -> None:
        """The namespace with its bridge up at ``BRIDGE_ADDRESS`` (call locked)."""
        if exists(self.name):
            if not self.ours():
                raise BridgeError(f"network namespace {self.name} exists but czonectl did not "
                                  f"create it (no {self.marker}); set CZONE_NETNS to another "
                                  "name")
        else:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.marker.write_text(f"{os.getpid()}\n")
            with _failures(f"cannot create network namespace {self.name}"):
                netns.create(self.name)
        self._netlink(f"cannot set up the bridge in network namespace {self.name}", _bridge_up)

    def open_tap(self, nic: TapNic) -> int:
        """Create the tap of ``nic`` on the bridge and return a descriptor on it
        for QEMU; the tap lives as long as that descriptor (call locked, after
        ``ensure``).  A leftover of that name (a launch cut short) is replaced:
        the address is this VM's, so no other VM has that tap."""
        name = tap_name(nic.address)
        return self._netlink(f"cannot create tap {name} in network namespace {self.name}",
                             lambda ipr: _tap_up(ipr, name))

    def adopt_tap(self, staged: str, name: str) -> None:
        """Move tap ``staged`` (made by ``stage_tap``, opened by libvirtd's
        QEMU) from the host's namespace into this one as ``name``, on the
        bridge and up (call locked, after ``ensure``).  QEMU keeps its
        descriptor: a tap's queue follows the device."""
        with _failures(f"cannot move tap {staged} into network namespace {self.name}"), \
                IPRoute() as ipr:
            found = ipr.link_lookup(ifname=staged)
            if not found:
                raise BridgeError(f"tap {staged} is gone from the host's namespace")
            self._netlink(f"cannot clear tap {name} in network namespace {self.name}",
                          lambda ns: _delete_link(ns, name))
            ipr.link("set", index=found[0], net_ns_fd=self.name, ifname=name)
        self._netlink(f"cannot put tap {name} on the bridge in network namespace {self.name}",
                      lambda ipr: _enslave(ipr, name))

    def delete_tap(self, name: str) -> bool:
        """Delete tap ``name`` if the namespace has it; True if it was there."""
        if not exists(self.name):
            return False
        return self._netlink(f"cannot delete tap {name} in network namespace {self.name}",
                             lambda ipr: _delete_link(ipr, name))

    def remove(self) -> bool:
        """Remove the namespace (and with it the bridge) if it is ours (call
        locked, once no VM uses it); True if it was there."""
        if not self.ours():
            return False
        there = exists(self.name)
        if there:
            with _failures(f"cannot remove network namespace {self.name}"):
                netns.remove(self.name)
        self.marker.unlink(missing_ok=True)
        return there

    def links(self) -> dict[str, dict[str, Any]]:
        """Name -> ``index``, ``master`` (index or None), ``state``, ``mac``."""
        def dump(ipr: IPRoute) -> dict[str, dict[str, Any]]:
            return {m.get("ifname"): {"index": m["index"], "master": m.get("master"),
                                      "state": m.get("state"), "mac": m.get("address")}
                    for m in ipr.link("dump")}

        return self._netlink(f"cannot list the links of network namespace {self.name}", dump)


def _bridge_up(ipr: IPRoute) -> None:
    ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
    if not ipr.link_lookup(ifname=BRIDGE):
        ipr.link("add", ifname=BRIDGE, kind="bridge")
    br = ipr.link_lookup(ifname=BRIDGE)[0]
    ip, _, prefix = BRIDGE_ADDRESS.partition("/")
    if not any(a.get("address") == ip for a in ipr.addr("dump", index=br)):
        ipr.addr("add", index=br, address=ip, prefixlen=int(prefix))
    ipr.link("set", index=br, state="up")


def _delete_link(ipr: IPRoute, name: str) -> bool:
    found = ipr.link_lookup(ifname=name)
    if not found:
        return False
    try:
        ipr.link("del", index=found[0])
    except NetlinkError as e:
        if e.code != errno.ENODEV:  # gone meanwhile (its QEMU exited)
            raise
    return True


def stage_tap(name: str) -> None:
    """A persistent tap ``name`` in the host's namespace, for libvirtd to open
    (a leftover of that name, a launch cut short, is replaced)."""
    with _failures(f"cannot create tap {name} in the host's namespace"), IPRoute() as ipr:
        _delete_link(ipr, name)
        ipr.link("add", ifname=name, kind="tuntap", mode="tap")


def unstage_tap(name: str) -> bool:
    """Delete tap ``name`` from the host's namespace; True if it was there."""
    with _failures(f"cannot delete tap {name} in the host's namespace"), IPRoute() as ipr:
        return _delete_link(ipr, name)


def _enslave(ipr: IPRoute, name: str) -> None:
    ipr.link("set", index=ipr.link_lookup(ifname=name)[0],
             master=ipr.link_lookup(ifname=BRIDGE)[0], state="up")


def _tap_up(ipr: IPRoute, name: str) -> int:
    """Tap ``name`` made by pyroute2 (in this thread's namespace), opened,
    enslaved to the bridge and up: the descriptor."""
    _delete_link(ipr, name)
    ipr.link("add", ifname=name, kind="tuntap", mode="tap")
    fd = None
    try:
        fd = _attach(name)
        _enslave(ipr, name)
    except BaseException:
        if fd is not None:
            os.close(fd)
        with contextlib.suppress(NetlinkError, OSError):
            _delete_link(ipr, name)
        raise
    return fd


def _attach(name: str) -> int:
    """Open tap ``name`` in this thread's namespace; no longer persistent, it
    goes with the last descriptor."""
    fd = os.open(TUN_PATH, os.O_RDWR | os.O_CLOEXEC)
    try:
        ifr = struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI)
        fcntl.ioctl(fd, TUNSETIFF, ifr)
        fcntl.ioctl(fd, TUNSETPERSIST, 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


def connect(name: str, host: str, port: int, timeout: float = 10.0) -> socket.socket:
    """A TCP connection from inside namespace ``name`` (from the bridge's side)."""
    sock = in_netns(name, lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
    sock.settimeout(timeout)
    try:
        sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return sock
