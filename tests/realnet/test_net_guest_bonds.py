"""Bonds (and a VLAN) through the agent's own network module, on the netlab guest's real kernel.

These run only inside the QEMU guest (``realnet_guest``; see conftest.py). Topology per test:
veth NICs nic0/nic1 in the guest's main namespace; their peers sw0/sw1 are ports of a bridge in
a "switch" namespace that owns 192.0.2.1 (the gateway). nic0 starts with 192.0.2.10/24 and the
default route, like a host before the ops notes' bonding script.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from common.messages.descriptor import Side
from common.transport.rpc import HandlerTable

if TYPE_CHECKING:  # imported where used at run time: only the guest has bonding and 802.1Q
    from pyroute2 import IPRoute, NetNS

    from agent.network.module import NetworkModule
    from common.messages.network import HostNetworkReport

pytestmark = pytest.mark.realnet_guest

GW = "192.0.2.1"
SWITCH = "sw"
HOST_IP = "192.0.2.10/24"


@dataclass
class Bench:
    module: NetworkModule
    root: Path
    sw: str
    probe_ok: list[bool]


def _ping(ip: str) -> bool:
    return (
        subprocess.run(
            ["ping", "-n", "-q", "-c", "1", "-W", "2", ip], capture_output=True, check=False
        ).returncode
        == 0
    )


def _wait(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def switch() -> Iterator[tuple[IPRoute, NetNS]]:
    """The switch namespace (bridge swbr with the gateway address) and the veth NICs, once."""
    from pyroute2 import IPRoute, NetNS, netns  # noqa: PLC0415 - guest only

    netns.create(SWITCH)
    ipr = IPRoute()
    swr = NetNS(SWITCH, flags=0)
    try:
        swr.link("set", index=swr.link_lookup(ifname="lo")[0], state="up")
        swr.link("add", ifname="swbr", kind="bridge")
        br = swr.link_lookup(ifname="swbr")[0]
        for i in (0, 1):
            ipr.link("add", ifname=f"nic{i}", kind="veth", peer={"ifname": f"sw{i}", "net_ns_fd": SWITCH})
            swr.link("set", index=swr.link_lookup(ifname=f"sw{i}")[0], master=br, state="up")
        swr.addr("add", index=br, address=GW, prefixlen=24)
        swr.link("set", index=br, state="up")
        yield ipr, swr
    finally:
        for name in ("vlan20", "br0", "bond0", "nic0", "nic1"):
            found = ipr.link_lookup(ifname=name)
            if found:
                ipr.link("del", index=found[0])
        ipr.close()
        swr.close()
        netns.remove(SWITCH)


@pytest.fixture
def bench(switch: tuple[IPRoute, NetNS], tmp_path: Path) -> Iterator[Bench]:
    """Each test starts from the same host: nic0 with the address and default route, nic1 bare."""
    from agent.network.model import ProbeResult  # noqa: PLC0415
    from agent.network.module import NetworkModule, NetworkSettings  # noqa: PLC0415
    from agent.network.netlink import NetlinkDriver  # noqa: PLC0415

    ipr, swr = switch
    for name in ("vlan20", "br0", "bond0"):
        found = ipr.link_lookup(ifname=name)
        if found:
            ipr.link("del", index=found[0])
    for i in (0, 1):
        swr.link("set", index=swr.link_lookup(ifname=f"sw{i}")[0], state="up")
        idx = ipr.link_lookup(ifname=f"nic{i}")[0]
        ipr.link("set", index=idx, master=0)
        ipr.flush_addr(index=idx, family=2)
        ipr.link("set", index=idx, state="up")
    nic0 = ipr.link_lookup(ifname="nic0")[0]
    ipr.addr("add", index=nic0, address="192.0.2.10", prefixlen=24)
    ipr.route("replace", dst="0.0.0.0/0", gateway=GW, oif=nic0)
    root = tmp_path / "root"
    (root / "etc/sysconfig/network-scripts").mkdir(parents=True)
    (root / "etc/resolv.conf").write_text("nameserver 192.0.2.53\n")
    probe_ok = [True]

    def probe(_deadline: float) -> ProbeResult:
        return ProbeResult(probe_ok[0], "injected")

    module = NetworkModule(
        NetlinkDriver(), None, probe, settings=NetworkSettings(root=root), state_dir=tmp_path / "state"
    )
    module.register(HandlerTable(Side.AGENT), lambda: 0)  # as the agent does: recovers an unfinished change
    _wait(lambda: _ping(GW), 20, "the gateway before the change")
    yield Bench(module, root, SWITCH, probe_ok)
    module.close()


def _facts(b: Bench) -> HostNetworkReport:
    return b.module.facts()


def _proc_bonding(name: str) -> str:
    return Path(f"/proc/net/bonding/{name}").read_text()


def test_active_backup_bond_as_in_the_ops_notes(bench: Bench) -> None:
    from common.messages.network import BondCreate, ChangeOptions  # noqa: PLC0415

    result = bench.module.bond_create(
        BondCreate("bond0", ("nic0", "nic1"), options=ChangeOptions(deadline_s=5))
    )
    assert result.state == "applied", result
    facts = _facts(bench)
    bond = facts.bond("bond0")
    assert bond is not None
    assert (bond.mode, bond.miimon, bond.active_slave) == ("active-backup", 100, "nic0")
    assert [(s.name, s.mii_status, s.state) for s in bond.slaves] == [
        ("nic0", "up", "active"),
        ("nic1", "up", "backup"),
    ]
    iface = facts.interface("bond0")
    assert iface is not None and iface.addresses == (HOST_IP,)
    nic0 = facts.interface("nic0")
    assert nic0 is not None and nic0.addresses == (), "the address moved to the bond"
    assert any(r.dst == "default" and r.dev == "bond0" and r.gateway == GW for r in facts.routes)
    text = _proc_bonding("bond0")
    assert "Bonding Mode: fault-tolerance (active-backup)" in text
    assert "Currently Active Slave: nic0" in text
    assert "MII Polling Interval (ms): 100" in text
    _wait(lambda: _ping(GW), 10, "the gateway through bond0")
    scripts = bench.root / "etc/sysconfig/network-scripts"
    ifcfg = (scripts / "ifcfg-bond0").read_text()
    assert (
        'BONDING_OPTS="mode=1 miimon=100"' in ifcfg
        and "IPADDR=192.0.2.10" in ifcfg
        and "GATEWAY=192.0.2.1" in ifcfg
    )
    slave = (scripts / "ifcfg-nic1").read_text()
    assert "MASTER=bond0" in slave and "SLAVE=yes" in slave


def test_active_backup_failover_keeps_the_path(bench: Bench) -> None:
    from pyroute2 import NetNS  # noqa: PLC0415

    from common.messages.network import BondCreate, ChangeOptions  # noqa: PLC0415

    bench.module.bond_create(BondCreate("bond0", ("nic0", "nic1"), options=ChangeOptions(deadline_s=5)))
    _wait(lambda: _ping(GW), 10, "the gateway through bond0")
    with NetNS(bench.sw, flags=0) as swr:  # pull the cable of the active slave
        swr.link("set", index=swr.link_lookup(ifname="sw0")[0], state="down")

    def failed_over() -> bool:
        bond = _facts(bench).bond("bond0")
        return bond is not None and bond.active_slave == "nic1"

    _wait(failed_over, 10, "failover to nic1")
    bond = _facts(bench).bond("bond0")
    assert bond is not None
    slaves = {s.name: s for s in bond.slaves}
    assert slaves["nic0"].mii_status == "down" and slaves["nic0"].link_failure_count >= 1
    assert slaves["nic1"].state == "active"
    assert "Currently Active Slave: nic1" in _proc_bonding("bond0")
    _wait(lambda: _ping(GW), 10, "the gateway through nic1")


@pytest.mark.parametrize(
    ("mode", "label"),
    [("802.3ad", "IEEE 802.3ad Dynamic link aggregation"), ("balance-rr", "load balancing (round-robin)")],
)
def test_other_bond_modes(bench: Bench, mode: str, label: str) -> None:
    from common.messages.network import BondCreate, ChangeOptions  # noqa: PLC0415

    result = bench.module.bond_create(
        BondCreate("bond0", ("nic0", "nic1"), mode=mode, miimon=200, options=ChangeOptions(deadline_s=5))
    )
    assert result.state == "applied"
    bond = _facts(bench).bond("bond0")
    assert bond is not None and (bond.mode, bond.miimon) == (mode, 200)
    assert f"Bonding Mode: {label}" in _proc_bonding("bond0")


def test_bridge_on_top_of_the_bond(bench: Bench) -> None:
    from common.messages.network import BondCreate, ChangeOptions  # noqa: PLC0415

    result = bench.module.bond_create(
        BondCreate(
            "bond0", ("nic0", "nic1"), bridge="br0", dns=("192.0.2.1",), options=ChangeOptions(deadline_s=5)
        )
    )
    assert result.state == "applied", result
    facts = _facts(bench)
    bond0, br0 = facts.interface("bond0"), facts.interface("br0")
    assert bond0 is not None and bond0.master == "br0" and bond0.addresses == ()
    assert br0 is not None and br0.addresses == (HOST_IP,)
    assert any(r.dst == "default" and r.dev == "br0" for r in facts.routes)
    assert facts.dns == ("192.0.2.1",)
    _wait(lambda: _ping(GW), 10, "the gateway through br0 on bond0")
    assert "BRIDGE=br0" in (bench.root / "etc/sysconfig/network-scripts/ifcfg-bond0").read_text()


def test_enslave_then_remove_restores_the_nic(bench: Bench) -> None:
    from common.messages.network import BondCreate, BondEnslave, ChangeOptions, InterfaceRemove  # noqa: PLC0415

    opts = ChangeOptions(deadline_s=5)
    bench.module.bond_create(BondCreate("bond0", ("nic0",), options=opts))
    bench.module.bond_enslave(BondEnslave("bond0", "nic1", options=opts))
    bond = _facts(bench).bond("bond0")
    assert bond is not None and [s.name for s in bond.slaves] == ["nic0", "nic1"]
    removed = bench.module.bond_remove(InterfaceRemove("bond0", options=opts))
    assert removed.state == "applied", removed
    facts = _facts(bench)
    assert facts.interface("bond0") is None
    nic0, nic1 = facts.interface("nic0"), facts.interface("nic1")
    assert nic0 is not None and nic0.addresses == (HOST_IP,) and nic0.master is None
    assert nic1 is not None and nic1.master is None
    assert any(r.dst == "default" and r.dev == "nic0" and r.gateway == GW for r in facts.routes)
    _wait(lambda: _ping(GW), 10, "the gateway through nic0 again")
    assert not (bench.root / "etc/sysconfig/network-scripts/ifcfg-bond0").exists()


def test_bond_rolled_back_when_the_broker_is_unreachable(bench: Bench) -> None:
    from agent.network.planner import managed_routes  # noqa: PLC0415
    from common.messages.network import BondCreate, ChangeOptions  # noqa: PLC0415

    before = _facts(bench)
    bench.probe_ok[0] = False
    result = bench.module.bond_create(
        BondCreate("bond0", ("nic0", "nic1"), bridge="br0", options=ChangeOptions(deadline_s=2))
    )
    assert result.state == "rolled-back" and result.restored, result
    after = _facts(bench)
    assert after.interface("bond0") is None and after.interface("br0") is None
    for name in ("nic0", "nic1"):
        nic_before, nic_after = before.interface(name), after.interface(name)
        assert nic_before is not None and nic_after is not None, name
        assert (nic_after.addresses, nic_after.master) == (nic_before.addresses, None)
    key = {(r.dst, r.gateway, r.dev) for r in managed_routes(before.routes)}
    assert {(r.dst, r.gateway, r.dev) for r in managed_routes(after.routes)} == key
    assert after.last_rollback is not None and after.last_rollback.operation == "bond create bond0"
    _wait(lambda: _ping(GW), 10, "the gateway through nic0 after the rollback")


def test_vlan_on_the_bond_is_reported(bench: Bench) -> None:
    from pyroute2 import IPRoute  # noqa: PLC0415

    from common.messages.network import BondCreate, ChangeOptions  # noqa: PLC0415

    bench.module.bond_create(BondCreate("bond0", ("nic0", "nic1"), options=ChangeOptions(deadline_s=5)))
    with IPRoute() as ipr:
        bond = ipr.link_lookup(ifname="bond0")[0]
        ipr.link("add", ifname="vlan20", kind="vlan", link=bond, vlan_id=20)
    vlan = _facts(bench).interface("vlan20")
    assert vlan is not None and (vlan.kind, vlan.vlan_id, vlan.link) == ("vlan", 20, "bond0")
    assert "vlan20" in Path("/proc/net/vlan/config").read_text()
