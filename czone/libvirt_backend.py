"""The libvirt backend: a VM is a libvirt domain, defined from
``libvirt_xml.build_xml`` and driven through libvirt-python.

``LibvirtMachine`` is the ``Machine`` of such a VM: the service layer and
the boot sequence use it exactly like a plain QEMU process, but QMP goes
through ``libvirt_qemu.qemuMonitorCommand`` and QMP events through
libvirt's event loop (no monitor socket of ours), the domain's state is
libvirt's, and the shutdown is destroy + undefine.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import queue
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from czone import endpoint
from czone.errors import CZoneError
from czone.guest.ssh import SSHClient
from czone.libvirt_xml import CZONE_NS, build_xml, device_id, domain_name, metadata
from czone.qemu.cmdline import VmSpec
from czone.qemu.machine import Machine, VmLaunchError, tail
from czone.qemu.qmp import QmpCommandError, QmpTimeout

BACKENDS = ("qemu", "libvirt")
DEFAULT_URI = "qemu:///system"
# How long after the domain starts its QEMU process must show (it runs at once).
PID_TIMEOUT = 10.0

_lock = threading.Lock()
_conns: dict[str, Any] = {}
_failed: dict[str, tuple[float, str]] = {}
# Seconds a failed connection is not retried (within one process).
RETRY_AFTER = 5.0
# How long a connection that died (libvirtd restarting) is waited for.
RECONNECT_TIMEOUT = 30.0
RECONNECT_POLL = 0.5
# QMP commands that may run twice: retried once after a lost connection.
IDEMPOTENT_QMP = ("qom-get", "qom-set", "balloon", "query-")
_loop_started = False


class LibvirtError(CZoneError):
    pass


def _libvirt() -> Any:
    try:
        import libvirt  # noqa: PLC0415 (an optional dependency, needed only here)
    except ImportError:
        raise LibvirtError("--backend libvirt needs libvirt-python: "
                           "pip install 'czone[libvirt]'") from None
    return libvirt


def _close_all() -> None:
    """At exit, while libvirt-python can still close them: its virConnect
    finalizer, run after the module is torn down, would print a traceback."""
    with _lock:
        for conn in _conns.values():
            with contextlib.suppress(Exception):
                conn.close()
        _conns.clear()


atexit.register(_close_all)


def _start_event_loop(libvirt: Any) -> None:
    """libvirt's default event loop, in a daemon thread: it must be registered
    before the first connection is opened, and it delivers QMP events."""
    global _loop_started
    if _loop_started:
        return
    libvirt.virEventRegisterDefaultImpl()

    def run() -> None:
        while True:
            libvirt.virEventRunDefaultImpl()

    threading.Thread(target=run, name="libvirt-events", daemon=True).start()
    _loop_started = True


def connect(uri: str) -> Any:
    """This process's connection to ``uri``: opened once; reopened if it died,
    waiting up to ``RECONNECT_TIMEOUT`` for a libvirtd that restarts."""
    libvirt = _libvirt()
    with _lock:
        conn = _conns.get(uri)
        died = conn is not None
        if conn is not None:
            with contextlib.suppress(libvirt.libvirtError):
                if conn.isAlive():
                    return conn
            _conns.pop(uri, None)
        # An URI that just failed fails again at once: status() asks for every
        # record, sometimes under the store's lock, and a remote URI can take
        # long to fail.
        failed = _failed.get(uri)
        if failed is not None and time.monotonic() - failed[0] < RETRY_AFTER:
            raise LibvirtError(failed[1])
        # libvirt prints every error on stderr; ours are raised, one line each.
        libvirt.registerErrorHandler(lambda *_: None, None)
        _start_event_loop(libvirt)
        deadline = time.monotonic() + (RECONNECT_TIMEOUT if died else 0.0)
        while True:
            try:
                conn = libvirt.open(uri)
                break
            except libvirt.libvirtError as e:
                if time.monotonic() < deadline:
                    time.sleep(RECONNECT_POLL)
                    continue
                msg = f"cannot connect to libvirt at {uri}: {e.get_error_message()}"
                if died:
                    msg += f" (the connection broke, and it did not come back within " \
                           f"{RECONNECT_TIMEOUT:.0f}s)"
                _failed[uri] = (time.monotonic(), msg)
                raise LibvirtError(msg) from None
        _failed.pop(uri, None)
        _conns[uri] = conn
        return conn


def _alive(conn: Any) -> bool:
    try:
        return bool(conn.isAlive())
    except Exception:  # libvirtError
        return False


def lookup(uri: str, vm: str) -> Any | None:
    """The domain of VM ``vm``, or None if ``uri`` has none of that name."""
    libvirt = _libvirt()
    try:
        return connect(uri).lookupByName(domain_name(vm))
    except libvirt.libvirtError as e:
        if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return None
        raise LibvirtError(f"libvirt at {uri}: {e.get_error_message()}") from None


def is_ours(dom: Any) -> bool:
    """Whether ``dom`` carries our metadata element (a CZone VM)."""
    libvirt = _libvirt()
    try:
        dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, CZONE_NS)
    except libvirt.libvirtError:
        return False
    return True


def set_records(uri: str, vm: str, fn: str | None, mode: str | None, memory_mode: str,
                containers: list[dict[str, Any]]) -> None:
    """Rewrite our metadata element of VM ``vm``'s domain, live and in its
    definition, with its CZone records."""
    libvirt = _libvirt()
    dom = lookup(uri, vm)
    if dom is None or not is_ours(dom):
        raise LibvirtError(f"no domain {domain_name(vm)} of ours at {uri}")
    el = metadata(vm, fn, mode, memory_mode, containers)
    for e in el.iter():  # libvirt puts the element into CZONE_NS itself
        e.tag = e.tag.rpartition("}")[2]
    xml = ET.tostring(el, encoding="unicode")
    flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG
    if dom.isActive():
        flags |= libvirt.VIR_DOMAIN_AFFECT_LIVE
    try:
        dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, xml, "czone", CZONE_NS, flags)
    except libvirt.libvirtError as e:
        raise LibvirtError(f"domain {dom.name()} at {uri}: {e.get_error_message()}") from None


def records(dom: Any) -> list[dict[str, Any]]:
    """The CZone records in ``dom``'s metadata ([] if it has none)."""
    libvirt = _libvirt()
    try:
        el = ET.fromstring(dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, CZONE_NS))
    except libvirt.libvirtError:
        return []
    return list(json.loads(el.findtext("containers") or "[]"))


def our_domains(uri: str) -> dict[str, bool]:
    """The CZone VMs ``uri`` has domains for (by our metadata), and whether
    each is active."""
    libvirt = _libvirt()
    out = {}
    try:
        for dom in connect(uri).listAllDomains():
            try:
                el = ET.fromstring(dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, CZONE_NS))
            except libvirt.libvirtError:
                continue  # not ours
            out[el.get("name", dom.name())] = bool(dom.isActive())
    except libvirt.libvirtError as e:
        raise LibvirtError(f"libvirt at {uri}: {e.get_error_message()}") from None
    return out


def domain_status(uri: str, vm: str) -> str | None:
    """``running`` or ``dead`` as libvirt sees VM ``vm`` (a domain shut off,
    or gone, is dead); None if libvirt cannot be asked."""
    try:
        dom = lookup(uri, vm)
        return "running" if dom is not None and dom.isActive() else "dead"
    except CZoneError:
        return None
    except Exception as e:  # libvirtError (the module may not be importable)
        if type(e).__name__ == "libvirtError":
            return None
        raise


def remove_domain(uri: str, vm: str, timeout: float = 10.0) -> str:
    """Destroy (SIGTERM, then SIGKILL) and undefine VM ``vm``'s domain, if it is
    ours; idempotent.  Says what it did."""
    libvirt = _libvirt()
    dom = lookup(uri, vm)
    if dom is None:
        return "no domain"
    if not is_ours(dom):
        raise LibvirtError(f"domain {dom.name()} at {uri} is not ours (no CZone metadata); "
                           "not touching it")
    what = "undefined"
    try:
        if dom.isActive():
            # graceful: SIGTERM only, then libvirt's own SIGTERM-SIGKILL
            with contextlib.suppress(libvirt.libvirtError):
                dom.destroyFlags(libvirt.VIR_DOMAIN_DESTROY_GRACEFUL)
            deadline = time.monotonic() + timeout
            while dom.isActive() and time.monotonic() < deadline:
                time.sleep(0.1)
            if dom.isActive():
                dom.destroy()
            what = "destroyed and undefined"
        dom.undefine()
    except libvirt.libvirtError as e:
        if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
            raise LibvirtError(f"domain {domain_name(vm)} at {uri}: "
                               f"{e.get_error_message()}") from None
    return what


def node_free(uri: str) -> int:
    """The free memory of ``uri``'s host in bytes, as libvirt reports it
    (virNodeGetFreeMemory)."""
    libvirt = _libvirt()
    try:
        return int(connect(uri).getFreeMemory())
    except libvirt.libvirtError as e:
        raise LibvirtError(f"libvirt at {uri}: {e.get_error_message()}") from None


def node_info(uri: str) -> dict[str, Any]:
    """``uri``'s host as libvirt describes it: hostname, CPUs, memory, and
    the free memory."""
    libvirt = _libvirt()
    try:
        conn = connect(uri)
        model, mem_mib, cpus, *_ = conn.getInfo()
        return {"hostname": conn.getHostname(), "arch": model, "cpus": cpus,
                "memory_bytes": mem_mib << 20, "free_bytes": int(conn.getFreeMemory()),
                "libvirt": conn.getLibVersion()}
    except libvirt.libvirtError as e:
        raise LibvirtError(f"libvirt at {uri}: {e.get_error_message()}") from None


def domain_rss(uri: str, vm: str) -> int | None:
    """The RSS of VM ``vm``'s QEMU in bytes, as libvirt reports it (any
    host), or None if libvirt cannot say."""
    libvirt = _libvirt()
    try:
        dom = lookup(uri, vm)
        if dom is None or not dom.isActive():
            return None
        rss = dom.memoryStats().get("rss")
    except (libvirt.libvirtError, LibvirtError):
        return None
    return None if rss is None else int(rss) << 10


def qemu_processes(uuid: str) -> list[psutil.Process]:
    """The QEMU processes of the domain with UUID ``uuid`` on this host."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if cmd and "qemu" in Path(cmd[0]).name and any(
                a == "-uuid" and b == uuid for a, b in zip(cmd, cmd[1:], strict=False)):
            found.append(p)
    return found


class LibvirtMachine(Machine):
    """A VM as a libvirt domain at ``uri`` (see the module's doc)."""

    def __init__(self, spec: VmSpec | None, uri: str, ssh_key: Path | None = None, *,
                 name: str | None = None, fn: str | None = None, mode: str | None = None,
                 on_started: Callable[[], None] | None = None, **kw: Any):
        """``on_started``: run once the domain runs, before the guest is
        waited for (the bridged NIC's tap goes onto the bridge)."""
        super().__init__(spec, ssh_key, **kw)
        self._on_started = on_started
        self.uri = uri
        self.name = spec.name if spec is not None else name
        assert self.name is not None
        # Another machine's QEMU: no process or files of it here (czone/endpoint.py).
        self.remote = endpoint.is_remote(uri)
        self.xml = build_xml(spec, fn, mode, self.remote) if spec is not None else ""
        self.argv = []  # libvirtd writes QEMU's argv; `vm up --dry-run` shows the XML
        self._dom: Any = None
        self._stream: Any = None
        self._events: queue.Queue[dict[str, Any]] = queue.Queue()
        self._callback: int | None = None

    @classmethod
    def attach_domain(cls, uri: str, name: str, run_dir: Path, pid: int, proc_start: float,
                      ssh_port: int | None = None, ssh_key: Path | None = None
                      ) -> LibvirtMachine:
        from czone.qemu.machine import live_process  # noqa: PLC0415

        m = cls(None, uri, ssh_key, name=name, run_dir=run_dir, ssh_port=ssh_port,
                proc=live_process(pid, proc_start))
        m._dom = lookup(uri, name)
        return m

    def _launch_error(self, msg: str) -> VmLaunchError:
        err = VmLaunchError(msg, self.argv, "", tail(self.serial_log))
        err.xml = self.xml  # type: ignore[attr-defined]
        return err

    def launch(self, qmp_timeout: float = 15.0) -> None:
        libvirt = _libvirt()
        if self.spec is None:
            raise CZoneError("an attached Machine cannot be launched")
        if self._launched:
            raise CZoneError(f"VM {self.spec.name} was already launched")
        conn = connect(self.uri)
        existing = lookup(self.uri, self.name)
        if existing is not None:
            whose = "ours, left by an earlier czonectl" if is_ours(existing) else \
                "not ours (no CZone metadata)"
            raise LibvirtError(f"a domain named {existing.name()} already exists at {self.uri} "
                               f"({whose}); refusing to overwrite it")
        self._launched = True
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.serial_log.unlink(missing_ok=True)
        try:
            self._dom = conn.defineXML(self.xml)
        except libvirt.libvirtError as e:
            raise self._launch_error(f"libvirt at {self.uri} refused the domain: "
                                     f"{e.get_error_message()}") from None
        try:
            self._create()
            if self.remote:
                self._stream_console()
            else:
                self._proc = self._find_qemu()
            if self._on_started is not None:
                self._on_started()
        except BaseException as e:
            with contextlib.suppress(CZoneError, libvirt.libvirtError):
                remove_domain(self.uri, self.name, timeout=3.0)
            if isinstance(e, libvirt.libvirtError):
                raise self._launch_error(f"libvirt at {self.uri} could not start domain "
                                         f"{self._dom.name()}: {e.get_error_message()}"
                                         ) from None
            raise

    def _create(self) -> None:
        """Start the defined domain.  A call cut off by a libvirtd restart is
        settled by asking the restarted daemon whether the domain runs."""
        libvirt = _libvirt()
        try:
            self._dom.create()
        except libvirt.libvirtError:
            if _alive(self._dom.connect()):
                raise
            dom = self._fresh_dom()  # waits for the daemon to come back
            if dom is None or not dom.isActive():
                raise

    @property
    def pid(self) -> int | None:
        """QEMU's pid; 0 on a remote host, where there is no process of it here."""
        return 0 if self.remote else super().pid

    @property
    def proc_start(self) -> float | None:
        return 0.0 if self.remote else super().proc_start

    def ssh(self) -> SSHClient:
        if self.ssh_port is None or self.ssh_key is None:
            raise CZoneError("this VM has no SSH port or key")
        return endpoint.guest_ssh(self.uri, self.ssh_port, self.ssh_key)

    def _stream_console(self) -> None:
        """A remote domain's console, copied into our serial log as it comes
        (for the boot's markers and the evidence of a failed boot)."""
        libvirt = _libvirt()
        stream = connect(self.uri).newStream(0)
        self._dom.openConsole(None, stream, libvirt.VIR_DOMAIN_CONSOLE_FORCE)
        self._stream = stream

        def pump() -> None:
            with open(self.serial_log, "ab") as log:
                while True:
                    try:
                        data = stream.recv(1 << 16)
                    except libvirt.libvirtError:
                        return
                    if not isinstance(data, bytes) or not data:
                        return
                    log.write(data)
                    log.flush()

        threading.Thread(target=pump, name=f"console-{self.name}", daemon=True).start()

    def _stop_console(self) -> None:
        if self._stream is not None:
            with contextlib.suppress(Exception):
                self._stream.abort()
            self._stream = None

    def _find_qemu(self) -> psutil.Process:
        """The domain's QEMU process (libvirt keeps its pid file where another
        host could not read it; the domain's UUID is on QEMU's command line)."""
        uuid = self._dom.UUIDString()
        deadline = time.monotonic() + PID_TIMEOUT
        while True:
            procs = qemu_processes(uuid)
            if len(procs) == 1:
                return procs[0]
            if time.monotonic() > deadline:
                raise self._launch_error(f"domain {self._dom.name()} (uuid {uuid}) runs "
                                         f"{len(procs)} QEMU processes here, expected one")
            time.sleep(0.1)

    def _fresh_dom(self) -> Any:
        """Our domain handle, looked up again if its connection was replaced
        (libvirtd restarted): a handle lives and dies with its connection,
        and so does the event callback."""
        if self._dom is None or self._dom.connect() is not connect(self.uri):
            self._callback = None
            self._dom = lookup(self.uri, self.name)
        return self._dom

    def is_running(self) -> bool:
        if self._dom is None:
            return False
        try:
            return bool(self._dom.isActive())
        except Exception:  # libvirtError: the daemon went away; ask the process
            return super().is_running()

    def _monitor(self) -> Any:
        if self._dom is not None:
            with contextlib.suppress(CZoneError):
                self._fresh_dom()
        if self._dom is None or not self.is_running():
            raise QmpCommandError(f"domain {domain_name(self.name)} is not running")
        if self._callback is None:
            import libvirt_qemu  # noqa: PLC0415

            def on_event(_conn: Any, _dom: Any, event: str, secs: int, micros: int,
                         details: str | None, _opaque: Any) -> None:
                data = json.loads(details) if details else {}
                self._events.put({"event": event, "data": data,
                                  "timestamp": {"seconds": secs, "microseconds": micros}})

            self._callback = libvirt_qemu.qemuMonitorEventRegister(
                connect(self.uri), self._dom, None, on_event, None, 0)
        return self._dom

    def qmp(self, cmd: str, /, **args: Any) -> Any:
        import libvirt_qemu  # noqa: PLC0415

        libvirt = _libvirt()
        msg = json.dumps({"execute": cmd, **({"arguments": args} if args else {})})
        for attempt in (1, 2):
            dom = self._monitor()
            try:
                reply = json.loads(libvirt_qemu.qemuMonitorCommand(dom, msg, 0))
                break
            except libvirt.libvirtError as e:
                cut = not _alive(dom.connect())
                if cut and attempt == 1 and cmd.startswith(IDEMPOTENT_QMP):
                    continue  # the next _monitor() reconnects
                raise QmpCommandError(
                    f"QMP {cmd} through libvirt at {self.uri} failed: {e.get_error_message()}"
                    + (" (the connection broke: it may or may not have run)" if cut else "")
                ) from None
        if "error" in reply:
            raise QmpCommandError(f"QMP {cmd} failed: {reply['error'].get('desc', reply)}")
        return reply.get("return")

    def wait_event(self, name: str, timeout: float, **match: Any) -> dict[str, Any]:
        self._monitor()
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                event = self._events.get(timeout=left)
            except queue.Empty:
                break
            data = event["data"]
            if event["event"] == name and all(data.get(k) == v for k, v in match.items()):
                return event
        raise QmpTimeout(f"no QMP event {name} {match or ''} within {timeout:.0f}s")

    def resize(self, memory_mode: str, nbytes: int) -> None:
        """Resize a memory device libvirt owns through libvirt, so that its
        view (``dumpxml``) stays true: virtio-mem's ``<requested>``, or the
        balloon's target.  (The czone device is ours: QMP resizes it.)"""
        libvirt = _libvirt()
        dom = self._monitor()
        try:
            if memory_mode == "balloon":
                dom.setMemoryFlags(nbytes >> 10, libvirt.VIR_DOMAIN_AFFECT_LIVE)
                return
            if memory_mode != "virtio-mem":
                raise CZoneError(f"libvirt does not own the {memory_mode} device")
            root = ET.fromstring(dom.XMLDesc(0))
            alias = device_id("virtio-mem")
            for mem in root.iterfind("devices/memory[@model='virtio-mem']"):
                if mem.find(f"alias[@name='{alias}']") is not None:
                    break
            else:
                raise CZoneError(f"domain {dom.name()} has no virtio-mem device {alias}")
            req = mem.find("target/requested")
            assert req is not None
            req.text, req.attrib = str(nbytes >> 10), {"unit": "KiB"}
            dom.updateDeviceFlags(ET.tostring(mem, encoding="unicode"),
                                  libvirt.VIR_DOMAIN_AFFECT_LIVE)
        except libvirt.libvirtError as e:
            raise QmpCommandError(f"resizing the {memory_mode} device of {dom.name()} through "
                                  f"libvirt: {e.get_error_message()}") from None

    def close(self) -> None:
        self._stop_console()
        super().close()

    def _close_qmp(self) -> None:
        if self._callback is not None:
            import libvirt_qemu  # noqa: PLC0415

            with contextlib.suppress(Exception):
                libvirt_qemu.qemuMonitorEventDeregister(connect(self.uri), self._callback)
            self._callback = None

    def _try_quit(self, timeout: float) -> bool:
        return False  # libvirt stops the domain (shutdown below)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Destroy and undefine the domain; idempotent."""
        self._stop_console()
        self._close_qmp()
        self._console.close()
        if self._dom is None and not self._launched:
            return
        remove_domain(self.uri, self.name, timeout)
        self.stopped_by = "destroy"
        self._wait_exit(5.0)

    def kill(self) -> None:
        self.shutdown(timeout=1.0)
