"""The bridged network's plan: addresses, taps, MACs, names; and the argv it gives."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from czone import netplan
from czone.netplan import NetError, allocate, host_of, nic_at, tap_name
from czone.qemu.cmdline import BASE_APPEND, TapNic, VmSpec, build_argv, kernel_append
from czone.qemu.machine import Machine, VmLaunchError

SPEC = VmSpec(name="vm0", memory_mib=512, cpus=1, kernel=Path("/k/vmlinux"),
              rootfs=Path("/i/rootfs.squashfs"), qemu=Path("/q/qemu-system-x86_64"),
              accel="tcg", ssh_port=2222, run_dir=Path("/run/vm0"))


def test_first_address_and_its_names() -> None:
    nic = allocate([])
    assert nic == TapNic("10.77.0.2/24", "52:54:00:77:00:02")
    assert tap_name(nic.address) == "czt2"
    assert (nic.ip, nic.netmask) == ("10.77.0.2", "255.255.255.0")


def test_lowest_free_address_is_reused() -> None:
    used = ["10.77.0.2/24", "10.77.0.4/24", "10.77.0.3/24"]
    assert allocate(used).address == "10.77.0.5/24"
    assert allocate(["10.77.0.2/24", "10.77.0.4/24"]).address == "10.77.0.3/24"
    # The same records always give the same answer, whatever their order.
    assert allocate(reversed(used)) == allocate(used)


def test_the_last_host_then_a_clear_error() -> None:
    used = [f"10.77.0.{i}/24" for i in range(2, 254)]
    last = allocate(used)
    assert last == TapNic("10.77.0.254/24", "52:54:00:77:00:fe")
    assert tap_name(last.address) == "czt254"
    with pytest.raises(NetError, match=r"no free address left in 10.77.0.0/24: 253 VMs"):
        allocate([*used, last.address])


def test_recorded_addresses_round_trip() -> None:
    for host in (2, 17, 254):
        nic = netplan.nic_for(host)
        assert nic_at(nic.address) == nic and host_of(nic.address) == host
    with pytest.raises(ValueError, match="not in 10.77.0.0/24"):
        host_of("192.168.1.2/24")
    for host in (0, 1, 255):
        with pytest.raises(ValueError):
            netplan.nic_for(host)


def test_namespace_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CZONE_NETNS", raising=False)
    assert netplan.netns_name() == "czone-net"
    monkeypatch.setenv("CZONE_NETNS", "czone-test-1")
    assert netplan.netns_name() == "czone-test-1"
    assert netplan.netns_name("czone-x") == "czone-x"
    for bad in ("net0", "czone-", "czone-a/b", "czone-" + "x" * 41, "../czone-x"):
        with pytest.raises(NetError, match="invalid network namespace name"):
            netplan.netns_name(bad)


def test_net_modes() -> None:
    assert netplan.check_net_mode("user") == "user"
    assert netplan.check_net_mode("bridge") == "bridge"
    with pytest.raises(NetError, match=r"unknown network mode 'tap' \(use one of: user, "
                                       r"bridge\)"):
        netplan.check_net_mode("tap")


@pytest.mark.parametrize("address, mac", [("10.77.0.2", "52:54:00:77:00:02"),
                                          ("fe80::1/64", "52:54:00:77:00:02"),
                                          ("10.77.0.300/24", "52:54:00:77:00:02"),
                                          ("10.77.0.2/24", "52:54:00:77:00")])
def test_malformed_nics_are_refused(address: str, mac: str) -> None:
    with pytest.raises(ValueError):
        TapNic(address, mac)


def test_user_mode_argv_has_no_tap() -> None:
    argv = build_argv(SPEC)
    assert SPEC.net == "user"
    assert not any(a.startswith("tap,") for a in argv)
    assert kernel_append(SPEC) == BASE_APPEND


def test_bridged_argv_keeps_ssh_on_user_mode_and_adds_the_tap() -> None:
    spec = replace(SPEC, tap=replace(allocate([]), fd=7))
    argv = build_argv(spec)
    assert spec.net == "bridge"
    i = argv.index("user,id=n0,hostfwd=tcp:127.0.0.1:2222-:22")
    assert argv[i + 1:i + 3] == ["-device", "virtio-net-pci,netdev=n0,romfile="]
    # The user-mode NIC comes first: the guest calls it eth0 and the tap's NIC eth1.
    assert argv[i + 3:i + 7] == ["-netdev", "tap,id=n1,fd=7", "-device",
                                 "virtio-net-pci,netdev=n1,mac=52:54:00:77:00:02,romfile="]
    append = argv[argv.index("-append") + 1]
    assert append == f"{BASE_APPEND} ip=10.77.0.2:::255.255.255.0::eth1:off"


def test_bridge_without_ssh_forward_is_eth0_and_keeps_extra_append() -> None:
    spec = replace(SPEC, ssh_port=None, tap=nic_at("10.77.0.9/24"), extra_append=" quiet ")
    assert kernel_append(spec) == f"{BASE_APPEND} ip=10.77.0.9:::255.255.255.0::eth0:off quiet"
    argv = build_argv(spec)
    assert not any(a.startswith("user,") for a in argv)
    # Before a launch opens the tap, the argv names the descriptor's place.
    assert "tap,id=n1,fd=TAPFD" in argv


def test_a_launch_without_the_taps_descriptor_is_refused(tmp_path: Path) -> None:
    spec = replace(SPEC, run_dir=tmp_path, tap=allocate([]))
    with pytest.raises(VmLaunchError, match="the bridged NIC has no tap descriptor"):
        Machine(spec).launch()
    assert not (tmp_path / "qemu.log").exists()
