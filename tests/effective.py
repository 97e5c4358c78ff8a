"""The effective machine configuration of a QEMU argv or a libvirt domain XML,
reduced to what both must agree on: the unit tests compare our argv with our
XML, and the libvirt VM test compares the argv libvirtd derives from that
XML (``domxml-to-native``) with both."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from typing import Any

from czone.libvirt_xml import QEMU_NS

_UNITS = {"": 1 << 20, "k": 1 << 10, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30,
          "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}


def mib(value: str, default_unit: str = "M") -> int:
    m = re.fullmatch(r"(\d+)([A-Za-z]*)", str(value))
    assert m, value
    return int(m.group(1)) * _UNITS[m.group(2) or default_unit] >> 20


def opts(value: str) -> dict[str, Any]:
    """``driver,key=value,...`` (``,,`` escapes a comma) or a JSON object."""
    if value.startswith("{"):
        return json.loads(value)
    parts = re.split(r"(?<!,),(?!,)", value)
    out: dict[str, Any] = {}
    for i, part in enumerate(parts):
        key, sep, val = part.partition("=")
        if not sep and i == 0:
            out["_"] = key
        else:
            out[key] = val.replace(",,", ",")
    return out


def _size_mib(value: Any) -> int:
    return int(value) >> 20 if isinstance(value, int) else mib(value)


def from_argv(argv: list[str]) -> dict[str, Any]:
    """What a QEMU argv runs (plain ours, or libvirt's)."""
    start = next(i for i, a in enumerate(argv) if a.endswith("qemu-system-x86_64"))
    argv = argv[start:]
    cfg: dict[str, Any] = {"emulator": argv[0], "disks": [], "firmware": [], "memdevs": {},
                           "balloon": None, "ssh_forward": None, "globals": set()}
    backends: dict[str, int] = {}
    drives: dict[str, tuple[str, bool]] = {}
    blockfiles: dict[str, str] = {}
    blk_devices: list[str] = []
    devices: list[dict[str, Any]] = []
    serial_chardev, chardevs = None, {}
    pairs = iter(range(1, len(argv)))
    for i in pairs:
        flag = argv[i]
        if flag in ("-nodefaults", "-no-user-config", "-no-reboot", "-S", "-no-shutdown"):
            continue
        value = argv[i + 1] if i + 1 < len(argv) else ""
        next(pairs, None)
        if flag == "-name":
            cfg["name"] = opts(value).get("guest", opts(value).get("_"))
        elif flag in ("-M", "-machine"):
            o = opts(value)
            if "_" in o:
                cfg["machine"] = "q35" if "q35" in o["_"] else o["_"]
        elif flag == "-accel":
            o = opts(value)
            cfg["accel"] = o["_"]
            cfg["tb_size_mib"] = int(o["tb-size"]) if "tb-size" in o else None
        elif flag == "-cpu":
            cfg["cpu"] = opts(value)["_"]
        elif flag == "-smp":
            cfg["cpus"] = int(opts(value)["_"])
        elif flag == "-m":
            o = opts(value)
            cfg["memory_mib"] = mib(o.get("size", o.get("_")))
            cfg["slots"] = int(o["slots"])
            cfg["maxmem_mib"] = mib(o["maxmem"])
        elif flag == "-kernel":
            cfg["kernel"] = value
        elif flag == "-append":
            cfg["append"] = value
        elif flag == "-L":
            cfg["firmware"].append(value)
        elif flag == "-global":
            cfg["globals"].add(value)
        elif flag == "-object":
            o = opts(value)
            if str(o.get("qom-type", o.get("_"))).startswith("memory-backend"):
                backends[o["id"]] = _size_mib(o["size"])
        elif flag == "-drive":
            o = opts(value)
            drives[o["id"]] = (o["file"], o.get("readonly") == "on")
        elif flag == "-blockdev":
            o = opts(value)
            if o["driver"] == "file":
                blockfiles[o["node-name"]] = o["filename"]
            else:
                drives[o["node-name"]] = (blockfiles[o["file"]], bool(o.get("read-only")))
        elif flag == "-device":
            o = opts(value)
            o.setdefault("driver", o.get("_"))
            devices.append(o)
            if o["driver"] == "virtio-blk-pci":
                blk_devices.append(o["drive"])
        elif flag == "-netdev":
            o = opts(value)
            if o.get("_", o.get("type")) == "user":
                cfg["ssh_forward"] = o.get("hostfwd")
        elif flag == "-chardev":
            o = opts(value)
            chardevs[o["id"]] = o.get("path")
        elif flag == "-serial":
            serial_chardev = value.removeprefix("chardev:")
    for o in devices:
        if o["driver"] == "isa-serial":
            serial_chardev = o["chardev"]
        elif o["driver"] in ("virtio-czone-pci", "virtio-mem-pci"):
            cfg["memdevs"][o["driver"]] = {
                "id": o["id"], "size_mib": backends[o["memdev"].removeprefix("/objects/")],
                "requested_mib": _size_mib(o["requested-size"]),
                "block_mib": _size_mib(o["block-size"])}
        elif o["driver"] == "virtio-balloon-pci":
            fpr = o.get("free-page-reporting")
            cfg["balloon"] = {"free_page_reporting": fpr in (True, "on")}
    cfg["disks"] = [drives[d] for d in blk_devices]
    cfg["serial"] = chardevs.get(serial_chardev) if serial_chardev else None
    return cfg


def _xml_mib(el: ET.Element | None) -> int:
    assert el is not None and el.text
    return mib(el.text.strip(), el.get("unit", "KiB"))


def from_xml(xml: str) -> dict[str, Any]:
    """What a domain XML asks libvirt to run: its elements, and the argv it
    passes through ``<qemu:commandline>`` read the way ``from_argv`` reads."""
    dom = ET.fromstring(xml)
    extra = [a.get("value", "") for a in dom.iterfind(f"{{{QEMU_NS}}}commandline/"
                                                       f"{{{QEMU_NS}}}arg")]
    emulator = dom.findtext("devices/emulator", "")
    cfg = from_argv([emulator, *extra])
    os_el = dom.find("os")
    assert os_el is not None
    max_el = dom.find("maxMemory")
    assert max_el is not None
    cpu = dom.find("cpu")
    assert cpu is not None
    cpu_mode = cpu.get("mode")
    cells = dom.findall("cpu/numa/cell")
    cfg.update(
        name=dom.findtext("name"),
        machine=os_el.find("type").get("machine"),  # type: ignore[union-attr]
        accel="kvm" if dom.get("type") == "kvm" else "tcg",
        tb_size_mib=int(t) if (t := dom.findtext("features/tcg/tb-cache")) else None,
        cpu={"maximum": "max", "host-passthrough": "host"}[cpu_mode or ""],
        cpus=int(dom.findtext("vcpu", "0")),
        # libvirt's <memory> also counts memory devices: the boot RAM is the NUMA cells'.
        memory_mib=sum(mib(c.get("memory", "0"), c.get("unit", "KiB")) for c in cells),
        slots=int(max_el.get("slots", "0")),
        maxmem_mib=_xml_mib(max_el),
        kernel=os_el.findtext("kernel"),
        append=os_el.findtext("cmdline"),
        disks=[(d.find("source").get("file"), d.find("readonly") is not None)  # type: ignore[union-attr]
               for d in dom.findall("devices/disk")],
        serial=dom.find("devices/serial/source").get("path"),  # type: ignore[union-attr]
    )
    pm = {p.tag: p.get("enabled") for p in dom.findall("pm/*")}
    if pm.get("suspend-to-mem") == "no":
        cfg["globals"].add("ICH9-LPC.disable_s3=1")
    if pm.get("suspend-to-disk") == "no":
        cfg["globals"].add("ICH9-LPC.disable_s4=1")
    for mem in dom.findall("devices/memory[@model='virtio-mem']"):
        cfg["memdevs"]["virtio-mem-pci"] = {
            "id": mem.find("alias").get("name"),  # type: ignore[union-attr]
            "size_mib": _xml_mib(mem.find("target/size")),
            "requested_mib": _xml_mib(mem.find("target/requested")),
            "block_mib": _xml_mib(mem.find("target/block"))}
    balloon = dom.find("devices/memballoon")
    if balloon is not None and balloon.get("model") != "none":
        cfg["balloon"] = {"free_page_reporting": balloon.get("freePageReporting") == "on"}
    return cfg


def comparable(cfg: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` without what legitimately differs between the backends: the
    emulator's name for the memory device (libvirt's user aliases)."""
    out = dict(cfg)
    out["memdevs"] = {k: {**v, "id": v["id"].removeprefix("ua-")}
                      for k, v in cfg["memdevs"].items()}
    return out
