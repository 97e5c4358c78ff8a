"""``czonectl``: the command line of the CZone host agent."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import click

from czone import accel as accel_mod
from czone import artifacts, migrate
from czone.cli_host import host
from czone.cli_mem import vm_mem, vm_reclaim, vm_resize
from czone.cli_replay import replay
from czone.cli_run import COMMANDS, backend_options
from czone.cli_trace import trace
from czone.endpoint import guest_ssh
from czone.errors import CZoneError
from czone.libvirt_xml import UnsupportedSpec, build_xml, domain_name
from czone.netplan import BRIDGE, NET_HELP
from czone.qemu.cmdline import MEMORY_MODES, Accel, build_argv
from czone.service import Service
from czone.state import StateDB, host_of, status, validate_name


class CZoneGroup(click.Group):
    """Prints every CZoneError as one line of context, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CZoneError as e:
            click.echo(f"czonectl: error: {e}", err=True)
            ctx.exit(1)


def _qemu(ctx: click.Context, override: str | None) -> Path:
    return artifacts.qemu_binary(override or ctx.obj.get("qemu"))


def _detect_accel(kernel: artifacts.Kernel, image: artifacts.Image, qemu: Path,
                  state_dir: Path, reprobe: bool = False) -> tuple[Accel, str]:
    if reprobe or accel_mod.will_probe(kernel.release, kernel.vmlinux, qemu, state_dir):
        click.echo(f"probing KVM with a test boot (up to {accel_mod.PROBE_TIMEOUT:.0f}s) ...",
                   err=True)
    return accel_mod.detect(kernel.release, kernel.vmlinux, image.rootfs, qemu,
                            tuple(artifacts.firmware_dirs()), state_dir, reprobe=reprobe)


@click.group(cls=CZoneGroup)
@click.option("--qemu", "qemu_path", metavar="PATH",
              help="QEMU binary (default: $CZONE_QEMU, else the one `make qemu` built).")
@click.pass_context
def cli(ctx: click.Context, qemu_path: str | None) -> None:
    """Memory-elastic secure containers: manage CZone VMs."""
    ctx.ensure_object(dict)
    ctx.obj["qemu"] = qemu_path


@cli.group()
def vm() -> None:
    """Boot, list, use and stop VMs."""


vm.add_command(vm_resize)
vm.add_command(vm_reclaim)
vm.add_command(vm_mem)
for command in COMMANDS:
    cli.add_command(command)
cli.add_command(trace)
cli.add_command(replay)
cli.add_command(host)


@vm.command("up")
@click.option("--name", default="vm0", show_default=True, help="VM name.")
@click.option("--memory", "memory_mib", type=click.IntRange(min=64), default=512,
              show_default=True, help="Boot memory in MiB.")
@click.option("--cpus", type=click.IntRange(1, 64), default=1, show_default=True)
@click.option("--ssh-port", type=click.IntRange(1, 65535),
              help="Host port on 127.0.0.1 forwarded to the guest's SSH (default: a free one).")
@click.option("--qemu", "qemu_path", metavar="PATH", help="QEMU binary for this VM.")
@click.option("--append", "extra_append", default="", help="Extra kernel command line.")
@click.option("--boot-timeout", type=click.FloatRange(min=1), default=120.0,
              show_default=True, help="Seconds to wait for SSH.")
@click.option("--memory-mode", type=click.Choice(MEMORY_MODES), default="none",
              show_default=True, help="Elastic memory device.")
@click.option("--device-memory", "device_memory_mib", type=click.IntRange(min=0), default=0,
              help="MiB behind the czone or virtio-mem device.")
@click.option("--requested", "requested_mib", type=click.IntRange(min=0),
              help="MiB the device may plug at boot (default: all for czone, 0 for virtio-mem).")
@click.option("--net", default="user", show_default=True, metavar="user|bridge",
              help=NET_HELP)
@backend_options
@click.option("--dry-run", is_flag=True, help="Print the QEMU command line (with --backend "
                                             "libvirt: the domain XML) and exit.")
@click.pass_context
def vm_up(ctx: click.Context, name: str, memory_mib: int, cpus: int, ssh_port: int | None,
          qemu_path: str | None, extra_append: str, boot_timeout: float, memory_mode: str,
          device_memory_mib: int, requested_mib: int | None, net: str, backend: str,
          uri: str | None, host: str | None, dry_run: bool) -> None:
    """Boot a VM with the CZone kernel and guest image and wait for SSH."""
    validate_name(name)
    svc = Service(qemu=qemu_path or ctx.obj.get("qemu"), progress=lambda m: click.echo(m, err=True),
                  backend=backend, uri=uri, host=host)
    svc.db.ensure_free(name)
    if requested_mib is None:
        requested_mib = device_memory_mib if memory_mode == "czone" else 0
    try:
        spec = svc.vm_spec(name, memory_mib, cpus, ssh_port, probe=not dry_run, net=net,
                           extra_append=extra_append, memory_mode=memory_mode,
                           device_memory_mib=device_memory_mib, requested_mib=requested_mib)
    except ValueError as e:
        raise click.BadParameter(str(e)) from e
    if dry_run and backend == "libvirt":
        try:
            click.echo(build_xml(spec))
        except UnsupportedSpec as e:
            raise CZoneError(str(e)) from None
        return
    if dry_run:
        click.echo(shlex.join(build_argv(spec)))
        return
    accel, why = svc.accel()
    click.echo(f"accelerator: {accel} ({why})", err=True)
    rec = svc.vm_up(spec, boot_timeout)
    click.echo(f"VM {name} is up: pid {rec.pid}, {accel}, {memory_mib} MiB, {cpus} CPU(s), "
               f"ssh port {rec.ssh_port}")
    if rec.backend == "libvirt":
        click.echo(f"  libvirt: domain {domain_name(name)} at {rec.uri}")
    if rec.net == "bridge":
        click.echo(f"  bridge: {rec.net_addr} on {BRIDGE} in network namespace {rec.netns} "
                   f"(tap {rec.tap})")
    click.echo(f"  czonectl vm ssh {name} -- uname -a")
    click.echo(f"  ssh -i {shlex.quote(str(rec.ssh_key))} -p {rec.ssh_port} "
               "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null root@127.0.0.1")
    click.echo(f"  czonectl vm down {name}")


@vm.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def vm_list(as_json: bool) -> None:
    """List VMs and whether they are still running."""
    Service(progress=lambda m: click.echo(m, err=True)).reconcile_net()
    records = StateDB().list()
    if as_json:
        click.echo(json.dumps([{**r.to_dict(), "status": status(r)} for r in records],
                              indent=2))
        return
    hosts = StateDB().hosts()
    rows = [("NAME", "STATUS", "PID", "ACCEL", "MEMORY", "CPUS", "SSH", "NET", "BACKEND", "HOST")]
    rows += [(r.name, status(r), str(r.pid), r.accel, f"{r.memory_mib}M", str(r.cpus),
              str(r.ssh_port or "-"), r.net_addr or r.net, r.backend, host_of(r, hosts))
             for r in records]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


@vm.command("ssh", context_settings={"ignore_unknown_options": True})
@click.argument("name")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.option("--timeout", type=click.FloatRange(min=0.1), help="Seconds before giving up.")
@click.pass_context
def vm_ssh(ctx: click.Context, name: str, command: tuple[str, ...],
           timeout: float | None) -> None:
    """Run COMMAND in the guest (words joined by spaces, like ssh); exit with its status."""
    rec = StateDB().running(name)
    if rec.ssh_port is None or rec.ssh_key is None:
        raise CZoneError(f"VM {name!r} has no SSH forward")

    def sink(stream: Any) -> Any:
        binary = stream.buffer
        return lambda data: (binary.write(data), binary.flush())

    # Standard input goes through, as with ssh; a terminal is not read (no pty).
    stdin = None if sys.stdin is None or sys.stdin.isatty() else sys.stdin.buffer
    with guest_ssh(rec.uri if rec.backend == "libvirt" else None, rec.ssh_port,
                   Path(rec.ssh_key)) as client:
        result = client.run(" ".join(command), timeout=timeout, stdin=stdin,
                            on_stdout=sink(sys.stdout), on_stderr=sink(sys.stderr))
    ctx.exit(result.rc)


@vm.command("cp")
@click.argument("src", type=click.File("rb"))
@click.argument("dest", metavar="NAME:PATH")
@click.option("--mode", default="0644", show_default=True, help="File mode in the guest.")
def vm_cp(src: Any, dest: str, mode: str) -> None:
    """Copy the local file SRC into a VM's guest, at PATH."""
    name, sep, path = dest.partition(":")
    if not sep or not path:
        raise click.BadParameter("expected NAME:PATH", param_hint="NAME:PATH")
    if not mode.isdigit() or len(mode) > 4 or any(c > "7" for c in mode):
        raise click.BadParameter(f"not an octal mode: {mode!r}", param_hint="--mode")
    rec = StateDB().running(name)
    if rec.ssh_port is None or rec.ssh_key is None:
        raise CZoneError(f"VM {name!r} has no SSH forward")
    with guest_ssh(rec.uri if rec.backend == "libvirt" else None, rec.ssh_port,
                   Path(rec.ssh_key)) as client:
        client.put(src, path, mode)
    click.echo(f"copied {src.name} to {name}:{path}")


@vm.command("down")
@click.argument("name")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=10.0, show_default=True,
              help="Seconds per shutdown stage (QMP quit, SIGTERM, SIGKILL).")
def vm_down(name: str, timeout: float) -> None:
    """Stop a VM and remove its record."""
    what = Service().vm_down(name, timeout)
    click.echo(f"VM {name} {what}")


@vm.command("migrate")
@click.argument("name")
@click.option("--to", "to_host", metavar="HOST",
              help="A libvirt VM: the host (`czonectl host list`, or a libvirt URI) it moves to.")
@click.option("--timeout", type=click.FloatRange(min=1), default=600.0, show_default=True,
              help="Seconds the migration may take before it is cancelled.")
@click.option("--dry-run", is_flag=True, help="Print the destination's QEMU command line "
                                             "(with --to: its domain XML) and exit.")
@click.option("--max-bandwidth", "bandwidth_mib", type=click.IntRange(min=1),
              default=migrate.MAX_BANDWIDTH >> 20, show_default=True,
              help="MiB/s the migration may use.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def vm_migrate(name: str, to_host: str | None, timeout: float, dry_run: bool,
               bandwidth_mib: int, as_json: bool) -> None:
    """Live-migrate a running VM, its containers running on: a plain QEMU VM
    into a new QEMU process on this host; a libvirt VM to another libvirt
    host (--to).  If the migration fails, the VM runs on where it was."""
    with Service(progress=lambda m: click.echo(m, err=True)) as svc:
        to_uri = None if to_host is None else \
            to_host if "://" in to_host else svc.db.host(to_host).uri
        if dry_run and to_uri is not None:
            click.echo(svc.libvirt_migration_xml(name, to_uri))
            return
        if dry_run:
            click.echo(shlex.join(build_argv(svc.migration_plan(name)[2])))
            return
        res = svc.vm_migrate(name, timeout, bandwidth_mib << 20, to_uri=to_uri)
    if as_json:
        click.echo(json.dumps(res.to_dict(), indent=2))
        return
    sent = res.ram.get("transferred", 0) / (1 << 20)
    where = f"-> {to_host}" if to_host else "->"
    click.echo(f"VM {name} migrated: QEMU pid {res.src_pid} {where} {res.dst_pid} in "
               f"{res.total_s:.1f}s (downtime {res.downtime_ms} ms), {sent:.0f} MiB sent, "
               f"ssh port {res.ssh_port}")


def _qemu_version(qemu: Path) -> str:
    try:
        out = subprocess.run([str(qemu), "--version"], capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise CZoneError(f"{qemu} --version failed: {e}") from e
    if out.returncode != 0:
        raise CZoneError(f"{qemu} --version exited {out.returncode}: {out.stderr.strip()}")
    return out.stdout.splitlines()[0] if out.stdout else "unknown"


@cli.command()
@click.option("--reprobe", is_flag=True, help="Ignore the cached accelerator verdict.")
@click.pass_context
def doctor(ctx: click.Context, reprobe: bool) -> None:
    """Check the artifacts, QEMU and the accelerator."""
    problems = 0

    def report(what: str, fn: Any) -> Any:
        nonlocal problems
        try:
            value = fn()
        except CZoneError as e:
            problems += 1
            click.echo(f"{what:<12} MISSING: {e}")
            return None
        return value

    kernel = report("kernel", artifacts.kernel)
    if kernel:
        click.echo(f"{'kernel':<12} {kernel.release} ({kernel.vmlinux})")
    image = report("image", artifacts.image)
    if image:
        click.echo(f"{'image':<12} {image.version} ({image.rootfs})")
    qemu = report("qemu", lambda: _qemu(ctx, None))
    version = qemu and report("qemu", lambda: _qemu_version(qemu))
    if version:
        click.echo(f"{'qemu':<12} {version} ({qemu})")
    if kernel and image and qemu and version:
        accel, why = _detect_accel(kernel, image, qemu, StateDB().root, reprobe)
        click.echo(f"{'accelerator':<12} {accel}: {why}")
    else:
        click.echo(f"{'accelerator':<12} not probed: needs kernel, image and qemu")
    if problems:
        click.echo(f"{problems} problem(s) found", err=True)
        ctx.exit(1)


def main() -> None:
    # SIGTERM unwinds like Ctrl-C, so a half-booted VM or a KVM probe is cleaned
    # up.  Only here: a child forked by a library (pyroute2 forks helpers and
    # stops them with SIGTERM) must die, not unwind into a copy of czonectl.
    me = os.getpid()

    def on_sigterm(*_: object) -> None:
        if os.getpid() != me:
            os._exit(128 + signal.SIGTERM)
        sys.exit(128 + signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_sigterm)
    cli(prog_name="czonectl")


if __name__ == "__main__":
    sys.exit(main())
