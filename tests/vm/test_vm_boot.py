"""Boot our kernel and image under QEMU and look at the guest."""

from __future__ import annotations

import re

import psutil
import pytest

from czone.guest.ssh import SshTimeout
from czone.qemu.cmdline import INIT_MARKER, READY_MARKER, kernel_append
from czone.qemu.machine import Machine, VmLaunchError

pytestmark = pytest.mark.vm


def test_guest_booted_our_command_line_then_init_then_sshd(booted_vm: Machine) -> None:
    assert booted_vm.spec is not None
    console = booted_vm.serial_log.read_text(errors="replace")
    [cmdline] = re.findall(r"^\[[ \d.]+\] Command line: (.*)$", console, re.M)
    assert cmdline.strip() == kernel_append(booted_vm.spec)
    assert console.index("Command line:") < console.index(INIT_MARKER) \
        < console.index(READY_MARKER)


def test_uname_is_czone_kernel(booted_vm: Machine, artifacts) -> None:
    with booted_vm.ssh() as ssh:
        release = ssh.check("uname -r").stdout.strip()
    assert "-czone" in release
    if artifacts.kernel.release != "external":
        assert release == artifacts.kernel.release


def test_zoneinfo_lists_zones(booted_vm: Machine) -> None:
    with booted_vm.ssh() as ssh:
        zoneinfo = ssh.check("cat /proc/zoneinfo").stdout
    zones = re.findall(r"^Node \d+, zone\s+(\S+)", zoneinfo, re.M)
    assert "Normal" in zones, zones
    assert set(zones) <= {"DMA", "DMA32", "Normal", "Movable", "Device"}, zones


def test_qmp_query_status(booted_vm: Machine) -> None:
    status = booted_vm.qmp("query-status")
    assert status["status"] == "running" and status["running"] is True


def test_guest_command_rc_and_streams(booted_vm: Machine) -> None:
    with booted_vm.ssh() as ssh:
        r = ssh.run("echo out; echo err >&2; exit 7", timeout=30)
    assert (r.rc, r.stdout, r.stderr) == (7, "out\n", "err\n")


def test_shutdown_is_staged_and_idempotent(booted_vm: Machine) -> None:
    pid = booted_vm.pid
    booted_vm.shutdown(timeout=20)
    assert not booted_vm.is_running() and not psutil.pid_exists(pid)
    # QMP quit ended QEMU, not the SIGTERM stage after it.
    assert (booted_vm.stopped_by, booted_vm.returncode) == ("quit", 0)
    assert "terminating on signal" not in booted_vm.qemu_log.read_text()
    booted_vm.shutdown(timeout=1)
    assert booted_vm.stopped_by == "quit"


def test_bogus_qemu_arg_raises_with_stderr(microvm_factory) -> None:
    vm = microvm_factory.build(extra_args=("-bogus-czone-option",))
    with pytest.raises(VmLaunchError) as ei:
        vm.launch()
    assert "-bogus-czone-option" in ei.value.qemu_log
    assert "-bogus-czone-option" in str(ei.value)
    assert not vm.is_running()


def test_ssh_timeout_shows_serial_tail(microvm_factory) -> None:
    vm = microvm_factory.build()
    vm.launch()
    with pytest.raises(SshTimeout, match="serial console"):
        vm.wait_ssh(timeout=0.5)
    vm.wait_for_console("Linux version", 60)
