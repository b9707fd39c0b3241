"""Golden-file tests of the pure network renderers: libvirt network XML and the persistent host
configuration (RHEL ifcfg as in the ops notes, systemd-networkd, NetworkManager keyfiles).

Regenerate after an intended change with ``VIRTFLEET_REGEN_GOLDEN=1 pytest tests/unit/test_net_golden.py``
and review the diff; otherwise the output must match the files byte for byte.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.network.libvirt_net import build_network_xml, parse_network_xml, same_network
from agent.network.persist import IfaceConfig, render_all
from common.messages.network import LibvirtNetworkInfo, NetworkSpec

GOLDEN = Path(__file__).parent / "golden" / "network"
REGEN = os.environ.get("VIRTFLEET_REGEN_GOLDEN") == "1"

NETWORKS = {
    # the notes' NAT network: virbr0, 192.168.122.1, dnsmasq DHCP .2-.254
    "nat_default": NetworkSpec(
        "default", "nat", bridge="virbr0", address="192.168.122.1/24",
        dhcp_start="192.168.122.2", dhcp_end="192.168.122.254",
    ),
    "nat_forward_dev": NetworkSpec("natout", "nat", address="10.10.0.1/24", forward_dev="eth0", stp=False),
    "isolated": NetworkSpec("isolated", "isolated", bridge="virbr1", address="10.99.0.1/24"),
    "bridge_br0": NetworkSpec("lan", "bridge", bridge="br0"),
}  # fmt: skip

# The notes: br0 (192.168.1.233/24, gw .254, DNS 114.114.114.114) on eth0; br1 on eth1;
# bond0 (mode=1 miimon=100, 192.168.101.1/24, gw .254) over eno1 + eno2; a bond under a bridge.
HOSTS = {
    "bridge_br0": [
        IfaceConfig("br0", "bridge", addresses=("192.168.1.233/24",), gateway="192.168.1.254", dns=("114.114.114.114",)),
        IfaceConfig("eth0", master="br0", master_kind="bridge"),
    ],
    "bridge_br1_stp": [
        IfaceConfig("br1", "bridge", stp=True),
        IfaceConfig("eth1", master="br1", master_kind="bridge"),
    ],
    "bond_active_backup": [
        IfaceConfig("bond0", "bond", addresses=("192.168.101.1/24",), gateway="192.168.101.254"),
        IfaceConfig("eno1", master="bond0", master_kind="bond"),
        IfaceConfig("eno2", master="bond0", master_kind="bond"),
    ],
    "bond_lacp_under_bridge": [
        IfaceConfig("br0", "bridge", addresses=("10.0.0.5/24", "2001:db8::5/64"), gateway="10.0.0.1",
                    gateway6="2001:db8::1", dns=("10.0.0.53", "2001:db8::53")),
        IfaceConfig("bond0", "bond", master="br0", master_kind="bridge", bond_mode="802.3ad", miimon=200, primary="eno1"),
        IfaceConfig("eno1", master="bond0", master_kind="bond", primary_slave=True),
        IfaceConfig("eno2", master="bond0", master_kind="bond"),
    ],
    "nic_restored": [IfaceConfig("eth0", addresses=("192.168.1.233/24",), gateway="192.168.1.254")],
}  # fmt: skip
BACKENDS = ("ifcfg", "networkd", "keyfile")


def _check(name: str, text: str) -> None:
    path = GOLDEN / name
    if REGEN:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    assert path.exists(), f"missing golden file {path}; create it with VIRTFLEET_REGEN_GOLDEN=1"
    assert text == path.read_text(encoding="utf-8"), f"{name} differs from {path}"


def _host_text(backend: str, configs: list[IfaceConfig]) -> str:
    files = render_all(backend, configs)
    return "".join(f"==> {path} <==\n{content}\n" for path, content in sorted(files.items()))


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_network_xml_golden(name: str) -> None:
    _check(f"net-{name}.xml", build_network_xml(NETWORKS[name]))


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_network_xml_reads_back(name: str) -> None:
    spec = NETWORKS[name]
    info = parse_network_xml(build_network_xml(spec))
    assert info.name == spec.name
    assert info.forward_mode == spec.mode
    assert same_network(info, spec)


@pytest.mark.parametrize(("backend", "name"), [(b, n) for b in BACKENDS for n in sorted(HOSTS)])
def test_host_config_golden(backend: str, name: str) -> None:
    _check(f"{backend}-{name}.txt", _host_text(backend, HOSTS[name]))


def test_no_stale_golden_files() -> None:
    expected = {f"net-{n}.xml" for n in NETWORKS} | {f"{b}-{n}.txt" for b in BACKENDS for n in HOSTS}
    assert {p.name for p in GOLDEN.iterdir()} == expected


def test_ifcfg_matches_the_ops_notes() -> None:
    """The notes' own files, key by key (order and the header comment aside)."""
    files = render_all("ifcfg", HOSTS["bridge_br0"] + HOSTS["bond_active_backup"])
    d = "etc/sysconfig/network-scripts"

    def keys(name: str) -> dict[str, str]:
        lines = files[f"{d}/{name}"].splitlines()
        return dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith("#"))

    # the notes write NETMASK=255.255.255.0 for br0; PREFIX=24 says the same
    assert keys("ifcfg-br0")["PREFIX"] == "24"
    assert {
        "DEVICE": "br0", "BOOTPROTO": "none", "ONBOOT": "yes", "IPADDR": "192.168.1.233",
        "GATEWAY": "192.168.1.254", "NM_CONTROLLED": "no", "TYPE": "Bridge", "DNS1": "114.114.114.114",
    }.items() <= keys("ifcfg-br0").items()  # fmt: skip
    assert {"DEVICE": "eth0", "TYPE": "Ethernet", "BRIDGE": "br0", "ONBOOT": "yes"}.items() <= keys(
        "ifcfg-eth0"
    ).items()
    assert {
        "DEVICE": "bond0", "TYPE": "Bond", "NAME": "bond0", "BONDING_MASTER": "yes", "ONBOOT": "yes",
        "IPADDR": "192.168.101.1", "PREFIX": "24", "GATEWAY": "192.168.101.254", "BONDING_OPTS": '"mode=1 miimon=100"',
    }.items() <= keys("ifcfg-bond0").items()  # fmt: skip
    expected_slave = {
        "TYPE": "Ethernet",
        "BOOTPROTO": "none",
        "DEVICE": "eno1",
        "MASTER": "bond0",
        "SLAVE": "yes",
    }
    assert expected_slave.items() <= keys("ifcfg-eno1").items()


def test_parse_the_stock_default_network() -> None:
    """/usr/share/libvirt/networks/default.xml (netmask, <forward/> without a mode = nat)."""
    xml = """<network>
  <name>default</name>
  <bridge name='virbr0'/>
  <forward/>
  <ip address='192.168.122.1' netmask='255.255.255.0'>
    <dhcp>
      <range start='192.168.122.2' end='192.168.122.254'/>
    </dhcp>
  </ip>
</network>"""
    assert parse_network_xml(xml, active=True, autostart=True) == LibvirtNetworkInfo(
        name="default", active=True, autostart=True, persistent=True, forward_mode="nat", bridge="virbr0",
        address="192.168.122.1/24", dhcp_start="192.168.122.2", dhcp_end="192.168.122.254",
    )  # fmt: skip
