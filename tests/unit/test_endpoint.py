"""Which libvirt URIs are another machine, and what a remote domain keeps
out of our run dir."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from czone import endpoint
from czone.libvirt_xml import build_xml
from czone.qemu.cmdline import VmSpec


@pytest.mark.parametrize(("uri", "remote"), [
    ("qemu:///system", False),
    ("qemu:///system?socket=/tmp/x/libvirt-sock", False),
    ("qemu+tcp://127.0.0.1:16509/system", False),
    ("qemu+tcp://localhost/system", False),
    ("qemu+tcp://host2/system", True),
    ("qemu+ssh://root@host2/system", True),
    # ssh is how czonectl reaches another machine, even one that is this one
    ("qemu+ssh://root@127.0.0.1:2222/system?keyfile=/k&no_verify=1", True),
])
def test_remote(uri: str, remote: bool) -> None:
    assert endpoint.is_remote(uri) is remote


def test_parse() -> None:
    ep = endpoint.parse("qemu+ssh://ops@host2:2222/system?keyfile=/k&no_verify=1")
    assert ep is not None
    assert (ep.transport, ep.host, ep.port, ep.user) == ("ssh", "host2", 2222, "ops")
    assert ep.params == {"keyfile": "/k", "no_verify": "1"}
    assert endpoint.parse(None) is None
    with pytest.raises(endpoint.EndpointError, match="bad port"):
        endpoint.parse("qemu+ssh://h:99999999/system")


def test_guest_ssh_tunnels_only_to_remote_hosts(tmp_path: Path) -> None:
    local = endpoint.guest_ssh("qemu:///system", 2201, tmp_path / "k")
    assert (local.host, local.port, local._sock) == ("127.0.0.1", 2201, None)
    remote = endpoint.guest_ssh("qemu+ssh://root@host2/system", 2201, tmp_path / "k")
    assert remote.host == "host2" and remote._sock is not None


def test_a_remote_domain_keeps_nothing_in_our_run_dir(tmp_path: Path) -> None:
    spec = VmSpec(name="r1", run_dir=tmp_path / "r1", kernel=Path("/k"), rootfs=Path("/i"),
                  qemu=Path("/q"), accel="tcg", memory_mode="czone", device_memory_mib=512,
                  requested_mib=256, ssh_port=2201, memory_mib=512, cpus=1)
    local, remote = (ET.fromstring(build_xml(spec, remote=r)) for r in (False, True))
    assert str(tmp_path) in ET.tostring(local, encoding="unicode")
    assert str(tmp_path) not in ET.tostring(remote, encoding="unicode")
    serial = remote.find("devices/serial")
    assert serial is not None and serial.get("type") == "pty"
    assert serial.find("log").get("file") == "/var/log/libvirt/qemu/czone-r1.serial.log"


def test_known_hosts_are_read_only_and_odd_lines_skipped(tmp_path: Path) -> None:
    import paramiko

    known = tmp_path / "known_hosts"
    text = ("# a comment\n"
            "@cert-authority *.example.com ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKk1\n"
            "[127.0.0.1]:2222 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLs"
            "abgH5C9okWi0dh2l9GKJl\n"
            "not a host key line\n")
    known.write_text(text)
    keys = paramiko.HostKeys()
    endpoint._load_known(keys, known)
    assert list(keys.keys()) == ["[127.0.0.1]:2222"]
    endpoint._load_known(keys, tmp_path / "missing")  # no file: nothing, no error
    assert known.read_text() == text
