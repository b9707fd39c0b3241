"""CLI commands of the core: ``host list|show`` and the VM lifecycle (``vm create|list|show|shutdown|
delete`` and the simple operations of the catalogue: ``vm start|destroy|reboot|...``).

Registered on the groups of :mod:`controller.cli.tree` when a command line reaches them.
"""

from __future__ import annotations

from typing import Annotated

import typer

from common.messages import api
from common.messages.api import (
    API_HOST_LIST,
    API_HOST_SHOW,
    API_VM_CREATE,
    API_VM_DELETE,
    API_VM_LIST,
    API_VM_SHOW,
    API_VM_SHUTDOWN,
)
from common.messages.catalogue import CATALOGUE
from common.messages.descriptor import ApiCall
from common.messages.vm import KernelBoot, VmActionDone, VmForward, VmRefRequest
from controller.cli import render
from controller.cli.runner import Output, State, run, validated
from controller.cli.tree import host_app, vm_app
from controller.cli.vm_options import (
    create_warnings,
    parse_disks,
    parse_graphics,
    parse_network,
    run_with_progress,
)

# ----------------------------------------------------------------------------- host


@host_app.command("list")
def host_list(ctx: typer.Context) -> None:
    """List hosts with status, size and heartbeat."""
    run(ctx, API_HOST_LIST, api.Empty(), lambda s, r: s.out.print(render.hosts_table(r.hosts)))


@host_app.command("show")
def host_show(ctx: typer.Context, host: str) -> None:
    """Show one host: facts, capacity per resource, VMs."""

    def show(s: State, r: api.HostView) -> None:
        for table in render.host_detail(r):
            s.out.print(table)

    run(ctx, API_HOST_SHOW, api.HostRef(host), show)


# ----------------------------------------------------------------------------- vm


@vm_app.command("create")
def vm_create(
    ctx: typer.Context,
    name: str,
    vcpus: Annotated[int, typer.Option(help="virtual CPUs at start")] = 1,
    max_vcpus: Annotated[int, typer.Option(help="room to hot-add vCPUs later (default: --vcpus)")] = 0,
    cpuset: Annotated[str | None, typer.Option(help="host CPUs the vCPUs may run on, e.g. 1-4,6,8")] = None,
    memory: Annotated[int, typer.Option(help="memory in MiB")] = 512,
    max_memory: Annotated[int, typer.Option(help="room to balloon up later, MiB (default: --memory)")] = 0,
    disk: Annotated[
        list[str] | None,
        typer.Option(
            help="repeatable: SIZE_GIB | size=N[,format=raw|qcow2][,bus=][,cache=none|writethrough|directsync|writeback|unsafe]"
            "[,io=native|threads|io_uring][,pool=][,target=] | path=/image[,format=][,bus=][,cache=][,io=] | "
            "none. Default: one 10 GiB qcow2 disk"
        ),
    ] = None,
    cdrom: Annotated[str | None, typer.Option(help="ISO image on the host to boot from")] = None,
    network: Annotated[
        list[str] | None,
        typer.Option(
            help="repeatable: network=NAME | bridge=BR [,model=virtio|e1000|rtl8139][,mac=52:54:00:..]"
        ),
    ] = None,
    graphics: Annotated[
        str | None, typer.Option(help="vnc[,listen=0.0.0.0][,port=5910|auto][,password=SECRET] | none")
    ] = None,
    kernel: Annotated[str | None, typer.Option(help="direct kernel boot: kernel image on the host")] = None,
    initrd: Annotated[str | None, typer.Option(help="direct kernel boot: initrd on the host")] = None,
    kernel_args: Annotated[str, typer.Option(help="direct kernel boot: kernel command line")] = "",
    autostart: Annotated[bool, typer.Option("--autostart", help="start it when its host boots")] = False,
    allow_shared_disk: Annotated[
        bool, typer.Option("--allow-shared-disk", help="allow an image another guest already uses")
    ] = False,
    machine: Annotated[str | None, typer.Option(help="machine type, e.g. pc or q35")] = None,
    serial_log: Annotated[
        str | None, typer.Option(help="file on the host that receives the serial console")
    ] = None,
    server_group: Annotated[str | None, typer.Option(help="(anti-)affinity group")] = None,
    cpu_policy: Annotated[str, typer.Option(help="shared | dedicated")] = "shared",
    hugepage_size: Annotated[str | None, typer.Option(help="back memory with 2M or 1G huge pages")] = None,
    host: Annotated[str | None, typer.Option(help="put it on this host (still capacity-checked)")] = None,
    wait: Annotated[
        bool, typer.Option("--wait/--no-wait", help="wait until it runs, showing progress (table output)")
    ] = True,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="show the decision, claim nothing")] = False,
    start: Annotated[bool, typer.Option("--start/--no-start", help="start it once defined")] = True,
    domain_type: Annotated[str | None, typer.Option(help="kvm | qemu (default: kvm where available)")] = None,
    idempotency_key: Annotated[
        str | None, typer.Option(help="retry-safe key: the same key creates once")
    ] = None,
) -> None:
    """Create a VM (virt-install); the scheduler picks the host unless --host is given."""

    def build() -> api.VmCreate:
        disks = parse_disks(disk)
        return api.VmCreate(
            name=name,
            vcpus=vcpus,
            memory_mib=memory,
            disk_gib=0 if disks is not None else 10,
            host=host,
            wait=wait,
            dry_run=dry_run,
            start=start,
            domain_type=domain_type,
            idempotency_key=idempotency_key,
            max_vcpus=max_vcpus,
            max_memory_mib=max_memory,
            cpuset=cpuset,
            disks=disks or (),
            cdrom=cdrom,
            nics=tuple(parse_network(n) for n in network or ()),
            graphics=parse_graphics(graphics),
            kernel_boot=None
            if kernel is None
            else KernelBoot(kernel=kernel, initrd=initrd, cmdline=kernel_args),
            autostart=autostart,
            allow_shared_disk=allow_shared_disk,
            machine=machine,
            serial_log=serial_log,
            server_group=server_group,
            cpu_policy=cpu_policy,
            hugepage_size=hugepage_size,
        )

    body: api.VmCreate = validated(build, ctx)
    state: State = ctx.obj
    for warning in create_warnings(body):
        state.err.print(render.styled("warning", "yellow", warning), highlight=False)

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

    if wait and not dry_run and state.output is Output.TABLE:
        run_with_progress(ctx, body, show)
    else:
        run(ctx, API_VM_CREATE, body, show)


@vm_app.command("list")
def vm_list(
    ctx: typer.Context,
    all_: Annotated[bool, typer.Option("--all/--running", help="all VMs, or only running ones")] = True,
    host: Annotated[str | None, typer.Option(help="only VMs on this host")] = None,
) -> None:
    """List VMs with their host and state."""
    run(
        ctx,
        API_VM_LIST,
        api.VmListRequest(all=all_, host=host),
        lambda s, r: s.out.print(render.vms_table(r.vms)),
    )


@vm_app.command("show")
def vm_show(ctx: typer.Context, name: str) -> None:
    """Show one VM (the dominfo fields)."""
    body = validated(lambda: VmRefRequest(name), ctx)
    run(ctx, API_VM_SHOW, body, lambda s, r: s.out.print(render.vm_detail(r)))


def _done(s: State, r: VmActionDone) -> None:
    render.vm_action_done(s.out, r)


@vm_app.command("shutdown")
def vm_shutdown(
    ctx: typer.Context,
    name: str,
    timeout: Annotated[float, typer.Option("--grace", help="seconds to wait for the guest")] = 60.0,
    force: Annotated[bool, typer.Option("--force", help="power off if the guest ignores ACPI")] = False,
) -> None:
    """Ask the guest to shut down (ACPI)."""
    body = validated(lambda: api.VmShutdownRequest(name, timeout_s=timeout, force=force), ctx)
    run(ctx, API_VM_SHUTDOWN, body, _done)


@vm_app.command("delete")
def vm_delete(
    ctx: typer.Context,
    name: str,
    delete_disks: Annotated[bool, typer.Option("--delete-disks", help="also delete its disk images")] = False,
) -> None:
    """Delete a VM (power off, undefine); disks are kept unless --delete-disks."""
    run(ctx, API_VM_DELETE, validated(lambda: api.VmDeleteRequest(name, delete_disks), ctx), _done)


def _vm_action_command(op: ApiCall[VmRefRequest, VmActionDone], verb: str) -> None:
    def command(ctx: typer.Context, name: str) -> None:
        run(ctx, op, validated(lambda: VmRefRequest(name), ctx), _done)

    vm_app.command(verb, help=op.doc)(command)


# Simple VM operations (``vm start|destroy|reboot|suspend|resume ...``) come from the catalogue:
# declaring one with ``vm_action`` in common/messages is all it takes to get its command here.
for _op in CATALOGUE.values():
    if isinstance(_op, ApiCall) and isinstance(_op.forward, VmForward):
        _vm_action_command(_op, _op.forward.verb)
