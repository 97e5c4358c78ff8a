"""argv of the function base image disk and of template clones."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from czone.qemu.cmdline import build_argv
from tests.unit.test_cmdline import SPEC


def pairs(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_the_base_image_is_the_second_read_only_disk() -> None:
    argv = build_argv(replace(SPEC, fnbase=Path("/i/fn,base.squashfs")))
    assert pairs(argv, "-drive") == [
        "file=/i/rootfs.squashfs,if=none,id=root,format=raw,readonly=on",
        "file=/i/fn,,base.squashfs,if=none,id=fnbase,format=raw,readonly=on"]
    blk = [d for d in pairs(argv, "-device") if d.startswith("virtio-blk-pci")]
    assert blk == ["virtio-blk-pci,drive=root", "virtio-blk-pci,drive=fnbase"]


def test_a_template_shares_its_ram_file_and_a_clone_maps_it_privately() -> None:
    tpl = build_argv(replace(SPEC, ram_file=Path("/t/ram")))
    backend = "memory-backend-file,id=ram0,size=512M,mem-path=/t/ram,share="
    assert backend + "on" in pairs(tpl, "-object")
    assert "memory-backend=ram0" in pairs(tpl, "-machine")
    assert "-incoming" not in tpl
    clone = build_argv(replace(SPEC, ram_file=Path("/t/ram"), ram_shared=False, incoming=True))
    assert backend + "off" in pairs(clone, "-object")
    assert pairs(clone, "-incoming") == ["defer"]
    assert "-object" not in build_argv(SPEC)


def test_tb_size_is_set_for_tcg_only() -> None:
    one = replace(SPEC, cpus=1)
    assert pairs(build_argv(replace(one, tb_size_mib=64)), "-accel") == ["tcg,tb-size=64"]
    assert pairs(build_argv(replace(one, accel="kvm", tb_size_mib=64)), "-accel") == ["kvm"]
    assert pairs(build_argv(one), "-accel") == ["tcg"]


def test_free_page_reporting_adds_a_balloon_that_never_inflates() -> None:
    fpr = "virtio-balloon-pci,id=fpr0,free-page-reporting=on"
    for mode in ("none", "czone"):
        spec = replace(SPEC, memory_mode=mode, free_page_reporting=True, device_memory_mib=256)
        assert pairs(build_argv(spec), "-device").count(fpr) == 1
    # The balloon memory mode has its own reporting balloon: no second one.
    spec = replace(SPEC, memory_mode="balloon", free_page_reporting=True)
    assert fpr not in pairs(build_argv(spec), "-device")
    assert fpr not in pairs(build_argv(SPEC), "-device")
