"""libvirt virtual networks: network XML built and read by pure ElementTree code (golden-file
tested), and a thin driver for ``virsh net-define/net-start/net-autostart/net-destroy/
net-undefine/net-list`` over the agent's libvirt connection.

libvirt errors are translated by :func:`agent.drivers.libvirt_driver.libvirt_errors` (unknown
network -> NotFound, anything else -> HypervisorError with libvirt's code).
"""

from __future__ import annotations

import ipaddress
import xml.etree.ElementTree as ET
from typing import Any

from agent.drivers.libvirt_driver import libvirt_errors
from common.errors import AlreadyExists, HypervisorError, NotFound
from common.messages.network import LibvirtNetworkInfo, NetworkSpec

# ---------------------------------------------------------------------------------------- pure


def build_network_xml(spec: NetworkSpec) -> str:
    """The ``<network>`` document for ``spec`` (what ``virsh net-define`` reads)."""
    root = ET.Element("network")
    ET.SubElement(root, "name").text = spec.name
    if spec.mode == "nat":
        forward = ET.SubElement(root, "forward", {"mode": "nat"})
        if spec.forward_dev:
            forward.set("dev", spec.forward_dev)
        nat = ET.SubElement(forward, "nat")
        ET.SubElement(nat, "port", {"start": "1024", "end": "65535"})
    elif spec.mode == "bridge":
        ET.SubElement(root, "forward", {"mode": "bridge"})
    bridge = ET.SubElement(root, "bridge")
    if spec.bridge:
        bridge.set("name", spec.bridge)
    if spec.mode != "bridge":
        bridge.set("stp", "on" if spec.stp else "off")
        bridge.set("delay", "0")
    if spec.mode != "bridge" and spec.address is not None:
        iface = ipaddress.ip_interface(spec.address)
        ip = ET.SubElement(root, "ip", {"address": str(iface.ip), "prefix": str(iface.network.prefixlen)})
        if iface.version == 6:
            ip.set("family", "ipv6")
        if spec.dhcp_start and spec.dhcp_end:
            dhcp = ET.SubElement(ip, "dhcp")
            ET.SubElement(dhcp, "range", {"start": spec.dhcp_start, "end": spec.dhcp_end})
    ET.indent(root, "  ")
    return ET.tostring(root, encoding="unicode") + "\n"


def _prefix(ip: ET.Element) -> int | None:
    if ip.get("prefix"):
        return int(ip.get("prefix", "0"))
    mask = ip.get("netmask")
    if mask:
        return ipaddress.ip_network(f"0.0.0.0/{mask}").prefixlen
    return None


def parse_network_xml(
    xml: str, *, active: bool = False, autostart: bool = False, persistent: bool = True
) -> LibvirtNetworkInfo:
    """The facts of a ``net-dumpxml`` document (first IPv4 ``<ip>``, first DHCP range)."""
    try:
        root = ET.fromstring(xml)  # noqa: S314 - XML from our own libvirtd, not from users
    except ET.ParseError as exc:
        raise HypervisorError(f"unreadable network XML: {exc}") from None
    forward = root.find("forward")
    mode = "isolated" if forward is None else forward.get("mode", "nat")
    bridge = root.find("bridge")
    address = dhcp_start = dhcp_end = None
    ips = root.findall("ip")
    ip = next((i for i in ips if i.get("family", "ipv4") == "ipv4"), ips[0] if ips else None)
    if ip is not None and ip.get("address"):
        prefix = _prefix(ip)
        address = f"{ip.get('address')}/{prefix}" if prefix is not None else ip.get("address")
        rng = ip.find("dhcp/range")
        if rng is not None:
            dhcp_start, dhcp_end = rng.get("start"), rng.get("end")
    return LibvirtNetworkInfo(
        name=root.findtext("name", ""),
        active=active,
        autostart=autostart,
        persistent=persistent,
        forward_mode=mode,
        bridge=bridge.get("name") if bridge is not None else None,
        address=address,
        dhcp_start=dhcp_start,
        dhcp_end=dhcp_end,
        uuid=root.findtext("uuid", ""),
    )


def same_network(info: LibvirtNetworkInfo, spec: NetworkSpec) -> bool:
    """True when an existing network already is what ``spec`` asks for (define is idempotent)."""
    mode = "isolated" if spec.mode == "isolated" else spec.mode
    return (
        info.forward_mode == mode
        and (spec.bridge is None or info.bridge == spec.bridge)
        and (spec.address is None or info.address == str(ipaddress.ip_interface(spec.address)))
        and info.dhcp_start == spec.dhcp_start
        and info.dhcp_end == spec.dhcp_end
    )


def already_defined(existing: LibvirtNetworkInfo, spec: NetworkSpec) -> tuple[LibvirtNetworkInfo, bool]:
    """What defining ``spec`` answers when a network of its name exists: ``(existing, False)`` when
    it is the same network (define is idempotent), AlreadyExists when it is a different one."""
    if not same_network(existing, spec):
        raise AlreadyExists(
            f"a different network named {spec.name} exists ({existing.forward_mode}, "
            f"bridge {existing.bridge}, {existing.address}); undefine it first"
        )
    return existing, False


# -------------------------------------------------------------------------------------- driver


class LibvirtNetworks:
    """Network operations over one (shared, thread-safe) libvirt connection."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def _info(self, net: Any) -> LibvirtNetworkInfo:
        with libvirt_errors(f"network {net.name()}"):
            return parse_network_xml(
                net.XMLDesc(0),
                active=bool(net.isActive()),
                autostart=bool(net.autostart()),
                persistent=bool(net.isPersistent()),
            )

    def _lookup(self, name: str) -> Any:
        with libvirt_errors(f"network {name}"):
            return self.conn.networkLookupByName(name)

    def find(self, name: str) -> LibvirtNetworkInfo | None:
        try:
            return self._info(self._lookup(name))
        except NotFound:
            return None

    def list(self) -> tuple[LibvirtNetworkInfo, ...]:
        with libvirt_errors("list networks"):
            nets = self.conn.listAllNetworks(0)
        return tuple(sorted((self._info(n) for n in nets), key=lambda i: i.name))

    def define(self, spec: NetworkSpec) -> tuple[LibvirtNetworkInfo, bool]:
        """Define ``spec``; (info, created). An identical existing network is not an error."""
        existing = self.find(spec.name)
        if existing is not None:
            return already_defined(existing, spec)
        with libvirt_errors(f"define network {spec.name}"):
            net = self.conn.networkDefineXML(build_network_xml(spec))
        return self._info(net), True

    def start(self, name: str) -> bool:
        net = self._lookup(name)
        with libvirt_errors(f"start network {name}"):
            if net.isActive():
                return False
            net.create()
        return True

    def stop(self, name: str) -> bool:
        net = self._lookup(name)
        with libvirt_errors(f"stop network {name}"):
            if not net.isActive():
                return False
            net.destroy()
        return True

    def set_autostart(self, name: str, enabled: bool) -> None:
        net = self._lookup(name)
        with libvirt_errors(f"autostart network {name}"):
            net.setAutostart(1 if enabled else 0)

    def undefine(self, name: str) -> bool:
        try:
            net = self._lookup(name)
        except NotFound:
            return False
        with libvirt_errors(f"undefine network {name}"):
            if net.isActive():
                net.destroy()
            if net.isPersistent():
                net.undefine()
        return True

    def info(self, name: str) -> LibvirtNetworkInfo:
        return self._info(self._lookup(name))
