"""The vocabulary of host network changes: steps, snapshots, pending-change records (pure data).

A planner (:mod:`agent.network.planner`) turns a request and the current facts into a list of
steps; the netlink driver and the resolv.conf writer execute them one by one. Every step is
idempotent at execution time too (adding an address that is there, deleting a route that is
gone, deleting a link that is gone all succeed), so a re-run after a partial failure or a
redelivered command is harmless.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass

from common.errors import NetworkConfigError
from common.messages.network import BridgeInfo, InterfaceInfo, RouteInfo

#: Virtual devices virtfleet creates (and may delete again when undoing a change).
MANAGED_KINDS = ("vlan", "bridge", "bond")


@dataclass(frozen=True, slots=True)
class CreateBridge:
    name: str
    stp: bool = False


@dataclass(frozen=True, slots=True)
class CreateBond:
    name: str
    mode: str
    miimon: int


@dataclass(frozen=True, slots=True)
class SetBondMiimon:
    name: str
    miimon: int


@dataclass(frozen=True, slots=True)
class SetBondPrimary:
    name: str
    primary: str


@dataclass(frozen=True, slots=True)
class DeleteLink:
    name: str


@dataclass(frozen=True, slots=True)
class SetMaster:
    name: str
    master: str | None


@dataclass(frozen=True, slots=True)
class SetLinkUp:
    name: str
    up: bool


@dataclass(frozen=True, slots=True)
class AddAddress:
    dev: str
    address: str


@dataclass(frozen=True, slots=True)
class DelAddress:
    dev: str
    address: str


@dataclass(frozen=True, slots=True)
class AddRoute:
    route: RouteInfo


@dataclass(frozen=True, slots=True)
class DelRoute:
    route: RouteInfo


@dataclass(frozen=True, slots=True)
class SetStp:
    name: str
    enabled: bool


@dataclass(frozen=True, slots=True)
class SetDns:
    """Replace the nameserver lines of resolv.conf (other lines are kept)."""

    servers: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class RestoreResolvConf:
    """Put resolv.conf back exactly as it was."""

    text: str


LinkStep = (
    CreateBridge
    | CreateBond
    | SetBondMiimon
    | SetBondPrimary
    | DeleteLink
    | SetMaster
    | SetLinkUp
    | AddAddress
    | DelAddress
    | AddRoute
    | DelRoute
    | SetStp
)
DnsStep = SetDns | RestoreResolvConf
Step = LinkStep | DnsStep


def describe_route(r: RouteInfo) -> str:
    via = f" via {r.gateway}" if r.gateway else ""
    dev = f" dev {r.dev}" if r.dev else ""
    metric = f" metric {r.metric}" if r.metric else ""
    return f"{r.dst}{via}{dev}{metric}"


def describe(step: Step) -> str:  # noqa: PLR0912 - one case per step type
    """One line, in the words of the ops notes (``brctl addif br0 eth0`` etc.)."""
    match step:
        case CreateBridge(name, stp):
            return f"create bridge {name} (stp {'on' if stp else 'off'})"
        case CreateBond(name, mode, miimon):
            return f"create bond {name} (mode {mode}, miimon {miimon})"
        case SetBondMiimon(name, miimon):
            return f"set bond {name} miimon {miimon}"
        case SetBondPrimary(name, primary):
            return f"set bond {name} primary {primary}"
        case DeleteLink(name):
            return f"delete {name}"
        case SetMaster(name, None):
            return f"release {name} from its master"
        case SetMaster(name, master):
            return f"enslave {name} to {master}"
        case SetLinkUp(name, up):
            return f"set {name} {'up' if up else 'down'}"
        case AddAddress(dev, address):
            return f"add address {address} to {dev}"
        case DelAddress(dev, address):
            return f"remove address {address} from {dev}"
        case AddRoute(route):
            return f"add route {describe_route(route)}"
        case DelRoute(route):
            return f"remove route {describe_route(route)}"
        case SetStp(name, enabled):
            return f"set bridge {name} stp {'on' if enabled else 'off'}"
        case SetDns(servers):
            return f"set DNS servers {', '.join(servers)}"
        case RestoreResolvConf():
            return "restore resolv.conf"
    raise AssertionError(f"unknown step {step!r}")  # pragma: no cover


def kernel_error(step: LinkStep, code: int, text: str) -> NetworkConfigError:
    """The error of ``step`` refused by the kernel with errno ``code`` (``text`` its words), with
    a hint where the errno alone misleads: the one wording of every link driver."""
    hint = ""
    if isinstance(step, CreateBond) and code in (errno.EOPNOTSUPP, errno.EINVAL):
        hint = " (the bonding driver is not available in this kernel)"
    elif isinstance(step, AddRoute) and code == errno.ENETUNREACH:
        hint = " (the gateway is not on a connected network of that interface)"
    action = describe(step)
    return NetworkConfigError(f"{action}: {text}{hint}", details={"errno": code, "action": action})


def no_device(name: str) -> NetworkConfigError:
    """A link driver's error for a step on an interface that does not exist (found before the
    kernel is asked, so not one of the idempotent answers)."""
    return NetworkConfigError(f"interface {name} does not exist", details={"errno": errno.ENODEV})


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What a transaction restores: links (master, up), addresses, routes, STP, resolv.conf."""

    interfaces: tuple[InterfaceInfo, ...]
    routes: tuple[RouteInfo, ...]
    bridges: tuple[BridgeInfo, ...]
    resolv_conf: str | None
    taken_at: float


@dataclass(frozen=True, slots=True)
class PendingRecord:
    """Written to the agent's state dir before a change is applied and removed once it is kept
    or undone: if the agent dies in between, it restores ``snapshot`` when it starts again."""

    change_id: str
    operation: str
    snapshot: Snapshot
    touched: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    expires_at: float | None = None


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """Whether the broker was reached after a change, and how it went."""

    ok: bool
    detail: str
    elapsed_s: float = 0.0


#: The "can I reach the broker again" check of a transaction: deadline in seconds -> result.
#: The real one is :class:`agent.network.probe.BrokerProbe`; tests inject their own.
Probe = Callable[[float], ProbeResult]
