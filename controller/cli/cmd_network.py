"""CLI commands of the network feature area (registered on the groups of controller.cli.tree).

``virtfleet net ...``       libvirt networks on a host (virsh net-*), IPv4 forwarding
``virtfleet host net ...``  host bridges and bonds (applied as transactions: rolled back by the
                            agent itself if it cannot reach the broker again), ``show``

Host changes exit 1 when the agent rolled them back (the output says why). With ``--confirm``
the change is held until confirmed (asked interactively on a terminal; otherwise run
``virtfleet host net confirm HOST CHANGE_ID``) and undone when the confirm timeout passes.

:func:`render_host_network` prints a HostNetworkReport (bonds included); ``host show`` can call
it with the report of the host (see :func:`bonds_table` for the bonds alone).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Annotated, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from common.errors import InvalidRequest, VirtfleetError
from common.messages.descriptor import ApiCall
from common.messages.network import (
    API_NET_AUTOSTART,
    API_NET_BOND_CREATE,
    API_NET_BOND_ENSLAVE,
    API_NET_BOND_REMOVE,
    API_NET_BRIDGE_CREATE,
    API_NET_BRIDGE_REMOVE,
    API_NET_BRIDGE_STP,
    API_NET_DEFINE,
    API_NET_HOST_CONFIRM,
    API_NET_HOST_REVERT,
    API_NET_HOST_SHOW,
    API_NET_IP_FORWARD,
    API_NET_LIST,
    API_NET_START,
    API_NET_STOP,
    API_NET_UNDEFINE,
    BondCreate,
    BondEnslave,
    BondInfo,
    BridgeCreate,
    BridgeStp,
    ChangeOptions,
    ChangeRef,
    DefineNetwork,
    FleetNetworkList,
    HostNetShow,
    HostNetworkReport,
    InterfaceRemove,
    IpForwardRequest,
    IpForwardState,
    LibvirtNetworkInfo,
    NetChangeResult,
    NetworkAutostart,
    NetworkListRequest,
    NetworkRef,
    NetworkResult,
    NetworkSpec,
)
from controller.cli import render
from controller.cli.runner import Output, State, fail, run, validated
from controller.cli.tree import host_app, net_app

B = TypeVar("B")
R = TypeVar("R")

host_net_app = typer.Typer(
    help="Host networking: bridges, bonds, addresses. Changes are rolled back by the agent if it "
    "cannot reach the broker again within --deadline seconds.",
    no_args_is_help=True,
)
bridge_app = typer.Typer(
    help="Host bridges (brctl addbr/addif, IP moved onto the bridge).", no_args_is_help=True
)
bond_app = typer.Typer(help="Host bonds (link aggregation; active-backup by default).", no_args_is_help=True)
host_app.add_typer(host_net_app, name="net")
host_net_app.add_typer(bridge_app, name="bridge")
host_net_app.add_typer(bond_app, name="bond")


# ------------------------------------------------------------------------------- rendering


def _yn(value: bool | None) -> str:
    return "-" if value is None else ("yes" if value else "no")


def networks_table(
    entries: Sequence[tuple[str, LibvirtNetworkInfo]], title: str = "libvirt networks"
) -> Table:
    """``virsh net-list --all`` plus what the XML says, one row per (host, network)."""
    table = Table(title=title)
    for col in ("HOST", "NAME", "STATE", "AUTOSTART", "PERSISTENT", "MODE", "BRIDGE", "ADDRESS", "DHCP"):
        table.add_column(col)
    for host, n in entries:
        dhcp = f"{n.dhcp_start}-{n.dhcp_end}" if n.dhcp_start else "-"
        table.add_row(
            host,
            n.name,
            "active" if n.active else "inactive",
            _yn(n.autostart),
            _yn(n.persistent),
            n.forward_mode,
            n.bridge or "-",
            n.address or "-",
            dhcp,
        )
    return table


def bonds_table(bonds: Sequence[BondInfo]) -> Table:
    """One row per bond slave: what ``/proc/net/bonding/<bond>`` shows."""
    table = Table(title="bonds")
    for col in (
        "BOND",
        "MODE",
        "MIIMON",
        "ACTIVE SLAVE",
        "PRIMARY",
        "SLAVE",
        "MII STATUS",
        "STATE",
        "LINK FAILURES",
    ):
        table.add_column(col)
    for b in bonds:
        slaves = b.slaves or ()
        if not slaves:
            table.add_row(
                b.name, b.mode, str(b.miimon), b.active_slave or "-", b.primary or "-", "-", "-", "-", "-"
            )
        for i, s in enumerate(slaves):
            head = (
                (b.name, b.mode, str(b.miimon), b.active_slave or "-", b.primary or "-")
                if i == 0
                else ("",) * 5
            )
            table.add_row(*head, s.name, s.mii_status or "-", s.state or "-", str(s.link_failure_count))
    return table


def host_network_tables(r: HostNetworkReport, host: str = "") -> list[Table]:
    """Interfaces, routes, bridges, bonds, libvirt networks and the summary of one host."""
    ifaces = Table(title=f"interfaces {host}".strip())
    for col in ("NAME", "KIND", "ADMIN", "OPER", "MASTER", "MAC", "MTU", "ADDRESSES"):
        ifaces.add_column(col)
    for i in r.interfaces:
        kind = i.kind + (f" {i.vlan_id} on {i.link}" if i.vlan_id is not None else "")
        ifaces.add_row(
            i.name,
            kind or "-",
            "up" if i.admin_up else "down",
            i.oper_state or "-",
            i.master or "-",
            i.mac or "-",
            str(i.mtu),
            ", ".join(i.addresses) or "-",
        )
    routes = Table(title="routes (main table)")
    for col in ("DESTINATION", "GATEWAY", "DEV", "METRIC", "PROTO"):
        routes.add_column(col)
    for rt in r.routes:
        routes.add_row(rt.dst, rt.gateway or "-", rt.dev or "-", str(rt.metric), rt.proto)
    bridges = Table(title="bridges")
    for col in ("BRIDGE", "STP", "PORTS"):
        bridges.add_column(col)
    for b in r.bridges:
        bridges.add_row(
            b.name, "yes" if b.stp else "no", ", ".join(f"{p.name} ({p.state})" for p in b.ports) or "-"
        )
    summary = Table(title="host networking", show_header=False)
    summary.add_column("field")
    summary.add_column("value")
    rows = [
        ("DNS servers", ", ".join(r.dns) or "-"),
        ("IPv4 forwarding", _yn(r.ipv4_forwarding)),
        ("persistence", r.persistence or "-"),
    ]
    if r.pending is not None:
        left = max(0.0, r.pending.expires_at - time.time())
        rows.append(
            ("awaiting confirm", f"{r.pending.operation} ({r.pending.change_id}), undone in {left:.0f}s")
        )
    if r.last_rollback is not None:
        rb = r.last_rollback
        state = "restored" if rb.restored else "NOT fully restored: " + "; ".join(rb.errors)
        rows.append(
            (
                "last rollback",
                f"{rb.operation} at {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(rb.at))}: {rb.reason} ({state})",
            )
        )
    rows += [("error", e) for e in r.errors]
    for k, v in rows:
        summary.add_row(k, v)
    tables = [ifaces, routes, bridges]
    if r.bonds:
        tables.append(bonds_table(r.bonds))
    if r.networks:
        tables.append(networks_table([(host, n) for n in r.networks]))
    tables.append(summary)
    return tables


def render_host_network(console: Console, report: HostNetworkReport | None, host: str = "") -> None:
    """Print a host's network facts (for ``host show``: pass the report's ``network``)."""
    if report is None:
        console.print("no network facts reported yet", highlight=False)
        return
    for table in host_network_tables(report, host):
        console.print(table)


def change_text(r: NetChangeResult) -> list[str]:
    lines = [f"{r.operation}: {r.state} (change {r.change_id}, {r.elapsed_s:.1f}s)"]
    lines += [f"  step: {s}" for s in r.steps]
    if r.probe:
        lines.append(f"  probe: {r.probe}")
    if r.rolled_back:
        lines.append(f"  ROLLED BACK: {r.rollback_reason}")
        lines.append(
            "  the previous configuration was " + ("restored" if r.restored else "NOT fully restored")
        )
    if r.confirm_expires_at is not None:
        left = max(0.0, r.confirm_expires_at - time.time())
        lines.append(f"  undone in {left:.0f}s unless confirmed")
    if r.persistence:
        lines.append(f"  persistence: {r.persistence}")
    lines += [f"  wrote: {p}" if not p.startswith("-") else f"  removed: {p[1:]}" for p in r.persisted]
    lines += [f"  warning: {w}" for w in r.warnings]
    return lines


# ------------------------------------------------------------------------------- calling


def _call(ctx: typer.Context, op: ApiCall[B, R], body: B) -> R:
    state: State = ctx.obj
    client = state.client()
    try:
        return client.call(op, body)
    except VirtfleetError as exc:
        raise fail(state, exc) from None
    finally:
        client.close()


def _emit_change(state: State, result: NetChangeResult) -> None:
    if state.output is Output.JSON:
        render.emit_json(state.out, result)
    else:
        for line in change_text(result):
            state.out.print(line, highlight=False, markup=False)


def _run_change(ctx: typer.Context, op: ApiCall[B, NetChangeResult], body: B) -> None:
    """Send one host change; handle ``--confirm``; exit 1 when it was rolled back."""
    state: State = ctx.obj
    result = _call(ctx, op, body)
    host = getattr(body, "host", "")
    _emit_change(state, result)
    if result.state == "pending-confirm":
        if state.output is Output.TABLE and state.interactive:
            keep = state.ask("Keep this network configuration?")
            follow = API_NET_HOST_CONFIRM if keep else API_NET_HOST_REVERT
            result = _call(ctx, follow, ChangeRef(result.change_id, host=host))
            _emit_change(state, result)
        elif state.output is Output.TABLE:
            state.out.print(
                f"confirm with: virtfleet host net confirm {host} {result.change_id}", highlight=False
            )
    if result.rolled_back:
        raise typer.Exit(1)


def _options(
    deadline: float, confirm: bool, confirm_timeout: float, no_persist: bool, dry_run: bool
) -> ChangeOptions:
    return ChangeOptions(
        deadline_s=deadline,
        confirm_s=confirm_timeout if confirm else None,
        persist=not no_persist,
        dry_run=dry_run,
    )


Deadline = Annotated[
    float, typer.Option("--deadline", help="seconds to reach the broker again before the agent rolls back")
]
Confirm = Annotated[
    bool, typer.Option("--confirm", help="hold the change until confirmed (like netplan try)")
]
ConfirmTimeout = Annotated[
    float, typer.Option("--confirm-timeout", help="seconds to confirm before it is undone")
]
NoPersist = Annotated[bool, typer.Option("--no-persist", help="runtime only: write no configuration files")]
DryRun = Annotated[bool, typer.Option("--dry-run", help="show the steps, change nothing")]
Addresses = Annotated[list[str] | None, typer.Option("--address", help="extra address CIDR (repeatable)")]
Gateway = Annotated[
    str | None, typer.Option("--gateway", help="default gateway (replaces the default route)")
]
Dns = Annotated[
    list[str] | None, typer.Option("--dns", help="DNS server (repeatable; replaces resolv.conf's)")
]


# ------------------------------------------------------------------------------- virtfleet net


@net_app.command("list")
def net_list(
    ctx: typer.Context,
    host: Annotated[str | None, typer.Option(help="only this host")] = None,
    live: Annotated[bool, typer.Option("--live", help="ask the host's agent now (needs --host)")] = False,
) -> None:
    """List libvirt networks per host (virsh net-list --all), from the last reports unless --live."""
    if live and not host:
        raise fail(ctx.obj, InvalidRequest("--live needs --host"))
    body = validated(lambda: NetworkListRequest(host=host or "", live=live), ctx)

    def show(s: State, r: FleetNetworkList) -> None:
        s.out.print(networks_table([(e.host, e.network) for e in r.entries]))

    run(ctx, API_NET_LIST, body, show)


def _network_done(s: State, r: NetworkResult) -> None:
    if r.network is not None:
        s.out.print(networks_table([("", r.network)], f"network {r.network.name}: {r.message}"))
    else:
        s.out.print(r.message, highlight=False)


def _dhcp_range(value: str | None) -> tuple[str | None, str | None]:
    if value is None:
        return None, None
    start, sep, end = value.partition("-")
    if not sep:
        raise InvalidRequest(f"--dhcp must be START-END, e.g. 192.168.122.2-192.168.122.254, got {value!r}")
    return start.strip(), end.strip()


@net_app.command("define")
def net_define(
    ctx: typer.Context,
    host: str,
    name: str,
    mode: Annotated[
        str, typer.Option(help="nat | isolated | bridge (guests on an existing host bridge)")
    ] = "nat",
    address: Annotated[
        str | None, typer.Option(help="host address on the network, e.g. 192.168.122.1/24")
    ] = None,
    dhcp: Annotated[str | None, typer.Option(help="DHCP range START-END")] = None,
    bridge: Annotated[
        str | None, typer.Option(help="bridge name (bridge mode: the host bridge, e.g. br0)")
    ] = None,
    forward_dev: Annotated[str | None, typer.Option(help="nat: only NAT out of this interface")] = None,
    stp: Annotated[bool, typer.Option("--stp/--no-stp", help="STP on the network's bridge")] = True,
    start: Annotated[bool, typer.Option("--start/--no-start", help="start it (net-start)")] = True,
    autostart: Annotated[bool, typer.Option("--autostart/--no-autostart", help="start it at boot")] = True,
) -> None:
    """Define a libvirt network (virsh net-define), start it and mark it autostart."""

    def build() -> DefineNetwork:
        start_ip, end_ip = _dhcp_range(dhcp)
        spec = NetworkSpec(
            name=name,
            mode=mode,
            bridge=bridge,
            address=address,
            dhcp_start=start_ip,
            dhcp_end=end_ip,
            forward_dev=forward_dev,
            stp=stp,
        )
        return DefineNetwork(spec, host=host, start=start, autostart=autostart)

    run(ctx, API_NET_DEFINE, validated(build, ctx), _network_done)


@net_app.command("start")
def net_start(ctx: typer.Context, host: str, name: str) -> None:
    """Start a network (virsh net-start)."""
    run(ctx, API_NET_START, validated(lambda: NetworkRef(name, host=host), ctx), _network_done)


@net_app.command("stop")
def net_stop(ctx: typer.Context, host: str, name: str) -> None:
    """Stop a network (virsh net-destroy); the definition stays."""
    run(ctx, API_NET_STOP, validated(lambda: NetworkRef(name, host=host), ctx), _network_done)


@net_app.command("autostart")
def net_autostart(
    ctx: typer.Context,
    host: str,
    name: str,
    disable: Annotated[bool, typer.Option("--disable", help="do not start it at boot")] = False,
) -> None:
    """Start a network at boot, or not (virsh net-autostart [--disable])."""
    body = validated(lambda: NetworkAutostart(name, host=host, enabled=not disable), ctx)
    run(ctx, API_NET_AUTOSTART, body, _network_done)


@net_app.command("undefine")
def net_undefine(ctx: typer.Context, host: str, name: str) -> None:
    """Stop and delete a network (virsh net-destroy + net-undefine), e.g. the default NAT network."""
    run(ctx, API_NET_UNDEFINE, validated(lambda: NetworkRef(name, host=host), ctx), _network_done)


@net_app.command("ip-forward")
def net_ip_forward(
    ctx: typer.Context,
    host: str,
    enable: Annotated[bool, typer.Option("--enable", help="switch net.ipv4.ip_forward on")] = False,
    no_persist: NoPersist = False,
) -> None:
    """Check (cat /proc/sys/net/ipv4/ip_forward) or enable IPv4 forwarding."""
    body = validated(lambda: IpForwardRequest(host=host, enable=enable, persist=not no_persist), ctx)

    def show(s: State, r: IpForwardState) -> None:
        s.out.print(f"{host}: net.ipv4.ip_forward = {1 if r.enabled else 0} ({r.message})", highlight=False)
        for p in r.persisted:
            s.out.print(f"  wrote: {p}", highlight=False)

    run(ctx, API_NET_IP_FORWARD, body, show)


# ------------------------------------------------------------------------------- host net


@host_net_app.command("show")
def host_net_show(
    ctx: typer.Context,
    host: str,
    live: Annotated[
        bool, typer.Option("--live", help="ask the agent now instead of the last report")
    ] = False,
) -> None:
    """Interfaces, addresses, routes, bridges, bonds (like /proc/net/bonding), networks, DNS."""
    body = validated(lambda: HostNetShow(host=host, live=live), ctx)
    run(ctx, API_NET_HOST_SHOW, body, lambda s, r: render_host_network(s.out, r, host))


@host_net_app.command("confirm")
def host_net_confirm(ctx: typer.Context, host: str, change_id: str) -> None:
    """Keep a change made with --confirm (and write its configuration files)."""
    _run_change(ctx, API_NET_HOST_CONFIRM, validated(lambda: ChangeRef(change_id, host=host), ctx))


@host_net_app.command("revert")
def host_net_revert(ctx: typer.Context, host: str, change_id: str) -> None:
    """Undo a change made with --confirm now."""
    body = validated(lambda: ChangeRef(change_id, host=host), ctx)
    state: State = ctx.obj
    result: NetChangeResult = _call(ctx, API_NET_HOST_REVERT, body)
    _emit_change(state, result)
    if not result.restored:
        raise typer.Exit(1)


@bridge_app.command("create")
def bridge_create(
    ctx: typer.Context,
    host: str,
    bridge: str,
    nic: Annotated[
        list[str] | None, typer.Option("--nic", help="NIC to enslave; its IP, routes move (repeatable)")
    ] = None,
    stp: Annotated[bool, typer.Option("--stp/--no-stp", help="spanning tree")] = False,
    move_ip: Annotated[
        bool, typer.Option("--move-ip/--no-move-ip", help="move the NIC's addresses and routes")
    ] = True,
    address: Addresses = None,
    gateway: Gateway = None,
    dns: Dns = None,
    deadline: Deadline = 30.0,
    confirm: Confirm = False,
    confirm_timeout: ConfirmTimeout = 120.0,
    no_persist: NoPersist = False,
    dry_run: DryRun = False,
) -> None:
    """Create a bridge, enslave NICs and move their addresses, default route and DNS onto it."""
    body = validated(
        lambda: BridgeCreate(
            bridge,
            tuple(nic or ()),
            host=host,
            stp=stp,
            move_ip=move_ip,
            addresses=tuple(address or ()),
            gateway=gateway,
            dns=tuple(dns or ()),
            options=_options(deadline, confirm, confirm_timeout, no_persist, dry_run),
        ),
        ctx,
    )
    _run_change(ctx, API_NET_BRIDGE_CREATE, body)


@bridge_app.command("stp")
def bridge_stp(
    ctx: typer.Context,
    host: str,
    bridge: str,
    enabled: Annotated[str, typer.Argument(help="on | off")],
    deadline: Deadline = 30.0,
    no_persist: NoPersist = False,
) -> None:
    """Switch spanning tree on a bridge on or off."""
    if enabled not in ("on", "off"):
        raise fail(ctx.obj, InvalidRequest(f"STP must be on or off, got {enabled!r}"))
    body = validated(
        lambda: BridgeStp(
            bridge, enabled == "on", host=host, options=_options(deadline, False, 0, no_persist, False)
        ),
        ctx,
    )
    _run_change(ctx, API_NET_BRIDGE_STP, body)


def _remove(
    ctx: typer.Context,
    op: ApiCall[InterfaceRemove, NetChangeResult],
    host: str,
    name: str,
    restore_to: str | None,
    force: bool,
    opts: ChangeOptions,
) -> None:
    body = validated(
        lambda: InterfaceRemove(name, host=host, restore_to=restore_to, force=force, options=opts), ctx
    )
    _run_change(ctx, op, body)


@bridge_app.command("remove")
def bridge_remove(
    ctx: typer.Context,
    host: str,
    bridge: str,
    restore_to: Annotated[
        str | None, typer.Option(help="NIC that gets the addresses back (default: the only port)")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="even with VM interfaces attached")] = False,
    deadline: Deadline = 30.0,
    confirm: Confirm = False,
    confirm_timeout: ConfirmTimeout = 120.0,
    no_persist: NoPersist = False,
    dry_run: DryRun = False,
) -> None:
    """Delete a bridge; its NIC gets the addresses and routes back."""
    opts = validated(lambda: _options(deadline, confirm, confirm_timeout, no_persist, dry_run), ctx)
    _remove(ctx, API_NET_BRIDGE_REMOVE, host, bridge, restore_to, force, opts)


@bond_app.command("create")
def bond_create(
    ctx: typer.Context,
    host: str,
    bond: str,
    slave: Annotated[list[str], typer.Option("--slave", help="NIC to enslave (repeatable)")],
    mode: Annotated[
        str, typer.Option(help="active-backup (mode=1), 802.3ad, balance-rr, ...")
    ] = "active-backup",
    miimon: Annotated[int, typer.Option(help="link monitoring interval, ms")] = 100,
    primary: Annotated[str | None, typer.Option(help="preferred slave (active-backup)")] = None,
    move_ip: Annotated[
        bool, typer.Option("--move-ip/--no-move-ip", help="move the slaves' addresses and routes")
    ] = True,
    address: Addresses = None,
    gateway: Gateway = None,
    dns: Dns = None,
    bridge: Annotated[str | None, typer.Option(help="also create this bridge on top of the bond")] = None,
    bridge_stp: Annotated[bool, typer.Option("--bridge-stp", help="STP on that bridge")] = False,
    deadline: Deadline = 30.0,
    confirm: Confirm = False,
    confirm_timeout: ConfirmTimeout = 120.0,
    no_persist: NoPersist = False,
    dry_run: DryRun = False,
) -> None:
    """Create a bond over NICs, with addresses and gateway on it (or on a bridge on top)."""
    body = validated(
        lambda: BondCreate(
            bond,
            tuple(slave),
            host=host,
            mode=mode,
            miimon=miimon,
            primary=primary,
            move_ip=move_ip,
            addresses=tuple(address or ()),
            gateway=gateway,
            dns=tuple(dns or ()),
            bridge=bridge,
            bridge_stp=bridge_stp,
            options=_options(deadline, confirm, confirm_timeout, no_persist, dry_run),
        ),
        ctx,
    )
    _run_change(ctx, API_NET_BOND_CREATE, body)


@bond_app.command("enslave")
def bond_enslave(
    ctx: typer.Context,
    host: str,
    bond: str,
    nic: str,
    deadline: Deadline = 30.0,
    no_persist: NoPersist = False,
    dry_run: DryRun = False,
) -> None:
    """Add a NIC to a bond."""
    body = validated(
        lambda: BondEnslave(bond, nic, host=host, options=_options(deadline, False, 0, no_persist, dry_run)),
        ctx,
    )
    _run_change(ctx, API_NET_BOND_ENSLAVE, body)


@bond_app.command("remove")
def bond_remove(
    ctx: typer.Context,
    host: str,
    bond: str,
    restore_to: Annotated[
        str | None, typer.Option(help="NIC that gets the addresses back (default: first slave)")
    ] = None,
    deadline: Deadline = 30.0,
    confirm: Confirm = False,
    confirm_timeout: ConfirmTimeout = 120.0,
    no_persist: NoPersist = False,
    dry_run: DryRun = False,
) -> None:
    """Delete a bond; a slave NIC gets the addresses and routes back."""
    opts = validated(lambda: _options(deadline, confirm, confirm_timeout, no_persist, dry_run), ctx)
    _remove(ctx, API_NET_BOND_REMOVE, host, bond, restore_to, False, opts)
