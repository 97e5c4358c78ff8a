from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from czone.qemu.cmdline import BASE_APPEND, MEMORY_DEVICE_ID, VmSpec, build_argv

SPEC = VmSpec(name="vm0", memory_mib=512, cpus=2, kernel=Path("/k/vmlinux"),
              rootfs=Path("/i/rootfs.squashfs"), qemu=Path("/q/qemu-system-x86_64"),
              accel="tcg", ssh_port=2222, run_dir=Path("/run/vm0"),
              firmware_dirs=(Path("/usr/share/qemu"), Path("/usr/share/seabios")))


def pairs(argv: list[str]) -> list[tuple[str, str]]:
    return list(zip(argv, argv[1:], strict=False))


def test_exact_args() -> None:
    argv = build_argv(SPEC)
    assert argv[0] == "/q/qemu-system-x86_64"
    p = pairs(argv)
    for pair in [("-M", "q35"), ("-accel", "tcg,thread=single"), ("-cpu", "max"), ("-smp", "2"),
                 ("-m", "512M,slots=8,maxmem=4608M"), ("-kernel", "/k/vmlinux"),
                 ("-L", "/usr/share/qemu"), ("-L", "/usr/share/seabios"),
                 ("-drive", "file=/i/rootfs.squashfs,if=none,id=root,format=raw,readonly=on"),
                 ("-device", "virtio-blk-pci,drive=root"),
                 ("-netdev", "user,id=n0,hostfwd=tcp:127.0.0.1:2222-:22"),
                 ("-device", "virtio-net-pci,netdev=n0,romfile="),
                 ("-display", "none"),
                 ("-chardev", "file,id=serial0,path=/run/vm0/serial.log"),
                 ("-serial", "chardev:serial0"),
                 ("-chardev", "socket,id=qmp0,path=/run/vm0/qmp.sock,server=on,wait=off"),
                 ("-mon", "chardev=qmp0,mode=control")]:
        assert pair in p, pair
    for flag in ("-nodefaults", "-no-user-config", "-no-reboot"):
        assert flag in argv
    assert "-nographic" not in argv


def test_append() -> None:
    append = build_argv(replace(SPEC, extra_append="quiet foo=1"))
    value = append[append.index("-append") + 1]
    assert value == BASE_APPEND + " quiet foo=1"
    for word in ("console=ttyS0", "root=/dev/vda", "ro", "rootfstype=squashfs",
                 "init=/sbin/czone-init", "memhp_default_state=online_movable", "panic=-1"):
        assert word in value.split()


def test_kvm_uses_host_cpu() -> None:
    p = pairs(build_argv(replace(SPEC, accel="kvm")))
    assert ("-accel", "kvm") in p and ("-cpu", "host") in p


def test_no_ssh_port_no_network() -> None:
    argv = build_argv(replace(SPEC, ssh_port=None))
    assert "-netdev" not in argv and not any(a.startswith("virtio-net") for a in argv)


def test_extra_args_last_and_maxmem() -> None:
    argv = build_argv(replace(SPEC, extra_args=("-foo", "bar"), max_memory_mib=8192,
                              memory_slots=4))
    assert argv[-2:] == ["-foo", "bar"]
    assert ("-m", "512M,slots=4,maxmem=8192M") in pairs(argv)


def test_commas_escaped() -> None:
    argv = build_argv(replace(SPEC, run_dir=Path("/r,x"), rootfs=Path("/a,b.img")))
    assert "file=/a,,b.img,if=none,id=root,format=raw,readonly=on" in argv
    assert "file,id=serial0,path=/r,,x/serial.log" in argv


def test_argv_is_the_spec_and_nothing_else(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole command line, in order, wherever and however it is built."""
    monkeypatch.chdir(tmp_path)
    for var in ("CZONE_QEMU", "CZONE_KERNEL", "CZONE_CACHE", "CZONE_RUN", "CZONE_ACCEL"):
        monkeypatch.setenv(var, str(tmp_path / "elsewhere"))
    assert build_argv(SPEC) == [
        "/q/qemu-system-x86_64", "-name", "czone-vm0",
        "-nodefaults", "-no-user-config", "-no-reboot",
        "-L", "/usr/share/qemu", "-L", "/usr/share/seabios",
        "-M", "q35", "-accel", "tcg,thread=single", "-cpu", "max", "-smp", "2",
        "-global", "ICH9-LPC.disable_s3=1", "-global", "ICH9-LPC.disable_s4=1",
        "-m", "512M,slots=8,maxmem=4608M",
        "-kernel", "/k/vmlinux", "-append", BASE_APPEND,
        "-drive", "file=/i/rootfs.squashfs,if=none,id=root,format=raw,readonly=on",
        "-device", "virtio-blk-pci,drive=root",
        "-netdev", "user,id=n0,hostfwd=tcp:127.0.0.1:2222-:22",
        "-device", "virtio-net-pci,netdev=n0,romfile=",
        "-display", "none",
        "-chardev", "file,id=serial0,path=/run/vm0/serial.log", "-serial", "chardev:serial0",
        # qmp0 serves later czonectl processes; qmp1 connects to the launcher.
        "-chardev", "socket,id=qmp0,path=/run/vm0/qmp.sock,server=on,wait=off",
        "-mon", "chardev=qmp0,mode=control",
        "-chardev", "socket,id=qmp1,path=/run/vm0/qmp-launch.sock,server=off",
        "-mon", "chardev=qmp1,mode=control",
    ]


@pytest.mark.parametrize("change", [{"memory_mib": 0}, {"cpus": 0}, {"accel": "hvf"},
                                    {"max_memory_mib": 100}])
def test_invalid_spec(change: dict) -> None:
    with pytest.raises(ValueError):
        replace(SPEC, **change)


def test_no_memory_device_by_default():
    argv = build_argv(SPEC)
    assert not any("virtio-mem" in a or "virtio-czone" in a or "balloon" in a for a in argv)


@pytest.mark.parametrize("mode,device", [("czone", "virtio-czone-pci"),
                                         ("virtio-mem", "virtio-mem-pci")])
def test_hotplug_memory_modes(mode, device):
    spec = replace(SPEC, memory_mode=mode, device_memory_mib=1024, requested_mib=256)
    argv = build_argv(spec)
    dev_id = MEMORY_DEVICE_ID[mode]
    assert f"memory-backend-memfd,id=mem-{dev_id},size=1024M" in argv
    assert (f"{device},id={dev_id},memdev=mem-{dev_id},block-size=2M,"
            "requested-size=256M") in argv
    assert "512M,slots=8,maxmem=4608M" in argv
    trace = ["-msg", "timestamp=on", "-trace", "enable=virtio_czone_stats",
             "-D", "/run/vm0/czone-stats.log"]
    assert [argv[i:i + 6] for i, a in enumerate(argv) if a == "-msg"] == \
        ([trace] if mode == "czone" else [])


def test_balloon_mode_reports_free_pages():
    argv = build_argv(replace(SPEC, memory_mode="balloon"))
    assert "virtio-balloon-pci,id=balloon0,free-page-reporting=on" in argv


@pytest.mark.parametrize("kw", [{"memory_mode": "bogus"},
                                {"memory_mode": "czone", "device_memory_mib": 0},
                                {"memory_mode": "virtio-mem", "device_memory_mib": 1023},
                                {"memory_mode": "czone", "device_memory_mib": 64,
                                 "requested_mib": 128},
                                {"memory_mode": "czone", "device_memory_mib": 1000}])
def test_bad_memory_mode_args(kw):
    with pytest.raises(ValueError):
        replace(SPEC, **kw)


def test_tcg_runs_several_vcpus_in_one_thread() -> None:
    assert ("-accel", "tcg") in pairs(build_argv(replace(SPEC, cpus=1)))
    assert ("-accel", "tcg,thread=single") in pairs(build_argv(SPEC))
    assert ("-accel", "kvm") in pairs(build_argv(replace(SPEC, accel="kvm")))


def test_no_sleep_states_offered() -> None:
    p = pairs(build_argv(SPEC))
    assert ("-global", "ICH9-LPC.disable_s3=1") in p and ("-global", "ICH9-LPC.disable_s4=1") in p
