"""The netlink driver: host network facts and link/address/route steps over pyroute2.

The only module of the agent that imports pyroute2. Every ``NetlinkError`` is translated here,
once, into :class:`~common.errors.NetworkConfigError` (keeping the errno in ``details``).
Nothing is parsed from ``ip`` output and nothing goes through a shell.

Each call opens its own netlink socket (``IPRoute``, or ``NetNS`` for a named network
namespace) and closes it: sockets are cheap and this keeps the driver safe to use from the
agent's worker threads and its reporter thread at once.
"""

from __future__ import annotations

import errno
import ipaddress
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from pyroute2 import IPRoute, NetNS
from pyroute2.netlink.exceptions import NetlinkError

from agent.network import model
from common.errors import NetworkConfigError
from common.messages.network import (
    BOND_MODES,
    BondInfo,
    BondSlaveInfo,
    BridgeInfo,
    BridgePort,
    HostNetworkReport,
    InterfaceInfo,
    RouteInfo,
)

AF_INET, AF_INET6 = 2, 10
MAIN_TABLE = 254
ARPHRD_LOOPBACK = 772
IFF_UP = 0x1
_FAMILY_NAME = {AF_INET: "inet", AF_INET6: "inet6"}
_MODE_NAME = {number: name for name, number in BOND_MODES.items()}
_BRPORT_STATE = {0: "disabled", 1: "listening", 2: "learning", 3: "forwarding", 4: "blocking"}
_BOND_SLAVE_STATE = {0: "active", 1: "backup"}
_BOND_MII = {0: "up", 1: "going down", 2: "down", 3: "going back"}
_RT_PROTO = {0: "unspec", 1: "redirect", 2: "kernel", 3: "boot", 4: "static", 16: "dhcp", 9: "ra"}
_RT_SCOPE = {0: "universe", 200: "site", 253: "link", 254: "host", 255: "nowhere"}

#: errors that mean "already so" for a step (the step is idempotent)
_ALREADY = {
    model.AddAddress: {errno.EEXIST},
    model.DelAddress: {errno.EADDRNOTAVAIL, errno.ENODEV},
    model.DelRoute: {errno.ESRCH, errno.ENODEV},
    model.DeleteLink: {errno.ENODEV},
}


def _text(exc: NetlinkError) -> str:
    code = int(exc.code or 0)
    return os.strerror(code) if code else str(exc)


def translate(exc: NetlinkError, action: str) -> NetworkConfigError:
    code = int(exc.code or 0)
    return NetworkConfigError(f"{action}: {_text(exc)}", details={"errno": code, "action": action})


def _attr(msg: Any, name: str) -> Any:
    return msg.get_attr(name)


def _nested(msg: Any, *path: str) -> Any:
    return msg.get_nested(*path)


def _info_data(msg: Any, key: str) -> Mapping[str, Any]:
    data = _nested(msg, "IFLA_LINKINFO", key)
    if data is None:
        return {}
    return {name: value for name, value in data.get("attrs", [])}


class NetlinkDriver:
    """Facts and steps for the network namespace of the agent (or a named one)."""

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns

    @contextmanager
    def _socket(self) -> Iterator[Any]:
        try:
            ipr = NetNS(self.netns, flags=0) if self.netns else IPRoute()  # flags=0: never create it
        except NetlinkError as exc:
            raise translate(exc, "open netlink socket") from None
        except OSError as exc:
            raise NetworkConfigError(f"cannot open a netlink socket: {exc}") from None
        try:
            yield ipr
        finally:
            ipr.close()

    # ------------------------------------------------------------------ facts

    def facts(self) -> HostNetworkReport:
        """Interfaces, addresses, main-table routes, bridges and bonds as the kernel has them now."""
        try:
            with self._socket() as ipr:
                links = list(ipr.get_links())
                addrs = list(ipr.get_addr())
                routes = [
                    r
                    for family in (AF_INET, AF_INET6)
                    for r in ipr.get_routes(family=family)
                    if (_attr(r, "RTA_TABLE") or r["table"]) == MAIN_TABLE
                ]
        except NetlinkError as exc:
            raise translate(exc, "read network facts") from None
        names = {int(link["index"]): str(_attr(link, "IFLA_IFNAME")) for link in links}
        by_index: dict[int, list[str]] = {}
        for a in addrs:
            ip = _attr(a, "IFA_ADDRESS")
            if ip is None:
                continue
            if a["family"] == AF_INET6 and ipaddress.ip_address(ip).is_link_local:
                continue
            by_index.setdefault(int(a["index"]), []).append(
                str(ipaddress.ip_interface(f"{ip}/{a['prefixlen']}"))
            )
        interfaces: list[InterfaceInfo] = []
        bridges: list[BridgeInfo] = []
        bonds: list[BondInfo] = []
        for link in sorted(links, key=lambda m: int(m["index"])):
            index = int(link["index"])
            name = names[index]
            kind = _nested(link, "IFLA_LINKINFO", "IFLA_INFO_KIND") or (
                "loopback" if link["ifi_type"] == ARPHRD_LOOPBACK else ""
            )
            master_index = _attr(link, "IFLA_MASTER")
            data = _info_data(link, "IFLA_INFO_DATA")
            parent = _attr(link, "IFLA_LINK")
            interfaces.append(
                InterfaceInfo(
                    name=name,
                    index=index,
                    kind=str(kind),
                    mac=str(_attr(link, "IFLA_ADDRESS") or ""),
                    mtu=int(_attr(link, "IFLA_MTU") or 0),
                    admin_up=bool(link["flags"] & IFF_UP),
                    oper_state=str(_attr(link, "IFLA_OPERSTATE") or ""),
                    carrier=bool(_attr(link, "IFLA_CARRIER")),
                    master=names.get(int(master_index)) if master_index else None,
                    addresses=tuple(by_index.get(index, ())),
                    vlan_id=int(data["IFLA_VLAN_ID"]) if kind == "vlan" and "IFLA_VLAN_ID" in data else None,
                    link=names.get(int(parent)) if kind == "vlan" and parent else None,
                )
            )
            if kind == "bridge":
                ports = tuple(
                    BridgePort(
                        names[int(p["index"])],
                        _BRPORT_STATE.get(
                            _info_data(p, "IFLA_INFO_SLAVE_DATA").get("IFLA_BRPORT_STATE", -1), ""
                        ),
                    )
                    for p in links
                    if _attr(p, "IFLA_MASTER") == index
                )
                bridges.append(
                    BridgeInfo(
                        name=name,
                        stp=bool(data.get("IFLA_BR_STP_STATE", 0)),
                        ports=ports,
                        forward_delay_cs=int(data.get("IFLA_BR_FORWARD_DELAY", 0)),
                    )
                )
            elif kind == "bond":
                bonds.append(self._bond(link, name, data, links, names))
        return HostNetworkReport(
            interfaces=tuple(interfaces),
            routes=tuple(self._route(r, names) for r in routes),
            bridges=tuple(bridges),
            bonds=tuple(bonds),
        )

    @staticmethod
    def _bond(
        link: Any, name: str, data: Mapping[str, Any], links: list[Any], names: dict[int, str]
    ) -> BondInfo:
        index = int(link["index"])
        slaves = []
        for s in links:
            if _attr(s, "IFLA_MASTER") != index:
                continue
            sd = _info_data(s, "IFLA_INFO_SLAVE_DATA")
            slaves.append(
                BondSlaveInfo(
                    name=names[int(s["index"])],
                    mii_status=_BOND_MII.get(sd.get("IFLA_BOND_SLAVE_MII_STATUS", -1), ""),
                    state=_BOND_SLAVE_STATE.get(sd.get("IFLA_BOND_SLAVE_STATE", -1), ""),
                    link_failure_count=int(sd.get("IFLA_BOND_SLAVE_LINK_FAILURE_COUNT", 0) or 0),
                    perm_hwaddr=str(sd.get("IFLA_BOND_SLAVE_PERM_HWADDR", "") or ""),
                )
            )
        active = data.get("IFLA_BOND_ACTIVE_SLAVE")
        primary = data.get("IFLA_BOND_PRIMARY")
        return BondInfo(
            name=name,
            mode=_MODE_NAME.get(int(data.get("IFLA_BOND_MODE", -1)), str(data.get("IFLA_BOND_MODE", ""))),
            miimon=int(data.get("IFLA_BOND_MIIMON", 0) or 0),
            active_slave=names.get(int(active)) if active else None,
            primary=names.get(int(primary)) if primary else None,
            slaves=tuple(slaves),
        )

    @staticmethod
    def _route(r: Any, names: dict[int, str]) -> RouteInfo:
        family = _FAMILY_NAME.get(r["family"], str(r["family"]))
        dst = _attr(r, "RTA_DST")
        oif = _attr(r, "RTA_OIF")
        prefsrc = _attr(r, "RTA_PREFSRC")
        return RouteInfo(
            dst=f"{dst}/{r['dst_len']}" if dst is not None else "default",
            dev=names.get(int(oif)) if oif else None,
            gateway=_attr(r, "RTA_GATEWAY"),
            metric=int(_attr(r, "RTA_PRIORITY") or 0),
            proto=_RT_PROTO.get(r["proto"], str(r["proto"])),
            scope=_RT_SCOPE.get(r["scope"], str(r["scope"])),
            family=family,
            prefsrc=str(prefsrc) if prefsrc else None,
        )

    # ------------------------------------------------------------------ steps

    def apply(self, step: model.LinkStep) -> None:
        """Execute one step; 'already so' counts as success. NetworkConfigError otherwise."""
        try:
            with self._socket() as ipr:
                self._apply(ipr, step)
        except NetlinkError as exc:
            code = int(exc.code or 0)
            if code in _ALREADY.get(type(step), set()):
                return
            raise model.kernel_error(step, code, _text(exc)) from None

    @staticmethod
    def _index(ipr: Any, name: str) -> int:
        found = ipr.link_lookup(ifname=name)
        if not found:
            raise model.no_device(name)
        return int(found[0])

    def _apply(self, ipr: Any, step: model.LinkStep) -> None:  # noqa: PLR0912 - one branch per step type
        match step:
            case model.CreateBridge(name, stp):
                if not ipr.link_lookup(ifname=name):
                    ipr.link("add", ifname=name, kind="bridge", br_stp_state=int(stp))
            case model.CreateBond(name, mode, miimon):
                if not ipr.link_lookup(ifname=name):
                    ipr.link("add", ifname=name, kind="bond", bond_mode=BOND_MODES[mode], bond_miimon=miimon)
            case model.SetBondMiimon(name, miimon):
                ipr.link("set", index=self._index(ipr, name), kind="bond", bond_miimon=miimon)
            case model.SetBondPrimary(name, primary):
                ipr.link(
                    "set", index=self._index(ipr, name), kind="bond", bond_primary=self._index(ipr, primary)
                )
            case model.DeleteLink(name):
                found = ipr.link_lookup(ifname=name)
                if found:
                    ipr.link("del", index=found[0])
            case model.SetMaster(name, master):
                target = self._index(ipr, master) if master is not None else 0
                ipr.link("set", index=self._index(ipr, name), master=target)
            case model.SetLinkUp(name, up):
                ipr.link("set", index=self._index(ipr, name), state="up" if up else "down")
            case model.AddAddress(dev, address) | model.DelAddress(dev, address):
                iface = ipaddress.ip_interface(address)
                ipr.addr(
                    "add" if isinstance(step, model.AddAddress) else "del",
                    index=self._index(ipr, dev),
                    address=str(iface.ip),
                    prefixlen=iface.network.prefixlen,
                    family=AF_INET6 if iface.version == 6 else AF_INET,
                )
            case model.AddRoute(route) | model.DelRoute(route):
                family = AF_INET6 if route.family == "inet6" else AF_INET
                spec: dict[str, Any] = {
                    "dst": route.dst
                    if route.dst != "default"
                    else ("::/0" if family == AF_INET6 else "0.0.0.0/0"),
                    "family": family,
                    "table": MAIN_TABLE,
                }
                if route.gateway:
                    spec["gateway"] = route.gateway
                if route.dev:
                    spec["oif"] = self._index(ipr, route.dev)
                if route.metric:
                    spec["priority"] = route.metric
                if isinstance(step, model.AddRoute):
                    if route.prefsrc:
                        spec["prefsrc"] = route.prefsrc
                    if route.scope == "link":
                        spec["scope"] = 253
                    spec["proto"] = (
                        4
                        if route.proto in ("kernel", "static")
                        else {v: k for k, v in _RT_PROTO.items()}.get(route.proto, 4)
                    )
                ipr.route("add" if isinstance(step, model.AddRoute) else "del", **spec)
            case model.SetStp(name, enabled):
                ipr.link("set", index=self._index(ipr, name), kind="bridge", br_stp_state=int(enabled))
