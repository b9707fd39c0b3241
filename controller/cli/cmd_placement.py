"""CLI commands for placement: host settings and switches, capacity, host groups, server groups."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from common.errors import InvalidRequest
from common.messages import placement as msg
from common.messages.placement import (
    API_GROUP_CREATE,
    API_GROUP_DELETE,
    API_GROUP_LIST,
    API_HOST_CAPACITY,
    API_HOST_SET,
    API_HOST_STATE,
    API_HOSTGROUP_LIST,
    API_HOSTGROUP_SET,
)
from controller.cli.runner import State, run, validated
from controller.cli.tree import group_app, host_app, hostgroup_app


def _done(s: State, r: msg.Done) -> None:
    s.out.print(r.message, highlight=False)


def parse_limit(text: str) -> msg.Limits:
    """``MEMORY_MIB:min=512,max=65536,step=256`` -> Limits (InvalidRequest on bad syntax)."""
    resource, sep, rest = text.partition(":")
    if not sep or not rest:
        raise InvalidRequest(f"--limit {text!r}: expected RESOURCE:min=N,max=N,step=N")
    values: dict[str, int] = {}
    names = {"min": "min_unit", "max": "max_unit", "step": "step_size"}
    for part in rest.split(","):
        key, eq, number = part.partition("=")
        if not eq or key.strip() not in names or not number.strip().isdigit():
            raise InvalidRequest(f"--limit {text!r}: bad part {part!r} (use min=N, max=N, step=N)")
        values[names[key.strip()]] = int(number)
    return msg.Limits(resource=resource.strip().upper(), **values)


#: `--reset` takes the option names people type (`reserved-memory`) or the field names.
_RESET_ALIASES = {
    "reserved_memory": "reserved_memory_mib",
    "reserved_disk": "reserved_disk_gib",
    "limit": "limits",
}


def reset_field(name: str) -> str:
    """``--reserved-memory`` / ``reserved-memory`` / ``reserved_memory_mib`` -> ``reserved_memory_mib``."""
    field = name.strip().lstrip("-").replace("-", "_")
    return _RESET_ALIASES.get(field, field)


# The settings a host group gives its hosts and a host may override (``host set``, ``hostgroup set``).
CpuRatio = Annotated[float | None, typer.Option(help="vCPU allocation ratio (fleet default 4.0)")]
RamRatio = Annotated[float | None, typer.Option(help="memory allocation ratio (fleet default 1.0)")]
DiskRatio = Annotated[float | None, typer.Option(help="disk allocation ratio (fleet default 1.0)")]
ReservedMemory = Annotated[int | None, typer.Option(help="MiB kept for the host (default 512)")]
ReservedCpus = Annotated[int | None, typer.Option(help="CPUs kept for the host")]
ReservedDisk = Annotated[int | None, typer.Option(help="GiB of the pool kept free")]


def _settings(
    cpu_ratio: float | None,
    ram_ratio: float | None,
    disk_ratio: float | None,
    reserved_memory: int | None,
    reserved_cpus: int | None,
    reserved_disk: int | None,
) -> dict[str, Any]:
    """The options above as the fields of HostSet / HostGroupSet."""
    return {
        "cpu_ratio": cpu_ratio,
        "ram_ratio": ram_ratio,
        "disk_ratio": disk_ratio,
        "reserved_memory_mib": reserved_memory,
        "reserved_cpus": reserved_cpus,
        "reserved_disk_gib": reserved_disk,
    }


@host_app.command("set")
def host_set(
    ctx: typer.Context,
    host: str,
    cpu_ratio: CpuRatio = None,
    ram_ratio: RamRatio = None,
    disk_ratio: DiskRatio = None,
    reserved_memory: ReservedMemory = None,
    reserved_cpus: ReservedCpus = None,
    reserved_disk: ReservedDisk = None,
    max_vms: Annotated[int | None, typer.Option(help="at most this many VMs on the host")] = None,
    group: Annotated[str | None, typer.Option(help="member of this host group")] = None,
    limit: Annotated[
        list[str] | None, typer.Option(help="unit rules, e.g. MEMORY_MIB:min=256,max=65536,step=256")
    ] = None,
    reset: Annotated[
        list[str] | None,
        typer.Option(
            help="back to the group/fleet default (repeatable): cpu-ratio, ram-ratio, disk-ratio, "
            "reserved-memory, reserved-cpus, reserved-disk, max-vms, group, limit"
        ),
    ] = None,
) -> None:
    """Override overcommit ratios, reserves and limits for one host (placement-style inventory)."""
    body = validated(
        lambda: msg.HostSet(
            host=host,
            **_settings(cpu_ratio, ram_ratio, disk_ratio, reserved_memory, reserved_cpus, reserved_disk),
            max_vms=max_vms,
            group=group,
            limits=tuple(parse_limit(t) for t in limit or ()),
            reset=tuple(reset_field(r) for r in reset or ()),
        ),
        ctx,
    )
    run(ctx, API_HOST_SET, body, _done)


@host_app.command("enable")
def host_enable(ctx: typer.Context, host: str) -> None:
    """Allow new VMs on the host again."""
    run(ctx, API_HOST_STATE, validated(lambda: msg.HostSwitch(host, enabled=True), ctx), _done)


@host_app.command("disable")
def host_disable(
    ctx: typer.Context, host: str, reason: Annotated[str, typer.Option(help="why")] = ""
) -> None:
    """No new VMs on the host; running VMs stay."""
    run(
        ctx,
        API_HOST_STATE,
        validated(lambda: msg.HostSwitch(host, enabled=False, reason=reason), ctx),
        _done,
    )


@host_app.command("maintenance")
def host_maintenance(
    ctx: typer.Context,
    host: str,
    off: Annotated[bool, typer.Option("--off", help="leave maintenance")] = False,
    reason: Annotated[str, typer.Option(help="why")] = "",
) -> None:
    """Put a host in maintenance (no new VMs), or take it out with --off."""
    body = validated(lambda: msg.HostSwitch(host, maintenance=not off, reason=reason), ctx)
    run(ctx, API_HOST_STATE, body, _done)


def _capacity_tables(s: State, r: msg.CapacityReport) -> None:
    for h in r.hosts:
        title = f"{h.host} ({h.status}{', group ' + h.group if h.group else ''})"
        table = Table(title=title)
        for col in (
            "RESOURCE",
            "TOTAL",
            "RESERVED",
            "RATIO",
            "CAPACITY",
            "USED",
            "FREE",
            "REPORTED",
            "UNITS",
            "FROM",
        ):
            table.add_column(col)
        for res in h.resources:
            units = f"{res.min_unit}..{res.max_unit} step {res.step_size}"
            table.add_row(
                res.resource,
                str(res.total),
                str(res.reserved),
                f"{res.allocation_ratio:g}",
                str(res.capacity),
                str(res.used),
                str(res.free),
                "-" if res.reported is None else str(res.reported),
                units,
                res.source,
            )
        s.out.print(table)
        for note in h.drift:
            s.out.print(f"  drift: {note}", highlight=False)


@host_app.command("capacity")
def host_capacity(ctx: typer.Context, host: Annotated[str | None, typer.Argument()] = None) -> None:
    """Per resource: total, reserved, ratio, capacity, used, free, reported use and drift."""
    run(ctx, API_HOST_CAPACITY, msg.CapacityRequest(host), _capacity_tables)


@hostgroup_app.command("set")
def hostgroup_set(
    ctx: typer.Context,
    name: str,
    cpu_ratio: CpuRatio = None,
    ram_ratio: RamRatio = None,
    disk_ratio: DiskRatio = None,
    reserved_memory: ReservedMemory = None,
    reserved_cpus: ReservedCpus = None,
    reserved_disk: ReservedDisk = None,
) -> None:
    """Create or update a host group; hosts join with `virtfleet host set HOST --group NAME`."""
    body = validated(
        lambda: msg.HostGroupSet(
            name, **_settings(cpu_ratio, ram_ratio, disk_ratio, reserved_memory, reserved_cpus, reserved_disk)
        ),
        ctx,
    )
    run(ctx, API_HOSTGROUP_SET, body, _done)


@hostgroup_app.command("list")
def hostgroup_list(ctx: typer.Context) -> None:
    """Host groups with their settings and members."""

    def show(s: State, r: msg.HostGroupList) -> None:
        table = Table(title="host groups")
        for col in ("NAME", "CPU RATIO", "RAM RATIO", "DISK RATIO", "RESERVED MiB", "HOSTS"):
            table.add_column(col)
        for g in r.groups:
            table.add_row(
                g.name,
                "-" if g.cpu_ratio is None else f"{g.cpu_ratio:g}",
                "-" if g.ram_ratio is None else f"{g.ram_ratio:g}",
                "-" if g.disk_ratio is None else f"{g.disk_ratio:g}",
                "-" if g.reserved_memory_mib is None else str(g.reserved_memory_mib),
                ", ".join(g.hosts) or "-",
            )
        s.out.print(table)

    run(ctx, API_HOSTGROUP_LIST, msg.CapacityRequest(), show)


@group_app.command("create")
def group_create(
    ctx: typer.Context,
    name: str,
    policy: Annotated[
        str, typer.Option(help="affinity | anti-affinity | soft-affinity | soft-anti-affinity")
    ],
    max_per_host: Annotated[int, typer.Option(help="anti-affinity: VMs of the group allowed per host")] = 1,
) -> None:
    """Create a server group; VMs join with `virtfleet vm create ... --server-group NAME`."""
    body = validated(lambda: msg.ServerGroupCreate(name, policy, max_per_host), ctx)
    run(ctx, API_GROUP_CREATE, body, lambda s, r: s.out.print(f"server group {r.name} ({r.policy}) created"))


@group_app.command("delete")
def group_delete(ctx: typer.Context, name: str) -> None:
    """Delete an empty server group."""
    run(ctx, API_GROUP_DELETE, validated(lambda: msg.ServerGroupRef(name), ctx), _done)


@group_app.command("list")
def group_list(ctx: typer.Context) -> None:
    """Server groups with their policy and where their VMs are."""

    def show(s: State, r: msg.ServerGroupList) -> None:
        table = Table(title="server groups")
        for col in ("NAME", "POLICY", "MAX PER HOST", "MEMBERS"):
            table.add_column(col)
        for g in r.groups:
            members = ", ".join(f"{h}: {n}" for h, n in sorted(g.members.items())) or "-"
            table.add_row(g.name, g.policy, str(g.max_per_host), members)
        s.out.print(table)

    run(ctx, API_GROUP_LIST, msg.CapacityRequest(), show)
