"""In-memory host networking for the agent's network module: links, libvirt networks, the probe.

* :class:`FakeLinkDriver` is a :class:`~agent.network.transaction.LinkDriver`: it applies the
  planner's :data:`~agent.network.model.LinkStep` s to interfaces, addresses, routes, bridges and
  bonds kept in memory, and reports them as :class:`~common.messages.network.HostNetworkReport`.
  Its errors are :class:`~agent.network.netlink.NetlinkDriver`'s (same messages, ``errno`` in
  ``details``, the same steps idempotent), and the kernel's side effects that the planner and the
  rollback rely on happen here too: deleting an interface's last IPv4 address or setting it down
  drops its routes, setting it up brings back the connected routes, a route's gateway must be on a
  connected network, a device is enslaved to a bond only while down, IPv6 routes get metric 1024.
  Not modelled: VLANs (the planner makes none), STP port states (ports forward at once), MAC
  changes on enslaving, neighbour tables, other routing tables.
* :class:`FakeNetworks` is the module's ``NetworksPort`` over a
  :class:`~agent.drivers.fake.FakeHypervisor`'s libvirt networks, so a network defined here is one
  its domains can use.
* :class:`FakeProbe` answers the transaction's "can I reach the broker" question: always yes, as
  told, or by looking at the fake links (is there a usable route to the broker?).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import threading
import uuid as uuid_mod
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from agent.drivers.fake import FakeHypervisor
from agent.network import model
from agent.network.libvirt_net import already_defined, build_network_xml, parse_network_xml
from common.errors import NetworkConfigError, VirtfleetError
from common.messages.network import (
    BondInfo,
    BondSlaveInfo,
    BridgeInfo,
    BridgePort,
    HostNetworkReport,
    InterfaceInfo,
    LibvirtNetworkInfo,
    NetworkSpec,
    RouteInfo,
)

_KNOWN_PROTOS = frozenset({"unspec", "redirect", "kernel", "boot", "static", "dhcp", "ra"})
_DEFAULT_FORWARD_DELAY_CS = 1500  # the kernel's 15 s


def _netlink_error(step: model.LinkStep, code: int) -> NetworkConfigError:
    """What NetlinkDriver.apply raises when the kernel answers ``code``."""
    return model.kernel_error(step, code, os.strerror(code))


@dataclass
class _Link:
    name: str
    index: int
    kind: str  # "" (physical), loopback, bridge, bond, veth, tun
    mac: str
    admin_up: bool = False
    cable: bool = True  # physical carrier (NICs, taps); bridges and bonds derive theirs
    master: str | None = None
    addresses: list[str] = field(default_factory=list)
    mtu: int = 1500
    stp: bool = False
    bond_mode: str = ""
    miimon: int = 0
    primary: str | None = None


class FakeLinkDriver:
    """Interfaces, addresses, routes, bridges and bonds of one simulated host (thread-safe)."""

    def __init__(self, *, bonding: bool = True) -> None:
        """An empty host with only ``lo``; ``bonding`` False models a kernel without the bonding
        driver (this project's CI kernel): creating a bond fails as it does there."""
        self._lock = threading.RLock()
        self._links: dict[str, _Link] = {}
        self._routes: list[RouteInfo] = []
        self._next_index = 1
        self.bonding = bonding
        #: Every step applied successfully, in order.
        self.applied: list[model.LinkStep] = []
        self._failures: deque[tuple[type[model.LinkStep] | None, VirtfleetError]] = deque()
        self.add_link("lo", kind="loopback", addresses=("127.0.0.1/8",))

    @classmethod
    def simple(
        cls,
        *,
        nics: Sequence[str] = ("eth0",),
        bridges: Iterable[str] = (),
        ports: Mapping[str, Sequence[str]] | None = None,
        address: str | None = None,
        gateway: str | None = None,
        bonding: bool = True,
    ) -> FakeLinkDriver:
        """Physical ``nics`` (up, cable in), ``address`` and a default route via ``gateway`` on the
        first, and ``bridges`` (up) with their ``ports`` enslaved."""
        links = cls(bonding=bonding)
        for name in nics:
            links.add_link(name)
        if address is not None and nics:
            links.apply(model.AddAddress(nics[0], address))
            if gateway is not None:
                links.apply(model.AddRoute(RouteInfo("default", nics[0], gateway, proto="boot")))
        for bridge in bridges:
            links.ensure_bridge(bridge, (ports or {}).get(bridge, ()))
        links.applied.clear()
        return links

    # -- hooks -------------------------------------------------------------------------------------
    def add_link(
        self,
        name: str,
        *,
        kind: str = "",
        up: bool = True,
        cable: bool = True,
        addresses: Iterable[str] = (),
        mac: str | None = None,
    ) -> None:
        """Put an interface on the host (a NIC, a VM tap with kind ``tun``...), as if it was always there."""
        with self._lock:
            index = self._next_index
            self._next_index += 1
            self._links[name] = _Link(
                name, index, kind, mac or f"52:54:00:12:{index >> 8 & 0xFF:02x}:{index & 0xFF:02x}", up, cable
            )
            for a in addresses:
                self._add_address(self._links[name], a)

    def ensure_bridge(self, name: str, ports: Iterable[str] = ()) -> None:
        """A bridge that is up, with ``ports`` enslaved (created when missing)."""
        with self._lock:
            self.apply(model.CreateBridge(name))
            for port in ports:
                self.apply(model.SetMaster(port, name))
            self.apply(model.SetLinkUp(name, True))

    def set_cable(self, name: str, plugged: bool) -> None:
        """Pull or plug a NIC's cable (carrier), e.g. to make a bond fail over."""
        with self._lock:
            self._require(name).cable = plugged

    def fail_next(self, error: VirtfleetError, step: type[model.LinkStep] | None = None) -> None:
        """The next step (of type ``step``, or any) fails with ``error`` before it changes anything."""
        with self._lock:
            self._failures.append((step, error))

    def bridge_names(self) -> tuple[str, ...]:
        """The host's Linux bridges (what /sys/class/net shows): FakeHypervisor's ``bridge_source``."""
        with self._lock:
            return tuple(sorted(n for n, link in self._links.items() if link.kind == "bridge"))

    def reaches(self, ip: str) -> bool:
        """A packet to ``ip`` leaves by a usable route: the longest matching route's device has carrier
        and is nobody's port (a bridge or bond port's own addresses receive nothing: its frames go to
        the master, so an address left on a port is what cuts a host off)."""
        with self._lock:
            target = ipaddress.ip_address(ip)
            best: tuple[int, RouteInfo] | None = None
            for r in self._routes:
                net = self._network(r)
                if (
                    net.version == target.version
                    and target in net
                    and (best is None or net.prefixlen > best[0])
                ):
                    best = (net.prefixlen, r)
            if best is None or best[1].dev is None:
                return False
            link = self._links.get(best[1].dev)
            return link is not None and link.master is None and self._carrier(link)

    # -- LinkDriver --------------------------------------------------------------------------------
    def facts(self) -> HostNetworkReport:
        """Interfaces, main-table routes, bridges and bonds as they are now."""
        with self._lock:
            links = sorted(self._links.values(), key=lambda link: link.index)
            return HostNetworkReport(
                interfaces=tuple(self._interface(link) for link in links),
                routes=tuple(self._routes),
                bridges=tuple(self._bridge(link) for link in links if link.kind == "bridge"),
                bonds=tuple(self._bond(link) for link in links if link.kind == "bond"),
            )

    def apply(self, step: model.LinkStep) -> None:
        """Execute one step; 'already so' is success. NetworkConfigError otherwise, as NetlinkDriver."""
        with self._lock:
            if self._failures and self._failures[0][0] in (None, type(step)):
                raise self._failures.popleft()[1]
            self._apply(step)
            self.applied.append(step)

    # -- state -------------------------------------------------------------------------------------
    def _require(self, name: str) -> _Link:
        link = self._links.get(name)
        if link is None:
            raise model.no_device(name)
        return link

    @staticmethod
    def _network(r: RouteInfo) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        if r.dst == "default":
            return ipaddress.ip_network("::/0" if r.family == "inet6" else "0.0.0.0/0")
        return ipaddress.ip_network(r.dst, strict=False)

    def _carrier(self, link: _Link) -> bool:
        if not link.admin_up:
            return False
        if link.kind in ("bridge", "bond"):
            return any(self._carrier(p) for p in self._links.values() if p.master == link.name)
        return link.cable

    def _connected(self, link: _Link, address: str) -> RouteInfo | None:
        iface = ipaddress.ip_interface(address)
        if link.kind == "loopback" or (iface.version == 4 and iface.network.prefixlen == 32):
            return None  # lo's routes live in the local table, which facts do not show
        if iface.version == 4:
            return RouteInfo(str(iface.network), link.name, None, 0, "kernel", "link", "inet", str(iface.ip))
        return RouteInfo(str(iface.network), link.name, None, 256, "kernel", "universe", "inet6")

    def _add_address(self, link: _Link, address: str) -> None:
        link.addresses.append(address)
        route = self._connected(link, address)
        if link.admin_up and route is not None and route not in self._routes:
            self._routes.append(route)

    def _drop_routes(self, keep: Callable[[RouteInfo], bool]) -> None:
        self._routes = [r for r in self._routes if keep(r)]

    def _on_link(self, gateway: str, dev: str | None) -> str | None:
        """The device of a connected route that holds ``gateway`` (on ``dev`` when given)."""
        gw = ipaddress.ip_address(gateway)
        for r in self._routes:
            if r.proto != "kernel" or r.gateway is not None or (dev is not None and r.dev != dev):
                continue
            net = self._network(r)
            if net.version == gw.version and gw in net:
                return r.dev
        return None

    def _apply(self, step: model.LinkStep) -> None:  # noqa: PLR0912 - one branch per step type, like NetlinkDriver
        match step:
            case model.CreateBridge(name, stp):
                if name not in self._links:
                    self.add_link(name, kind="bridge", up=False)
                    self._links[name].stp = stp
            case model.CreateBond(name, mode, miimon):
                if not self.bonding:
                    raise _netlink_error(step, errno.EOPNOTSUPP)
                if name not in self._links:
                    self.add_link(name, kind="bond", up=False)
                    bond = self._links[name]
                    bond.bond_mode, bond.miimon = mode, miimon
            case model.SetBondMiimon(name, miimon):
                bond = self._require(name)
                if bond.kind != "bond":
                    raise _netlink_error(step, errno.EOPNOTSUPP)
                bond.miimon = miimon
            case model.SetBondPrimary(name, primary):
                bond = self._require(name)
                self._require(primary)
                if bond.kind != "bond":
                    raise _netlink_error(step, errno.EOPNOTSUPP)
                bond.primary = primary
            case model.DeleteLink(name):
                self._delete(step, name)
            case model.SetMaster(name, master):
                self._set_master(step, name, master)
            case model.SetLinkUp(name, up):
                self._set_up(self._require(name), up)
            case model.AddAddress(dev, address):
                link = self._require(dev)
                text = str(ipaddress.ip_interface(address))
                if text not in link.addresses:
                    self._add_address(link, text)
            case model.DelAddress(dev, address):
                self._del_address(self._require(dev), str(ipaddress.ip_interface(address)))
            case model.AddRoute(route):
                self._add_route(step, route)
            case model.DelRoute(route):
                self._del_route(route)
            case model.SetStp(name, enabled):
                link = self._require(name)
                if link.kind != "bridge":
                    raise _netlink_error(step, errno.EOPNOTSUPP)
                link.stp = enabled

    def _delete(self, step: model.LinkStep, name: str) -> None:
        link = self._links.get(name)
        if link is None:
            return
        if link.kind in ("", "loopback"):
            raise _netlink_error(step, errno.EOPNOTSUPP)  # physical devices cannot be deleted
        for port in self._links.values():
            if port.master == name:
                port.master = None
        del self._links[name]
        self._drop_routes(lambda r: r.dev != name)

    def _set_master(self, step: model.LinkStep, name: str, master: str | None) -> None:
        target = (
            self._require(master) if master is not None else None
        )  # NetlinkDriver looks the master up first
        link = self._require(name)
        if target is None:
            link.master = None
            return
        if target.kind not in ("bridge", "bond") or target is link:
            raise _netlink_error(step, errno.EOPNOTSUPP)
        if link.master == target.name:
            return
        if target.kind == "bond" and link.admin_up:
            raise _netlink_error(step, errno.EPERM)  # "Device can not be enslaved while up"
        link.master = target.name

    def _set_up(self, link: _Link, up: bool) -> None:
        if link.admin_up == up:
            return
        link.admin_up = up
        if not up:
            # The kernel flushes every route through a device that goes down.
            self._drop_routes(lambda r: r.dev != link.name)
            return
        for address in link.addresses:
            route = self._connected(link, address)
            if route is not None and route not in self._routes:
                self._routes.append(route)

    def _del_address(self, link: _Link, address: str) -> None:
        if address not in link.addresses:
            return
        link.addresses.remove(address)
        iface = ipaddress.ip_interface(address)
        ip = str(iface.ip)
        same_net = [a for a in link.addresses if ipaddress.ip_interface(a).network == iface.network]
        # Routes preferring this source address go only once no interface has the address any more.
        gone = not any(
            str(ipaddress.ip_interface(a).ip) == ip for other in self._links.values() for a in other.addresses
        )

        def flushed(r: RouteInfo) -> bool:
            connected = r.proto == "kernel" and r.dev == link.name and r.dst == str(iface.network)
            return (connected and not same_net) or (gone and r.prefsrc == ip)

        self._drop_routes(lambda r: not flushed(r))
        if iface.version == 4 and not any(ipaddress.ip_interface(a).version == 4 for a in link.addresses):
            # The last IPv4 address went: so do the device's IPv4 routes.
            self._drop_routes(lambda r: not (r.dev == link.name and r.family == "inet"))

    def _add_route(self, step: model.AddRoute, route: RouteInfo) -> None:
        dev = self._require(route.dev) if route.dev is not None else None
        metric = route.metric or (1024 if route.family == "inet6" else 0)
        if any(r.family == route.family and r.dst == route.dst and r.metric == metric for r in self._routes):
            raise _netlink_error(step, errno.EEXIST)
        out_dev = dev.name if dev is not None else None
        if route.gateway is not None:
            out_dev = self._on_link(route.gateway, out_dev)
            if out_dev is None:
                raise _netlink_error(step, errno.ENETUNREACH)
        elif dev is None:
            raise _netlink_error(step, errno.ENODEV)
        elif not dev.admin_up:
            raise _netlink_error(step, errno.ENETDOWN)
        if route.prefsrc and not any(
            str(ipaddress.ip_interface(a).ip) == route.prefsrc
            for link in self._links.values()
            for a in link.addresses
        ):
            raise _netlink_error(step, errno.EINVAL)
        proto = (
            "static"
            if route.proto in ("kernel", "static") or route.proto not in _KNOWN_PROTOS
            else route.proto
        )
        self._routes.append(
            RouteInfo(
                dst=route.dst,
                dev=out_dev,
                gateway=route.gateway,
                metric=metric,
                proto=proto,
                scope="link" if route.scope == "link" else "universe",
                family=route.family,
                prefsrc=route.prefsrc or None,
            )
        )

    def _del_route(self, route: RouteInfo) -> None:
        if route.dev is not None:
            self._require(route.dev)
        for i, r in enumerate(self._routes):
            if (
                r.family == route.family
                and r.dst == route.dst
                and (route.gateway is None or r.gateway == route.gateway)
                and (route.dev is None or r.dev == route.dev)
                and (not route.metric or r.metric == route.metric)
            ):
                del self._routes[i]
                return  # like the kernel: the first match; none is fine (ESRCH counts as done)

    # -- facts -------------------------------------------------------------------------------------
    def _interface(self, link: _Link) -> InterfaceInfo:
        carrier = self._carrier(link)
        oper = "UNKNOWN" if link.kind == "loopback" else ("UP" if carrier else "DOWN")
        return InterfaceInfo(
            name=link.name,
            index=link.index,
            kind=link.kind,
            mac=link.mac,
            mtu=65536 if link.kind == "loopback" else link.mtu,
            admin_up=link.admin_up,
            oper_state=oper,
            carrier=carrier,
            master=link.master,
            addresses=tuple(link.addresses),
        )

    def _ports(self, link: _Link) -> list[_Link]:
        return sorted((p for p in self._links.values() if p.master == link.name), key=lambda p: p.index)

    def _bridge(self, link: _Link) -> BridgeInfo:
        up = link.admin_up
        return BridgeInfo(
            name=link.name,
            stp=link.stp,
            ports=tuple(
                BridgePort(p.name, "forwarding" if up and self._carrier(p) else "disabled")
                for p in self._ports(link)
            ),
            forward_delay_cs=_DEFAULT_FORWARD_DELAY_CS,
        )

    def _bond(self, link: _Link) -> BondInfo:
        slaves = self._ports(link)
        up = [s for s in slaves if self._carrier(s)]
        primary = link.primary if any(s.name == link.primary for s in slaves) else None
        active: str | None = None
        if link.bond_mode == "active-backup" and up:
            active = primary if primary in {s.name for s in up} else up[0].name
        return BondInfo(
            name=link.name,
            mode=link.bond_mode,
            miimon=link.miimon,
            active_slave=active,
            primary=primary,
            slaves=tuple(
                BondSlaveInfo(
                    name=s.name,
                    mii_status="up" if self._carrier(s) else "down",
                    state="backup" if active is not None and s.name != active else "active",
                    perm_hwaddr=s.mac,
                )
                for s in slaves
            ),
        )


class FakeNetworks:
    """The network module's ``NetworksPort`` over a FakeHypervisor's libvirt networks, with
    :class:`~agent.network.libvirt_net.LibvirtNetworks`' semantics (define is idempotent for an
    identical network, start/stop say whether they changed anything, undefine stops first)."""

    def __init__(self, hypervisor: FakeHypervisor) -> None:
        self.hv = hypervisor

    def _get(self, name: str) -> LibvirtNetworkInfo:
        info = self.hv.network(name)
        if info is None:
            raise self.hv.network_not_found(name)
        return info

    @staticmethod
    def _with(
        info: LibvirtNetworkInfo, *, active: bool | None = None, autostart: bool | None = None
    ) -> LibvirtNetworkInfo:
        return LibvirtNetworkInfo(
            name=info.name,
            active=info.active if active is None else active,
            autostart=info.autostart if autostart is None else autostart,
            persistent=info.persistent,
            forward_mode=info.forward_mode,
            bridge=info.bridge,
            address=info.address,
            dhcp_start=info.dhcp_start,
            dhcp_end=info.dhcp_end,
            uuid=info.uuid,
        )

    def list(self) -> tuple[LibvirtNetworkInfo, ...]:
        return self.hv.network_infos()

    def define(self, spec: NetworkSpec) -> tuple[LibvirtNetworkInfo, bool]:
        """Define ``spec``; (info, created). An identical existing network is not an error."""
        with self.hv.lock:
            existing = self.hv.network(spec.name)
            if existing is not None:
                return already_defined(existing, spec)
            # What libvirt stores is what it reads back from the XML LibvirtNetworks would send.
            parsed = parse_network_xml(build_network_xml(spec))
            bridge = parsed.bridge
            if bridge is None:  # libvirt names a NAT/isolated network's bridge virbrN itself
                taken = {n.bridge for n in self.hv.network_infos()}
                bridge = next(f"virbr{i}" for i in range(1024) if f"virbr{i}" not in taken)
            info = LibvirtNetworkInfo(
                name=parsed.name,
                forward_mode=parsed.forward_mode,
                bridge=bridge,
                address=parsed.address,
                dhcp_start=parsed.dhcp_start,
                dhcp_end=parsed.dhcp_end,
                uuid=str(uuid_mod.uuid4()),
            )
            self.hv.put_network(info)
            return info, True

    def start(self, name: str) -> bool:
        with self.hv.lock:
            info = self._get(name)
            if info.active:
                return False
            self.hv.put_network(self._with(info, active=True))
            return True

    def stop(self, name: str) -> bool:
        with self.hv.lock:
            info = self._get(name)
            if not info.active:
                return False
            self.hv.put_network(self._with(info, active=False))
            return True

    def set_autostart(self, name: str, enabled: bool) -> None:
        with self.hv.lock:
            self.hv.put_network(self._with(self._get(name), autostart=enabled))

    def undefine(self, name: str) -> bool:
        return self.hv.drop_network(name)

    def info(self, name: str) -> LibvirtNetworkInfo:
        return self._get(name)


class FakeProbe:
    """A :data:`~agent.network.model.Probe`: the broker is reachable when ``reachable()`` says so
    (default: always), unless :meth:`fail_next` queued failures. Records every deadline it got."""

    def __init__(self, *, reachable: Callable[[], bool] | None = None) -> None:
        self.reachable = reachable or (lambda: True)
        self.calls: list[float] = []
        self._queued: deque[bool] = deque()
        self._lock = threading.Lock()

    def fail_next(self, times: int = 1) -> None:
        """The next ``times`` probes fail whatever the network looks like."""
        with self._lock:
            self._queued.extend([False] * times)

    def __call__(self, deadline_s: float) -> model.ProbeResult:
        with self._lock:
            self.calls.append(deadline_s)
            forced = self._queued.popleft() if self._queued else None
        ok = self.reachable() if forced is None else forced
        if ok:
            return model.ProbeResult(True, "reached the broker (fake probe)")
        return model.ProbeResult(
            False, f"broker unreachable (fake probe, {deadline_s:g} s)", elapsed_s=deadline_s
        )
