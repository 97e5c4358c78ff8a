"""``czonectl host add | list | rm``: the fleet's libvirt endpoints."""

from __future__ import annotations

import json

import click

from czone.hostmem import MiB
from czone.service import Service


def _svc() -> Service:
    return Service(progress=lambda m: click.echo(m, err=True))


@click.group("host")
def host() -> None:
    """The libvirt hosts MCPV VMs are placed on (--backend libvirt)."""


@host.command("add")
@click.argument("name")
@click.argument("uri")
def host_add(name: str, uri: str) -> None:
    """Register libvirt endpoint URI as host NAME (it must answer), e.g.
    qemu+ssh://root@host2/system."""
    info = _svc().host_add(name, uri)
    click.echo(f"host {name}: {uri} ({info['hostname']}, {info['cpus']} CPUs, "
               f"{info['free_bytes'] / MiB:.0f} of {info['memory_bytes'] / MiB:.0f} MiB free)")


@host.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def host_list(as_json: bool) -> None:
    """List the hosts, whether they answer, their free memory and our VMs there."""
    hosts = _svc().host_list()
    if as_json:
        click.echo(json.dumps(hosts, indent=2))
        return
    if not hosts:
        click.echo("no host registered (`czonectl host add NAME URI`); --backend libvirt "
                   "boots at --connect, default qemu:///system")
        return
    rows = [("NAME", "URI", "STATUS", "FREE", "HEADROOM", "VMS")]
    for h in hosts:
        up = h["reachable"]
        rows.append((h["name"], h["uri"], "up" if up else f"unreachable: {h['error']}",
                     f"{h['free_bytes'] / MiB:.0f}M" if up else "-",
                     f"{h['headroom_bytes'] / MiB:.0f}M" if up else "-",
                     ",".join(h["vms"]) or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


@host.command("rm")
@click.argument("name")
def host_rm(name: str) -> None:
    """Forget host NAME; refused while it holds VMs."""
    rec = _svc().host_rm(name)
    click.echo(f"host {name} ({rec.uri}) removed")
