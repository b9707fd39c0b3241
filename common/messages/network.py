"""Host and VM networking: libvirt networks, host bridges and bonds, safe changes.

Three groups of types:

* **Facts** (:class:`HostNetworkReport` and its parts): what an agent adds to every host report
  and returns for ``net.host.facts``: interfaces with addresses, routes, bridges with ports and
  STP, bonds with what ``/proc/net/bonding/<bond>`` shows, libvirt networks, DNS servers,
  IPv4 forwarding, and the last automatic rollback.
* **libvirt networks** (``net.*``): define/start/stop/autostart/undefine NAT, isolated and
  bridge-forward networks (``virsh net-*``), IPv4 forwarding.
* **Host changes** (``net.bridge.*``, ``net.bond.*``): each is applied by the agent as a
  transaction (snapshot, apply, prove the broker is reachable again within
  :attr:`ChangeOptions.deadline_s`, else restore the snapshot by itself) and answered with a
  :class:`NetChangeResult`.

API kinds (``api.net.*``, client -> controller) take the same bodies as the agent kinds; their
``host`` field names the target host (agents ignore it).
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated

import msgspec
from msgspec import Meta

from common.errors import InvalidRequest
from common.messages.api import API
from common.messages.base import Message
from common.messages.descriptor import Family, Role, Timeout, Version, command, host_twin, query
from common.messages.limits import MAX_ITEMS, Count, Name, Token
from common.validation import check_host_id, check_ifname, check_name

#: Linux bonding modes by name, with the number ``BONDING_OPTS="mode=N"`` and netlink use.
BOND_MODES: dict[str, int] = {
    "balance-rr": 0,
    "active-backup": 1,
    "balance-xor": 2,
    "broadcast": 3,
    "802.3ad": 4,
    "balance-tlb": 5,
    "balance-alb": 6,
}
NETWORK_MODES = ("nat", "isolated", "bridge")
MAX_DEADLINE_S = 90.0  # the agent kind's timeout class is 120 s: apply + probe + rollback must fit
MAX_CONFIRM_S = 3600.0
_CHANGE_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")


# ----------------------------------------------------------------------------- validation


def check_cidr(value: str, what: str = "address") -> str:
    """``value`` if it is an interface address with prefix (``10.0.0.2/24``, ``2001:db8::2/64``)."""
    if "/" not in value:
        raise InvalidRequest(f"invalid {what} {value!r}: expected ADDRESS/PREFIX, e.g. 192.168.1.233/24")
    try:
        iface = ipaddress.ip_interface(value)
    except ValueError:
        raise InvalidRequest(
            f"invalid {what} {value!r}: expected ADDRESS/PREFIX, e.g. 192.168.1.233/24"
        ) from None
    return str(iface)


def check_ip(value: str, what: str = "IP address") -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise InvalidRequest(f"invalid {what} {value!r}") from None


def check_change_id(value: str) -> str:
    if value and not _CHANGE_ID_RE.fullmatch(value):
        raise InvalidRequest(f"invalid change id {value!r}")
    return value


def _check_host(value: str) -> None:
    if value:
        check_host_id(value)


def _unique_ifnames(values: tuple[str, ...], what: str) -> None:
    for v in values:
        check_ifname(v)
    if len(set(values)) != len(values):
        raise InvalidRequest(f"{what}: an interface is named twice")


# ----------------------------------------------------------------------------- facts


class InterfaceInfo(Message, frozen=True):
    """One network interface as netlink shows it (``ip -d addr`` equivalent)."""

    name: str
    index: int
    kind: str = ""  # bridge, bond, veth, vlan, tun, loopback, ... ("" = physical / unknown)
    mac: str = ""
    mtu: int = 0
    admin_up: bool = False
    oper_state: str = ""  # UP, DOWN, UNKNOWN, LOWERLAYERDOWN, ...
    carrier: bool = False
    master: str | None = None
    addresses: tuple[str, ...] = ()  # CIDR, scope global and host (IPv6 link-local left out)
    vlan_id: int | None = None
    link: str | None = None  # parent of a VLAN


class RouteInfo(Message, frozen=True):
    """A route of the main table (``dst`` is ``default`` or a CIDR)."""

    dst: str
    dev: str | None = None
    gateway: str | None = None
    metric: int = 0
    proto: str = "boot"  # kernel, boot, static, dhcp, ra, ... (kernel = made from an address)
    scope: str = "universe"
    family: str = "inet"  # inet | inet6
    prefsrc: str | None = None


class BridgePort(Message, frozen=True):
    name: str
    state: str = ""  # disabled, listening, learning, forwarding, blocking


class BridgeInfo(Message, frozen=True):
    name: str
    stp: bool = False
    ports: tuple[BridgePort, ...] = ()
    forward_delay_cs: int = 0


class BondSlaveInfo(Message, frozen=True):
    """One slave as ``/proc/net/bonding/<bond>`` lists it."""

    name: str
    mii_status: str = ""  # up, down, going down (fail), going back (back)
    state: str = ""  # active | backup
    link_failure_count: int = 0
    perm_hwaddr: str = ""


class BondInfo(Message, frozen=True):
    name: str
    mode: str = ""  # a key of BOND_MODES
    miimon: int = 0
    active_slave: str | None = None
    primary: str | None = None
    slaves: tuple[BondSlaveInfo, ...] = ()


class LibvirtNetworkInfo(Message, frozen=True):
    """One libvirt network (``virsh net-list --all`` + ``net-dumpxml``)."""

    name: str
    active: bool = False
    autostart: bool = False
    persistent: bool = True
    forward_mode: str = "isolated"  # nat, route, bridge, open, ..., isolated (no <forward>)
    bridge: str | None = None
    address: str | None = None  # the host side of the network, CIDR (192.168.122.1/24)
    dhcp_start: str | None = None
    dhcp_end: str | None = None
    uuid: str = ""


class RollbackInfo(Message, frozen=True):
    """A change the agent undid by itself (or on the operator's ``revert``)."""

    change_id: str
    operation: str
    at: float
    reason: str
    restored: bool = True  # False: some of the snapshot could not be put back (see errors)
    errors: tuple[str, ...] = ()


class PendingChange(Message, frozen=True):
    """A change applied with ``--confirm`` that is undone unless confirmed before ``expires_at``."""

    change_id: str
    operation: str
    expires_at: float


class HostNetworkReport(Message, frozen=True):
    """Network facts an agent adds to its host report (interfaces, bridges, bonds, routes)."""

    interfaces: tuple[InterfaceInfo, ...] = ()
    routes: tuple[RouteInfo, ...] = ()
    bridges: tuple[BridgeInfo, ...] = ()
    bonds: tuple[BondInfo, ...] = ()
    networks: tuple[LibvirtNetworkInfo, ...] = ()
    dns: tuple[str, ...] = ()
    ipv4_forwarding: bool | None = None
    persistence: str = ""  # ifcfg | networkd | keyfile | none
    last_rollback: RollbackInfo | None = None
    pending: PendingChange | None = None
    errors: tuple[str, ...] = ()  # facts that could not be read

    def interface(self, name: str) -> InterfaceInfo | None:
        return next((i for i in self.interfaces if i.name == name), None)

    def bond(self, name: str) -> BondInfo | None:
        return next((b for b in self.bonds if b.name == name), None)

    def bridge(self, name: str) -> BridgeInfo | None:
        return next((b for b in self.bridges if b.name == name), None)


# ----------------------------------------------------------------------------- libvirt networks


class NetworkSpec(Message, frozen=True):
    """A libvirt network: ``nat`` (like ``default``), ``isolated`` (no forwarding) or ``bridge``
    (guests join an existing host bridge such as br0)."""

    name: Name
    mode: Token = "nat"
    bridge: Token | None = None  # nat/isolated: the bridge libvirt creates (virbrN if None)
    address: Token | None = None  # nat/isolated: host address on it, CIDR (192.168.122.1/24)
    dhcp_start: Token | None = None
    dhcp_end: Token | None = None
    forward_dev: Token | None = None  # nat: only NAT out of this interface
    stp: bool = True

    def __post_init__(self) -> None:  # noqa: PLR0912 - one branch per rule
        check_name(self.name, "network name")
        if self.mode not in NETWORK_MODES:
            raise InvalidRequest(f"network mode must be one of {', '.join(NETWORK_MODES)}, got {self.mode!r}")
        if self.bridge is not None:
            check_ifname(self.bridge)
        if self.forward_dev is not None:
            check_ifname(self.forward_dev)
            if self.mode != "nat":
                raise InvalidRequest("a forward device only applies to nat networks")
        if self.mode == "bridge":
            if self.bridge is None:
                raise InvalidRequest("a bridge network needs the host bridge to join (--bridge br0)")
            if self.address or self.dhcp_start or self.dhcp_end:
                raise InvalidRequest(
                    "a bridge network has no address or DHCP of its own (the LAN provides them)"
                )
            return
        if self.mode == "nat" and self.address is None:
            raise InvalidRequest("a nat network needs an address, e.g. --address 192.168.122.1/24")
        if self.address is not None:
            iface = ipaddress.ip_interface(check_cidr(self.address))
            if iface.ip == iface.network.network_address and iface.network.prefixlen < iface.max_prefixlen:
                raise InvalidRequest(
                    f"{self.address}: use the host's address in the subnet, not the network address"
                )
        if (self.dhcp_start is None) != (self.dhcp_end is None):
            raise InvalidRequest("a DHCP range needs both a start and an end")
        if self.dhcp_start is not None and self.dhcp_end is not None:
            if self.address is None:
                raise InvalidRequest("DHCP needs the network's address")
            net = ipaddress.ip_interface(self.address).network
            start = ipaddress.ip_address(check_ip(self.dhcp_start, "DHCP start"))
            end = ipaddress.ip_address(check_ip(self.dhcp_end, "DHCP end"))
            if start not in net or end not in net:
                raise InvalidRequest(f"the DHCP range {start}-{end} is not inside {net}")
            if int(start) > int(end):
                raise InvalidRequest(f"the DHCP range {start}-{end} ends before it starts")


class DefineNetwork(Message, frozen=True):
    """``net.define``: define a libvirt network, then (by default) start it and mark it autostart."""

    spec: NetworkSpec
    host: Name = ""
    start: bool = True
    autostart: bool = True

    def __post_init__(self) -> None:
        _check_host(self.host)


class NetworkRef(Message, frozen=True):
    """``net.start`` / ``net.stop`` / ``net.undefine``."""

    name: Name
    host: Name = ""

    def __post_init__(self) -> None:
        check_name(self.name, "network name")
        _check_host(self.host)


class NetworkAutostart(Message, frozen=True):
    name: Name
    host: Name = ""
    enabled: bool = True

    def __post_init__(self) -> None:
        check_name(self.name, "network name")
        _check_host(self.host)


class NetworkResult(Message, frozen=True):
    network: LibvirtNetworkInfo | None
    message: str = ""


class NetworkListRequest(Message, frozen=True):
    """``net.list`` (one host, live) / ``api.net.list`` (all hosts from their reports, or one)."""

    host: Name = ""
    live: bool = False

    def __post_init__(self) -> None:
        _check_host(self.host)


class NetworkList(Message, frozen=True):
    networks: tuple[LibvirtNetworkInfo, ...] = ()


class HostNetworkEntry(Message, frozen=True):
    host: str
    network: LibvirtNetworkInfo


class FleetNetworkList(Message, frozen=True):
    entries: tuple[HostNetworkEntry, ...] = ()


class IpForwardRequest(Message, frozen=True):
    """``net.ip_forward``: read (and with ``enable``, switch on) net.ipv4.ip_forward."""

    host: Name = ""
    enable: bool = False
    persist: bool = True

    def __post_init__(self) -> None:
        _check_host(self.host)


class IpForwardState(Message, frozen=True):
    enabled: bool
    changed: bool = False
    persisted: tuple[str, ...] = ()
    message: str = ""


class HostNetShow(Message, frozen=True):
    """``net.host.facts`` (agent, always live) / ``api.net.host.show`` (last report unless live)."""

    host: Name = ""
    live: bool = False

    def __post_init__(self) -> None:
        _check_host(self.host)


# ----------------------------------------------------------------------------- host changes


class ChangeOptions(Message, frozen=True):
    """How a host change is applied.

    ``deadline_s``: after applying, the agent must reach the broker again within this many
    seconds or it restores the previous configuration by itself. ``confirm_s``: if set, the
    change is then held for this long and undone unless ``net.host.confirm`` arrives (like
    ``netplan try``). ``persist``: write the host's network configuration files once the
    change is kept. ``dry_run``: only plan, change nothing.
    """

    deadline_s: float = 30.0
    confirm_s: float | None = None
    persist: bool = True
    dry_run: bool = False

    def __post_init__(self) -> None:
        if not 1.0 <= self.deadline_s <= MAX_DEADLINE_S:
            raise InvalidRequest(
                f"the rollback deadline must be 1-{MAX_DEADLINE_S:g} s, got {self.deadline_s:g}"
            )
        if self.confirm_s is not None and not 1.0 <= self.confirm_s <= MAX_CONFIRM_S:
            raise InvalidRequest(f"the confirm timeout must be 1-{MAX_CONFIRM_S:g} s, got {self.confirm_s:g}")


def _check_addressing(addresses: tuple[str, ...], gateway: str | None, dns: tuple[str, ...]) -> None:
    for a in addresses:
        check_cidr(a)
    if gateway is not None:
        check_ip(gateway, "gateway")
    for d in dns:
        check_ip(d, "DNS server")


class BridgeCreate(Message, frozen=True):
    """``net.bridge.create``: create a bridge (``brctl addbr``), enslave NICs (``brctl addif``),
    move their addresses, routes (the default route) and DNS onto it, STP on/off.

    ``addresses``/``gateway``/``dns`` add to (and for the gateway replace) what is moved.
    """

    name: Name
    nics: Annotated[tuple[Token, ...], Meta(max_length=MAX_ITEMS)] = ()
    host: Name = ""
    stp: bool = False
    move_ip: bool = True
    addresses: Annotated[tuple[Token, ...], Meta(max_length=MAX_ITEMS)] = ()
    gateway: Token | None = None
    dns: Annotated[tuple[Token, ...], Meta(max_length=MAX_ITEMS)] = ()
    options: ChangeOptions = msgspec.field(default_factory=ChangeOptions)
    change_id: Token = ""

    def __post_init__(self) -> None:
        check_ifname(self.name)
        _unique_ifnames(self.nics, "bridge ports")
        if self.name in self.nics:
            raise InvalidRequest(f"bridge {self.name} cannot be its own port")
        _check_addressing(self.addresses, self.gateway, self.dns)
        _check_host(self.host)
        check_change_id(self.change_id)


class BridgeStp(Message, frozen=True):
    """``net.bridge.stp``: spanning tree on or off."""

    name: Name
    enabled: bool
    host: Name = ""
    options: ChangeOptions = msgspec.field(default_factory=ChangeOptions)
    change_id: Token = ""

    def __post_init__(self) -> None:
        check_ifname(self.name)
        _check_host(self.host)
        check_change_id(self.change_id)


class InterfaceRemove(Message, frozen=True):
    """``net.bridge.remove`` / ``net.bond.remove``: release the ports or slaves, give the
    addresses, routes back to ``restore_to`` (default: the only port, or the first slave) and
    delete the bridge or bond."""

    name: Name
    host: Name = ""
    restore_to: Token | None = None
    force: bool = False  # remove a bridge even though VM taps are attached
    options: ChangeOptions = msgspec.field(default_factory=ChangeOptions)
    change_id: Token = ""

    def __post_init__(self) -> None:
        check_ifname(self.name)
        if self.restore_to is not None:
            check_ifname(self.restore_to)
        _check_host(self.host)
        check_change_id(self.change_id)


class BondCreate(Message, frozen=True):
    """``net.bond.create``: a bond (active-backup, miimon 100 unless told otherwise) over
    ``slaves``, with the slaves' addresses moved onto it (plus ``addresses``/``gateway``/
    ``dns``), optionally under a new bridge ``bridge`` that then carries the addresses."""

    name: Name
    slaves: Annotated[tuple[Token, ...], Meta(max_length=MAX_ITEMS)]
    host: Name = ""
    mode: Token = "active-backup"
    miimon: Count = 100
    primary: Token | None = None
    move_ip: bool = True
    addresses: Annotated[tuple[Token, ...], Meta(max_length=MAX_ITEMS)] = ()
    gateway: Token | None = None
    dns: Annotated[tuple[Token, ...], Meta(max_length=MAX_ITEMS)] = ()
    bridge: Token | None = None
    bridge_stp: bool = False
    options: ChangeOptions = msgspec.field(default_factory=ChangeOptions)
    change_id: Token = ""

    def __post_init__(self) -> None:
        check_ifname(self.name)
        if not self.slaves:
            raise InvalidRequest("a bond needs at least one slave NIC")
        _unique_ifnames(self.slaves, "bond slaves")
        if self.name in self.slaves:
            raise InvalidRequest(f"bond {self.name} cannot be its own slave")
        if self.mode not in BOND_MODES:
            raise InvalidRequest(f"bond mode must be one of {', '.join(BOND_MODES)}, got {self.mode!r}")
        if isinstance(self.miimon, bool) or not 0 <= self.miimon <= 60000:
            raise InvalidRequest(f"miimon must be 0-60000 ms, got {self.miimon!r}")
        if self.primary is not None and self.primary not in self.slaves:
            raise InvalidRequest(f"primary {self.primary} is not one of the slaves")
        if self.bridge is not None:
            check_ifname(self.bridge)
            if self.bridge == self.name or self.bridge in self.slaves:
                raise InvalidRequest(f"bridge {self.bridge} clashes with the bond or a slave")
        _check_addressing(self.addresses, self.gateway, self.dns)
        _check_host(self.host)
        check_change_id(self.change_id)


class BondEnslave(Message, frozen=True):
    """``net.bond.enslave``: add a NIC to an existing bond (its addresses move to the bond)."""

    name: Name
    nic: Token
    host: Name = ""
    options: ChangeOptions = msgspec.field(default_factory=ChangeOptions)
    change_id: Token = ""

    def __post_init__(self) -> None:
        check_ifname(self.name)
        check_ifname(self.nic)
        if self.nic == self.name:
            raise InvalidRequest(f"bond {self.name} cannot be its own slave")
        _check_host(self.host)
        check_change_id(self.change_id)


class ChangeRef(Message, frozen=True):
    """``net.host.confirm`` / ``net.host.revert``: keep or undo a change made with ``--confirm``."""

    change_id: Token
    host: Name = ""

    def __post_init__(self) -> None:
        if not self.change_id:
            raise InvalidRequest("a change id is required")
        check_change_id(self.change_id)
        _check_host(self.host)


class NetChangeResult(Message, frozen=True):
    """What became of a host change.

    ``state``: ``applied`` (kept; persisted unless --no-persist), ``unchanged`` (already so),
    ``pending-confirm`` (kept until ``confirm_expires_at`` unless confirmed), ``rolled-back``
    (undone by the agent: see ``rollback_reason``), ``reverted`` (undone on request),
    ``dry-run`` (``steps`` is the plan).
    """

    change_id: str
    operation: str
    state: str
    steps: tuple[str, ...] = ()
    rolled_back: bool = False
    rollback_reason: str = ""
    restored: bool = True
    probe: str = ""
    persisted: tuple[str, ...] = ()
    persistence: str = ""
    warnings: tuple[str, ...] = ()
    confirm_expires_at: float | None = None
    elapsed_s: float = 0.0
    facts: HostNetworkReport | None = None


# ----------------------------------------------------------------------------- kinds

_F, _N = Timeout.FAST, Timeout.NORMAL
_ADMIN = Role.ADMIN

#: Host and libvirt networking (controller -> agent).
NET = Family("net", Version(1, 0), "controller -> agent: libvirt networks, bridges, bonds, host addresses")

# -- controller -> agent; most are also API calls ``api.<kind>`` forwarded to ``body.host``
NET_DEFINE = command(
    NET,
    "net.define",
    DefineNetwork,
    NetworkResult,
    _N,
    "virsh net-define [+ net-start + net-autostart]",
    idempotent=True,
)
NET_START = command(NET, "net.start", NetworkRef, NetworkResult, _N, "virsh net-start", idempotent=True)
NET_STOP = command(NET, "net.stop", NetworkRef, NetworkResult, _N, "virsh net-destroy", idempotent=True)
NET_AUTOSTART = command(
    NET,
    "net.autostart",
    NetworkAutostart,
    NetworkResult,
    _F,
    "virsh net-autostart [--disable]",
    idempotent=True,
)
NET_UNDEFINE = command(
    NET, "net.undefine", NetworkRef, NetworkResult, _N, "virsh net-destroy + net-undefine", idempotent=True
)
NET_IP_FORWARD = command(
    NET,
    "net.ip_forward",
    IpForwardRequest,
    IpForwardState,
    _F,
    "cat / echo 1 > /proc/sys/net/ipv4/ip_forward",
    idempotent=True,
)
NET_HOST_FACTS = command(
    NET,
    "net.host.facts",
    HostNetShow,
    HostNetworkReport,
    _F,
    "interfaces, routes, bridges, bonds, networks now",
    idempotent=True,
)
NET_BRIDGE_CREATE = command(
    NET,
    "net.bridge.create",
    BridgeCreate,
    NetChangeResult,
    _N,
    "bridge + NIC, IP/route/DNS moved (transaction)",
    idempotent=True,
)
NET_BRIDGE_STP = command(
    NET, "net.bridge.stp", BridgeStp, NetChangeResult, _N, "bridge STP on/off", idempotent=True
)
NET_BRIDGE_REMOVE = command(
    NET,
    "net.bridge.remove",
    InterfaceRemove,
    NetChangeResult,
    _N,
    "delete a bridge, NIC restored (transaction)",
    idempotent=True,
)
NET_BOND_CREATE = command(
    NET,
    "net.bond.create",
    BondCreate,
    NetChangeResult,
    _N,
    "bond (+bridge), IP/route/DNS moved (transaction)",
    idempotent=True,
)
NET_BOND_ENSLAVE = command(
    NET,
    "net.bond.enslave",
    BondEnslave,
    NetChangeResult,
    _N,
    "add a NIC to a bond (transaction)",
    idempotent=True,
)
NET_BOND_REMOVE = command(
    NET,
    "net.bond.remove",
    InterfaceRemove,
    NetChangeResult,
    _N,
    "delete a bond, slave restored (transaction)",
    idempotent=True,
)
NET_HOST_CONFIRM = command(
    NET,
    "net.host.confirm",
    ChangeRef,
    NetChangeResult,
    _F,
    "keep a change made with --confirm",
    idempotent=True,
)
NET_HOST_REVERT = command(
    NET,
    "net.host.revert",
    ChangeRef,
    NetChangeResult,
    _N,
    "undo a change made with --confirm now",
    idempotent=True,
)
NET_LIST = command(
    NET, "net.list", NetworkListRequest, NetworkList, _F, "virsh net-list --all", idempotent=True
)

# -- client -> controller
API_NET_DEFINE = host_twin(NET_DEFINE, role=_ADMIN)
API_NET_START = host_twin(NET_START, role=_ADMIN)
API_NET_STOP = host_twin(NET_STOP, role=_ADMIN)
API_NET_AUTOSTART = host_twin(NET_AUTOSTART, role=_ADMIN)
API_NET_UNDEFINE = host_twin(NET_UNDEFINE, role=_ADMIN)
API_NET_IP_FORWARD = host_twin(NET_IP_FORWARD, role=_ADMIN)
API_NET_BRIDGE_CREATE = host_twin(NET_BRIDGE_CREATE, role=_ADMIN)
API_NET_BRIDGE_STP = host_twin(NET_BRIDGE_STP, role=_ADMIN)
API_NET_BRIDGE_REMOVE = host_twin(NET_BRIDGE_REMOVE, role=_ADMIN)
API_NET_BOND_CREATE = host_twin(NET_BOND_CREATE, role=_ADMIN)
API_NET_BOND_ENSLAVE = host_twin(NET_BOND_ENSLAVE, role=_ADMIN)
API_NET_BOND_REMOVE = host_twin(NET_BOND_REMOVE, role=_ADMIN)
API_NET_HOST_CONFIRM = host_twin(NET_HOST_CONFIRM, role=_ADMIN)
API_NET_HOST_REVERT = host_twin(NET_HOST_REVERT, role=_ADMIN)
API_NET_LIST = query(
    API, "api.net.list", NetworkListRequest, FleetNetworkList, "virtfleet net list", timeout=_N
)
API_NET_HOST_SHOW = query(
    API, "api.net.host.show", HostNetShow, HostNetworkReport, "virtfleet host net show", timeout=_N
)
