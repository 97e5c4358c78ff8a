"""``czonectl fn list | run | invoke | ps | kill | reclaim | stats``: function
containers, a thin skin over ``czone.service``."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from czone.functions import FUNCTIONS
from czone.hostmem import MiB
from czone.libvirt_backend import BACKENDS, DEFAULT_URI
from czone.netplan import NET_HELP
from czone.service import RUN_MODES, Service


def backend_options(f: Any) -> Any:
    """``--backend``, ``--connect`` and ``--host``: where a new VM runs (kept
    in its record)."""
    f = click.option("--host", metavar="NAME",
                     help="With --backend libvirt: boot on this host of `czonectl host list`.")(f)
    f = click.option("--connect", "uri", metavar="URI",
                     help="With --backend libvirt: boot at this libvirt URI (default: the "
                          f"registered host with the most headroom, else {DEFAULT_URI}).")(f)
    return click.option("--backend", type=click.Choice(BACKENDS), default="qemu",
                        show_default=True,
                        help="qemu: a QEMU process of czonectl's; libvirt: a libvirt "
                             "domain (see --connect, --host).")(f)


def _svc(ctx: click.Context, backend: str = "qemu", uri: str | None = None,
         host: str | None = None) -> Service:
    """One Service per command, closed when the command ends."""
    svc = Service(qemu=ctx.obj.get("qemu"), progress=lambda m: click.echo(m, err=True),
                  backend=backend, uri=uri, host=host)
    ctx.call_on_close(svc.close)
    return svc


def _table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _payload(text: str | None) -> Any:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError as e:
        raise click.BadParameter(f"not JSON: {e}", param_hint="PAYLOAD") from None
    if not isinstance(value, dict):
        raise click.BadParameter("a payload is a JSON object", param_hint="PAYLOAD")
    return value


@click.group("fn")
def fn() -> None:
    """The functions containers can serve."""


@fn.command("list")
def fn_list() -> None:
    """List the known functions and their default memory caps."""
    _table([("FUNCTION", "MEMORY", "DOES")]
           + [(name, f"{mib}M", what) for name, (mib, what) in FUNCTIONS.items()])


@click.command("run")
@click.argument("function")
@click.option("--mode", type=click.Choice(RUN_MODES), default="mcpv", show_default=True,
              help="mcpv: into the function's VM; scpv-template: a clone of a booted "
                   "template VM; scpv-snapshot: a clone of a VM already serving FUNCTION.")
@click.option("--memory", "memory_mib", type=click.IntRange(16, 64 << 10),
              help="Memory cap in MiB (default: the function's).")
@click.option("--net", default="user", show_default=True, metavar="user|bridge",
              help=NET_HELP + "  A container goes only into a VM of its network mode.")
@backend_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def run(ctx: click.Context, function: str, mode: str, memory_mib: int | None, net: str,
        backend: str, uri: str | None, host: str | None, as_json: bool) -> None:
    """Start a container of FUNCTION; print its ID and startup latency.  A VM
    booted for it runs on --backend; a container placed into a running VM
    goes wherever that VM runs."""
    res = _svc(ctx, backend, uri, host).run(function, mode, memory_mib,  # type: ignore[arg-type]
                                      net=net)
    if as_json:
        click.echo(json.dumps(res.__dict__, indent=2))
        return
    click.echo(f"{res.id}  started in {res.startup_s * 1000:.0f} ms "
               f"(VM {res.vm}{', booted' if res.booted else ''}, CZone {res.czone})")


@click.command("invoke")
@click.argument("ctr_id", metavar="ID")
@click.argument("payload", required=False)
@click.option("--timeout", type=click.FloatRange(min=0.1), help="Seconds for the function.")
@click.pass_context
def invoke(ctx: click.Context, ctr_id: str, payload: str | None, timeout: float | None) -> None:
    """Invoke container ID with a JSON PAYLOAD (default: the function's)."""
    reply, latency = _svc(ctx).invoke(ctr_id, _payload(payload), timeout)
    if reply.get("ok"):
        click.echo(json.dumps(reply.get("result")))
        click.echo(f"latency {latency * 1000:.1f} ms (function {reply.get('run_ms', 0):.1f} ms)",
                   err=True)
        return
    click.echo(f"czonectl: the function failed: {reply.get('error')}", err=True)
    ctx.exit(3)


@click.command("ps")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def ps(ctx: click.Context, as_json: bool) -> None:
    """List the containers."""
    ctrs = _svc(ctx).ps()
    if as_json:
        click.echo(json.dumps(ctrs, indent=2))
        return
    rows = [("ID", "FUNCTION", "VM", "HOST", "STATE", "CZONE", "MEMORY", "STARTUP")]
    rows += [(c["id"], c["fn"], c["vm"], c["host"] or "-", c["state"], str(c["czone"] or "-"),
              f"{c['memory_mib']}M",
              f"{c['startup_s'] * 1000:.0f} ms" if c["startup_s"] else "-") for c in ctrs]
    _table(rows)


@click.command("kill")
@click.argument("ctr_id", metavar="ID")
@click.pass_context
def kill(ctx: click.Context, ctr_id: str) -> None:
    """Stop container ID, destroy its CZone, report the memory back on the host."""
    res = _svc(ctx).kill(ctr_id)
    g = res.guest
    if res.returned_bytes is None and g:  # the guest killed it; the host could not measure
        click.echo(f"{ctr_id}: killed; the memory back to the host was not measured")
        return
    if res.returned_bytes is None:
        click.echo(f"{ctr_id}: record removed (its VM {res.vm} is gone)")
        return
    detail = (f" ({g.get('released_chunks', 0)} chunks released, "
              f"{g.get('migrated_pages', 0)} pages migrated)" if g else " (its VM stopped)")
    click.echo(f"{ctr_id}: killed; {res.returned_bytes / MiB:.1f} MiB back to the host{detail}")


IDLE_FOR = click.FloatRange(min=0, max=(2**32 - 1) / 1000)


def _echo_reclaim(vm: str, r: dict[str, Any]) -> None:
    if "error" in r:
        click.echo(f"{vm}: not reclaimed: {r['error']}")
        return
    drop = r["rss_drop_bytes"]
    click.echo(f"{vm}: {r['czones']} CZone(s) reclaimed, the guest gave back "
               f"{r['bytes'] / MiB:.1f} MiB: " + ("the host's side was not measured"
                                                  if drop is None else
                                                  f"{drop / MiB:.1f} MiB back to the host"))


@click.command("reclaim")
@click.option("--idle-for", type=IDLE_FOR, default=0.0, show_default=True,
              help="Only CZones that handed out no page for this many seconds.")
@click.pass_context
def reclaim(ctx: click.Context, idle_for: float) -> None:
    """Idle reclaim: free memory of idle containers goes back to the host."""
    out = _svc(ctx).reclaim(idle_for)
    if not out:
        click.echo("no MCPV VM is running")
    for vm, r in out.items():
        _echo_reclaim(vm, r)


@click.command("stats")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def stats(ctx: click.Context, as_json: bool) -> None:
    """Host RSS and PSS per VM, and per-CZone guest counters."""
    out = _svc(ctx).stats()
    if as_json:
        json.dump(out, sys.stdout, indent=2)
        click.echo()
        return
    for vm, s in out.items():
        plugged = "-" if s["plugged_bytes"] is None else f"{s['plugged_bytes'] / MiB:.0f}M"
        rss, pss = (("?" if b is None else f"{b / MiB:.0f}M")
                    for b in (s["rss_bytes"], s["pss_bytes"]))
        click.echo(f"{vm} ({s['mode']}, {s['fn']}, on {s['host']}): RSS {rss}, "
                   f"PSS {pss}, plugged {plugged} of "
                   f"{s['requested_mib']}M requested")
        for cid, c in s["containers"].items():
            st = c.get("czone_stat") or {}
            if c["czone"]:
                used = st.get("used_pages", 0) * 4096
                where = f"CZone {c['czone']}, {st.get('nr_chunks', 0)} chunks, " \
                        f"{used / MiB:.1f}M used"
            else:
                cur = c.get("memory_current")
                where = "no CZone, memcg " + ("?" if cur is None else f"{cur / MiB:.1f}M")
            click.echo(f"  {cid}: {where}, {c['invocations']} invocation(s), "
                       f"idle {c['idle_s']:.0f}s")


COMMANDS = (fn, run, invoke, ps, kill, reclaim, stats)
