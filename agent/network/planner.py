"""Pure planners: (request, current facts) -> ordered, idempotent steps.

Nothing here touches the host. Each planner refuses a request that cannot work *before*
anything is changed (unknown NIC, NIC enslaved elsewhere, name taken by another kind of
device, VM taps still on a bridge), and plans nothing for what is already so: re-running a
request on the resulting host gives an empty plan.

Moving layer 3 (what the ops notes do by hand: ``brctl addif br0 eth0; ip addr del ... dev
eth0; ifconfig br0 ... up; route add default gw ...; echo nameserver ... >> resolv.conf``):
the addresses are added to the new holder first, then removed from the NIC (the kernel then
drops the NIC's routes), then the NIC's routes are re-created on the new holder.

:func:`restore_phases` plans the way back to a :class:`~agent.network.model.Snapshot`, one
phase at a time (links, masters, up/down, addresses, routes, STP, DNS); the executor re-reads
the facts between phases, so kernel side effects (routes flushed with an address) are seen.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from agent.network import resolv
from agent.network.model import (
    MANAGED_KINDS,
    AddAddress,
    AddRoute,
    CreateBond,
    CreateBridge,
    DelAddress,
    DeleteLink,
    DelRoute,
    RestoreResolvConf,
    SetBondMiimon,
    SetBondPrimary,
    SetDns,
    SetLinkUp,
    SetMaster,
    SetStp,
    Snapshot,
    Step,
)
from common.errors import Conflict, InvalidRequest, NotFound
from common.messages.base import replace
from common.messages.network import (
    BondCreate,
    BondEnslave,
    BridgeCreate,
    BridgeStp,
    HostNetworkReport,
    InterfaceInfo,
    InterfaceRemove,
    RouteInfo,
)

#: Interfaces that must never be enslaved or get host addresses moved around.
_NOT_A_PORT = frozenset({"bridge", "bond", "loopback"})


@dataclass(frozen=True, slots=True)
class Plan:
    """The steps of one change, plus the interfaces whose persistent configuration it affects."""

    operation: str
    steps: tuple[Step, ...]
    touched: tuple[str, ...] = ()  # interfaces whose configuration files are (re)written
    removed: tuple[str, ...] = ()  # interfaces whose configuration files are deleted


# ------------------------------------------------------------------------------ helpers


def route_key(r: RouteInfo) -> tuple[str, str, str | None, str | None, int]:
    """Identity of a route for comparisons (what ``ip route`` would call the same route)."""
    return (r.family, r.dst, r.gateway, r.dev, r.metric)


def managed_routes(routes: Iterable[RouteInfo]) -> list[RouteInfo]:
    """Routes a change may move or a rollback restores: not the kernel's connected routes."""
    return [r for r in routes if r.proto != "kernel" and not r.dst.startswith(("fe80:", "ff00:"))]


def _require(facts: HostNetworkReport, name: str) -> InterfaceInfo:
    iface = facts.interface(name)
    if iface is None:
        raise NotFound(f"interface {name} does not exist on this host")
    return iface


def _kind_name(iface: InterfaceInfo) -> str:
    return iface.kind or "physical interface"


def _port_candidate(facts: HostNetworkReport, name: str, master: str) -> InterfaceInfo | None:
    """The NIC to enslave to ``master``, or None when it already is; refuse what cannot work."""
    iface = _require(facts, name)
    if iface.kind in _NOT_A_PORT:
        raise InvalidRequest(f"{name} is a {_kind_name(iface)} and cannot be enslaved to {master}")
    if iface.master == master:
        return None
    if iface.master is not None:
        raise Conflict(f"{name} is already enslaved to {iface.master}; release it first")
    return iface


def _dedupe(values: Iterable[str]) -> list[str]:
    seen: dict[str, None] = {}
    for v in values:
        seen.setdefault(v, None)
    return list(seen)


def _family(ip: str) -> str:
    return "inet6" if ":" in ip else "inet"


def move_l3(
    facts: HostNetworkReport,
    sources: Sequence[str],
    target: str,
    *,
    move_ip: bool = True,
    addresses: Sequence[str] = (),
    gateway: str | None = None,
    dns: Sequence[str] = (),
    resolv_text: str | None = None,
) -> list[Step]:
    """Steps that move addresses and routes of ``sources`` onto ``target`` and set the gateway/DNS."""
    steps: list[Step] = []
    target_iface = facts.interface(target)
    have = set(target_iface.addresses) if target_iface is not None else set()
    moved: list[tuple[str, str]] = []
    routes: list[RouteInfo] = []
    if move_ip:
        for src in sources:
            iface = facts.interface(src)
            if iface is not None:
                moved += [(src, a) for a in iface.addresses]
            routes += [r for r in managed_routes(facts.routes) if r.dev == src]
    for address in _dedupe([a for _s, a in moved] + list(addresses)):
        if address not in have:
            steps.append(AddAddress(target, address))
    steps += [DelAddress(src, a) for src, a in moved]
    steps += [DelRoute(r) for r in routes]
    new_routes = [replace(r, dev=target) for r in routes]
    if gateway is not None:
        fam = _family(gateway)
        old_defaults = [r for r in managed_routes(facts.routes) if r.dst == "default" and r.family == fam]
        metric = old_defaults[0].metric if old_defaults else 0
        new_routes = [r for r in new_routes if not (r.dst == "default" and r.family == fam)]
        wanted = RouteInfo(
            dst="default", dev=target, gateway=gateway, metric=metric, proto="static", family=fam
        )
        for r in old_defaults:
            if route_key(r) != route_key(wanted) and r not in routes:
                steps.append(DelRoute(r))
        new_routes.append(wanted)
    present = {route_key(r) for r in facts.routes}
    steps += [AddRoute(r) for r in new_routes if route_key(r) not in present]
    if dns and (resolv_text is None or resolv.nameservers(resolv_text) != tuple(dns)):
        steps.append(SetDns(tuple(dns)))
    return steps


def _l3_holder(facts: HostNetworkReport, name: str) -> str:
    """Where a device's addresses live: its bridge when it is a bridge port, else itself."""
    iface = facts.interface(name)
    if iface is not None and iface.master is not None:
        master = facts.interface(iface.master)
        if master is not None and master.kind == "bridge":
            return master.name
    return name


# ------------------------------------------------------------------------------ planners


def plan_bridge_create(req: BridgeCreate, facts: HostNetworkReport, resolv_text: str | None = None) -> Plan:
    steps: list[Step] = []
    br = facts.interface(req.name)
    if br is None:
        steps.append(CreateBridge(req.name, req.stp))
    elif br.kind != "bridge":
        raise Conflict(f"{req.name} exists and is a {_kind_name(br)}, not a bridge")
    else:
        info = facts.bridge(req.name)
        if info is not None and info.stp != req.stp:
            steps.append(SetStp(req.name, req.stp))
    new_ports = [p for p in (_port_candidate(facts, n, req.name) for n in req.nics) if p is not None]
    steps += [SetMaster(p.name, req.name) for p in new_ports]
    if br is None or not br.admin_up:
        steps.append(SetLinkUp(req.name, True))
    for name in req.nics:
        nic = _require(facts, name)
        if not nic.admin_up:
            steps.append(SetLinkUp(name, True))
    steps += move_l3(
        facts,
        [p.name for p in new_ports],
        req.name,
        move_ip=req.move_ip,
        addresses=req.addresses,
        gateway=req.gateway,
        dns=req.dns,
        resolv_text=resolv_text,
    )
    return Plan(f"bridge create {req.name}", tuple(steps), touched=(req.name, *req.nics))


def plan_bridge_stp(req: BridgeStp, facts: HostNetworkReport) -> Plan:
    br = _require(facts, req.name)
    if br.kind != "bridge":
        raise InvalidRequest(f"{req.name} is a {_kind_name(br)}, not a bridge")
    info = facts.bridge(req.name)
    steps: tuple[Step, ...] = (
        () if info is not None and info.stp == req.enabled else (SetStp(req.name, req.enabled),)
    )
    return Plan(f"bridge stp {req.name} {'on' if req.enabled else 'off'}", steps, touched=(req.name,))


def _is_tap(iface: InterfaceInfo) -> bool:
    return iface.kind == "tun" or iface.name.startswith(("vnet", "macvtap"))


def plan_remove(req: InterfaceRemove, facts: HostNetworkReport, kind: str) -> Plan:
    """Delete a bridge or bond; its ports/slaves are released and ``restore_to`` gets its L3 back."""
    dev = facts.interface(req.name)
    operation = f"{kind} remove {req.name}"
    if dev is None:
        return Plan(operation, (), removed=(req.name,))
    if dev.kind != kind:
        raise InvalidRequest(f"{req.name} is a {_kind_name(dev)}, not a {kind}")
    ports = [i for i in facts.interfaces if i.master == req.name]
    taps = [p.name for p in ports if _is_tap(p)]
    if taps and not req.force:
        raise Conflict(
            f"VM interfaces are still attached to {req.name}: {', '.join(taps)}; detach them first or use --force"
        )
    nics = [p for p in ports if not _is_tap(p)]
    if kind == "bond":
        bond = facts.bond(req.name)
        order = [s.name for s in bond.slaves] if bond is not None else []
        nics.sort(
            key=lambda p: (
                p.name != (bond.primary if bond else None),
                order.index(p.name) if p.name in order else 99,
            )
        )
    has_l3 = bool(dev.addresses) or any(r.dev == req.name for r in managed_routes(facts.routes))
    restore_to = req.restore_to
    if restore_to is None and has_l3:
        if len(nics) == 1 or (kind == "bond" and nics):
            restore_to = nics[0].name
        else:
            raise Conflict(
                f"{req.name} has addresses and {len(nics)} ports: say which interface gets them back (--restore-to)"
            )
    if restore_to is not None:
        _require(facts, restore_to)
        if restore_to not in {p.name for p in ports}:
            target = facts.interface(restore_to)
            if target is not None and target.master is not None:
                raise Conflict(f"{restore_to} is enslaved to {target.master}; it cannot take the addresses")
    steps: list[Step] = [SetMaster(p.name, None) for p in ports]
    steps += [SetLinkUp(p.name, True) for p in nics]
    if restore_to is not None:
        steps += move_l3(facts, [req.name], restore_to)
    steps += [SetLinkUp(req.name, False), DeleteLink(req.name)]
    touched = tuple(p.name for p in nics)
    return Plan(operation, tuple(steps), touched=touched, removed=(req.name,))


def plan_bond_create(  # noqa: PLR0912 - one branch per precondition
    req: BondCreate, facts: HostNetworkReport, resolv_text: str | None = None
) -> Plan:
    steps: list[Step] = []
    bond = facts.interface(req.name)
    if bond is None:
        steps.append(CreateBond(req.name, req.mode, req.miimon))
    elif bond.kind != "bond":
        raise Conflict(f"{req.name} exists and is a {_kind_name(bond)}, not a bond")
    else:
        info = facts.bond(req.name)
        if info is not None and info.mode != req.mode:
            raise Conflict(f"bond {req.name} exists in mode {info.mode}; remove it to change the mode")
        if info is not None and info.miimon != req.miimon:
            steps.append(SetBondMiimon(req.name, req.miimon))
    new_slaves = [s for s in (_port_candidate(facts, n, req.name) for n in req.slaves) if s is not None]
    for s in new_slaves:
        steps += [SetLinkUp(s.name, False), SetMaster(s.name, req.name), SetLinkUp(s.name, True)]
    if req.primary is not None:
        info = facts.bond(req.name)
        if info is None or info.primary != req.primary:
            steps.append(SetBondPrimary(req.name, req.primary))
    if bond is None or not bond.admin_up:
        steps.append(SetLinkUp(req.name, True))
    target = req.name
    sources = [s.name for s in new_slaves]
    touched = [req.name, *req.slaves]
    if req.bridge is not None:
        br = facts.interface(req.bridge)
        if br is None:
            steps.append(CreateBridge(req.bridge, req.bridge_stp))
        elif br.kind != "bridge":
            raise Conflict(f"{req.bridge} exists and is a {_kind_name(br)}, not a bridge")
        if bond is None or bond.master != req.bridge:
            if bond is not None and bond.master is not None:
                raise Conflict(f"bond {req.name} is already enslaved to {bond.master}")
            steps.append(SetMaster(req.name, req.bridge))
        if br is None or not br.admin_up:
            steps.append(SetLinkUp(req.bridge, True))
        target = req.bridge
        sources.append(req.name)
        touched.append(req.bridge)
    steps += move_l3(
        facts,
        sources,
        target,
        move_ip=req.move_ip,
        addresses=req.addresses,
        gateway=req.gateway,
        dns=req.dns,
        resolv_text=resolv_text,
    )
    return Plan(f"bond create {req.name}", tuple(steps), touched=tuple(touched))


def plan_bond_enslave(req: BondEnslave, facts: HostNetworkReport) -> Plan:
    bond = _require(facts, req.name)
    if bond.kind != "bond":
        raise InvalidRequest(f"{req.name} is a {_kind_name(bond)}, not a bond")
    nic = _port_candidate(facts, req.nic, req.name)
    steps: list[Step] = []
    if nic is not None:
        steps += [SetLinkUp(nic.name, False), SetMaster(nic.name, req.name), SetLinkUp(nic.name, True)]
        steps += move_l3(facts, [nic.name], _l3_holder(facts, req.name))
    return Plan(f"bond enslave {req.name} {req.nic}", tuple(steps), touched=(req.name, req.nic))


# ------------------------------------------------------------------------------ the way back

RestorePhase = Callable[[Snapshot, HostNetworkReport, "str | None"], list[Step]]


def _restore_links(snap: Snapshot, facts: HostNetworkReport, _resolv: str | None) -> list[Step]:
    """Delete the virtual devices the change created (VLANs, then bridges, then bonds)."""
    known = {i.name for i in snap.interfaces}
    created = [i for i in facts.interfaces if i.name not in known and i.kind in MANAGED_KINDS]
    created.sort(key=lambda i: MANAGED_KINDS.index(i.kind))
    return [DeleteLink(i.name) for i in created]


def _restore_masters(snap: Snapshot, facts: HostNetworkReport, _resolv: str | None) -> list[Step]:
    steps: list[Step] = []
    kinds = {i.name: i.kind for i in facts.interfaces}
    for old in snap.interfaces:
        now = facts.interface(old.name)
        if now is None or now.master == old.master:
            continue
        if old.master is None:
            steps.append(SetMaster(old.name, None))
        elif old.master in kinds:
            if kinds[old.master] == "bond":
                steps.append(SetLinkUp(old.name, False))
            steps.append(SetMaster(old.name, old.master))
    return steps


class _Named(Protocol):
    @property
    def name(self) -> str: ...


N = TypeVar("N", bound=_Named)


def _flags_back(
    before: Iterable[N],
    now: Callable[[str], N | None],
    flag: Callable[[N], bool],
    step: Callable[[str, bool], Step],
) -> list[Step]:
    """A ``step`` for each link of ``before`` whose ``flag`` differs now (links gone are left alone)."""
    steps: list[Step] = []
    for old in before:
        current = now(old.name)
        if current is not None and flag(current) != flag(old):
            steps.append(step(old.name, flag(old)))
    return steps


def _restore_up(snap: Snapshot, facts: HostNetworkReport, _resolv: str | None) -> list[Step]:
    return _flags_back(snap.interfaces, facts.interface, lambda i: i.admin_up, SetLinkUp)


def _restore_addresses(snap: Snapshot, facts: HostNetworkReport, _resolv: str | None) -> list[Step]:
    steps: list[Step] = []
    old_by_name = {i.name: i for i in snap.interfaces}
    for now in facts.interfaces:
        old = old_by_name.get(now.name)
        if old is None:
            continue
        steps += [DelAddress(now.name, a) for a in now.addresses if a not in old.addresses]
    for before in snap.interfaces:
        current = facts.interface(before.name)
        if current is not None:
            steps += [AddAddress(before.name, a) for a in before.addresses if a not in current.addresses]
    return steps


def _restore_routes(snap: Snapshot, facts: HostNetworkReport, _resolv: str | None) -> list[Step]:
    old = {route_key(r): r for r in managed_routes(snap.routes)}
    now = {route_key(r): r for r in managed_routes(facts.routes)}
    devices = {i.name for i in facts.interfaces}
    steps: list[Step] = [DelRoute(r) for k, r in now.items() if k not in old]
    steps += [AddRoute(r) for k, r in old.items() if k not in now and (r.dev is None or r.dev in devices)]
    return steps


def _restore_stp(snap: Snapshot, facts: HostNetworkReport, _resolv: str | None) -> list[Step]:
    return _flags_back(snap.bridges, facts.bridge, lambda b: b.stp, SetStp)


def _restore_dns(snap: Snapshot, _facts: HostNetworkReport, resolv_text: str | None) -> list[Step]:
    if snap.resolv_conf is not None and resolv_text != snap.resolv_conf:
        return [RestoreResolvConf(snap.resolv_conf)]
    return []


#: In order; the executor re-reads the facts before each phase.
RESTORE_PHASES: tuple[RestorePhase, ...] = (
    _restore_links,
    _restore_masters,
    _restore_up,
    _restore_addresses,
    _restore_routes,
    _restore_stp,
    _restore_dns,
)


def restore_steps(snap: Snapshot, facts: HostNetworkReport, resolv_text: str | None) -> list[Step]:
    """Every step still needed to get back to ``snap`` (empty when the host matches it)."""
    return [s for phase in RESTORE_PHASES for s in phase(snap, facts, resolv_text)]
