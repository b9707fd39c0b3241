"""``virtfleet``: the operator CLI. Parses, calls one controller endpoint, renders.

The machinery (global options, exit codes, JSON vs tables) is in :mod:`controller.cli.runner`;
the core host and VM commands are here, feature areas add theirs in ``cmd_*.py``.
"""

from __future__ import annotations

import os
from typing import Annotated

import typer
from rich.console import Console

from common.messages import api
from common.transport.amqp import DEFAULT_URL
from controller.cli import render
from controller.cli.runner import Output, State, app, host_app, run, validated, vm_app


@app.callback()
def main_options(
    ctx: typer.Context,
    output: Annotated[
        Output, typer.Option("--output", "-o", help="table for people, json for scripts")
    ] = Output.TABLE,
    amqp_url: Annotated[
        str, typer.Option("--amqp-url", envvar="VIRTFLEET_AMQP_URL", help="RabbitMQ URL of the fleet")
    ] = DEFAULT_URL,
    timeout: Annotated[float | None, typer.Option(help="seconds to wait for the controller")] = None,
) -> None:
    """Global options."""
    width = int(os.environ.get("COLUMNS", "160"))
    ctx.obj = State(
        output=output,
        amqp_url=amqp_url,
        timeout=timeout,
        out=Console(width=width, soft_wrap=False),
        err=Console(stderr=True, width=width),
    )


# ----------------------------------------------------------------------------- host


@host_app.command("list")
def host_list(ctx: typer.Context) -> None:
    """List hosts with status, size and heartbeat."""
    run(ctx, "api.host.list", api.Empty(), lambda s, r: s.out.print(render.hosts_table(r.hosts)))


@host_app.command("show")
def host_show(ctx: typer.Context, host: str) -> None:
    """Show one host: facts, capacity per resource, VMs."""

    def show(s: State, r: api.HostView) -> None:
        for table in render.host_detail(r):
            s.out.print(table)

    run(ctx, "api.host.show", api.HostRef(host), show)


# ----------------------------------------------------------------------------- vm


@vm_app.command("create")
def vm_create(
    ctx: typer.Context,
    name: str,
    vcpus: Annotated[int, typer.Option(help="virtual CPUs")] = 1,
    memory: Annotated[int, typer.Option(help="memory in MiB")] = 512,
    disk: Annotated[int, typer.Option(help="root disk in GiB (qcow2 in the host's pool)")] = 10,
    host: Annotated[str | None, typer.Option(help="put it on this host (still capacity-checked)")] = None,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="wait until it is built")] = True,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="show the decision, claim nothing")] = False,
    start: Annotated[bool, typer.Option("--start/--no-start", help="start it once defined")] = True,
    domain_type: Annotated[str | None, typer.Option(help="kvm | qemu (default: kvm where available)")] = None,
    idempotency_key: Annotated[
        str | None, typer.Option(help="retry-safe key: the same key creates once")
    ] = None,
) -> None:
    """Create a VM; the scheduler picks the host unless --host is given."""
    body = validated(
        lambda: api.VmCreate(
            name=name,
            vcpus=vcpus,
            memory_mib=memory,
            disk_gib=disk,
            host=host,
            wait=wait,
            dry_run=dry_run,
            start=start,
            domain_type=domain_type,
            idempotency_key=idempotency_key,
        ),
        ctx,
    )

    def show(s: State, r: api.VmCreated) -> None:
        if r.dry_run:
            s.out.print(
                render.placement_table(r.placement, f"dry run: {name} would go to {r.placement.host}")
            )
            return
        assert r.vm is not None
        s.out.print(
            f"{r.vm.name} created on host {r.vm.host} ({r.vm.status}, {r.vm.power_state})", highlight=False
        )

    run(ctx, "api.vm.create", body, show)


@vm_app.command("list")
def vm_list(
    ctx: typer.Context,
    all_: Annotated[bool, typer.Option("--all/--running", help="all VMs, or only running ones")] = True,
    host: Annotated[str | None, typer.Option(help="only VMs on this host")] = None,
) -> None:
    """List VMs with their host and state."""
    run(
        ctx,
        "api.vm.list",
        api.VmListRequest(all=all_, host=host),
        lambda s, r: s.out.print(render.vms_table(r.vms)),
    )


@vm_app.command("show")
def vm_show(ctx: typer.Context, name: str) -> None:
    """Show one VM (the dominfo fields)."""
    body = validated(lambda: api.VmRefRequest(name), ctx)
    run(ctx, "api.vm.show", body, lambda s, r: s.out.print(render.vm_detail(r)))


def _done(s: State, r: api.VmActionDone) -> None:
    if r.vm is not None:
        s.out.print(
            f"{r.vm.name}: {r.vm.power_state}" + (f" ({r.message})" if r.message else ""), highlight=False
        )
    else:
        s.out.print(r.message, highlight=False)


@vm_app.command("start")
def vm_start(ctx: typer.Context, name: str) -> None:
    """Start (power on) a VM."""
    run(ctx, "api.vm.start", validated(lambda: api.VmRefRequest(name), ctx), _done)


@vm_app.command("shutdown")
def vm_shutdown(
    ctx: typer.Context,
    name: str,
    timeout: Annotated[float, typer.Option("--grace", help="seconds to wait for the guest")] = 60.0,
    force: Annotated[bool, typer.Option("--force", help="power off if the guest ignores ACPI")] = False,
) -> None:
    """Ask the guest to shut down (ACPI)."""
    body = validated(lambda: api.VmShutdownRequest(name, timeout_s=timeout, force=force), ctx)
    run(ctx, "api.vm.shutdown", body, _done)


@vm_app.command("destroy")
def vm_destroy(ctx: typer.Context, name: str) -> None:
    """Power a VM off at once (virsh destroy); the definition stays."""
    run(ctx, "api.vm.destroy", validated(lambda: api.VmRefRequest(name), ctx), _done)


@vm_app.command("delete")
def vm_delete(
    ctx: typer.Context,
    name: str,
    delete_disks: Annotated[bool, typer.Option("--delete-disks", help="also delete its disk images")] = False,
) -> None:
    """Delete a VM (power off, undefine); disks are kept unless --delete-disks."""
    run(ctx, "api.vm.delete", validated(lambda: api.VmDeleteRequest(name, delete_disks), ctx), _done)


# Feature areas register their commands on import (kept last: they extend the apps above).
from controller.cli import cmd_network, cmd_tuning, cmd_vmops  # noqa: E402, F401


def main() -> None:
    """Console-script entry point."""
    app()
