"""Host bridges on a real kernel: the agent's network module driving network namespaces.

Each test gets a "host" namespace with two veth "NICs" (eth0, eth1) whose peers sit in a
"gateway" namespace (10.201.0.1, 10.202.0.1). The gateway namespace also holds 10.200.0.1,
reachable from the host only through its default route, where a relay to the real broker
listens: the probe of these tests is a TCP connect from the host namespace to it. Pings through
the bridges prove the data path after the IP moved. Files (resolv.conf, ifcfg) go to a tmp root.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from netsupport import RELAY_IP, Lab, lab, tcp_reachable
from vfsupport import wait_until

from agent.network.model import ProbeResult
from agent.network.module import NetworkModule, NetworkSettings
from agent.network.netlink import NetlinkDriver
from agent.network.planner import managed_routes
from agent.network.transaction import PENDING_FILE
from common.errors import Conflict, NetworkConfigError, NotFound
from common.messages.base import replace
from common.messages.descriptor import Side
from common.messages.network import (
    BondCreate,
    BridgeCreate,
    BridgeStp,
    ChangeOptions,
    ChangeRef,
    HostNetworkReport,
    InterfaceRemove,
    RouteInfo,
)
from common.transport.rpc import HandlerTable

pytestmark = pytest.mark.netns

FAST = ChangeOptions(deadline_s=3.0)


@dataclass
class Host:
    lab: Lab
    ns: str
    gw: str
    root: Path
    state: Path
    module: NetworkModule
    probes: list[ProbeResult]

    def facts(self) -> HostNetworkReport:
        return self.module.facts()

    def new_module(self) -> NetworkModule:
        return build_module(self.ns, self.root, self.state, self.probes)


def tcp_probe(ns: str, log: list[ProbeResult]) -> Callable[[float], ProbeResult]:
    def probe(deadline_s: float) -> ProbeResult:
        start = time.monotonic()
        while True:
            if tcp_reachable(ns, (RELAY_IP, 5672), timeout=0.5):
                result = ProbeResult(True, "reached", time.monotonic() - start)
                break
            if time.monotonic() - start > deadline_s:
                result = ProbeResult(False, "unreachable", time.monotonic() - start)
                break
            time.sleep(0.2)
        log.append(result)
        return result

    return probe


def build_module(ns: str, root: Path, state: Path, probes: list[ProbeResult]) -> NetworkModule:
    module = NetworkModule(
        NetlinkDriver(ns),
        None,
        tcp_probe(ns, probes),
        settings=NetworkSettings(root=root, persist="auto"),
        state_dir=state,
    )
    module.register(HandlerTable(Side.AGENT), lambda: 0)  # as the agent does: recovers an unfinished change
    return module


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    with lab() as the_lab:
        h, g = the_lab.host_behind_gateway("h", "g")
        root = tmp_path / "root"
        (root / "etc/sysconfig/network-scripts").mkdir(parents=True)
        (root / "etc/resolv.conf").write_text("search example.net\nnameserver 10.201.0.53\n")
        probes: list[ProbeResult] = []
        module = build_module(h, root, tmp_path / "state", probes)
        try:
            yield Host(the_lab, h, g, root, tmp_path / "state", module, probes)
        finally:
            module.close()


def l3(
    facts: HostNetworkReport,
) -> tuple[dict[str, tuple[str | None, tuple[str, ...], bool]], set[tuple[str, str | None, str | None]]]:
    """What a rollback must restore: master, addresses, up per interface; managed routes."""
    links = {i.name: (i.master, i.addresses, i.admin_up) for i in facts.interfaces}
    routes = {(r.dst, r.gateway, r.dev) for r in managed_routes(facts.routes)}
    return links, routes


def default_route(facts: HostNetworkReport) -> RouteInfo | None:
    return next((r for r in facts.routes if r.dst == "default" and r.family == "inet"), None)


def test_bridge_create_moves_ip_route_and_dns_and_the_path_works(host: Host) -> None:
    assert host.lab.ping(host.ns, "10.201.0.1")
    result = host.module.bridge_create(
        BridgeCreate("br0", ("eth0",), dns=("10.201.0.1",), options=FAST, change_id="c1")
    )
    assert result.state == "applied", result
    assert not result.rolled_back
    facts = host.facts()
    br0, eth0 = facts.interface("br0"), facts.interface("eth0")
    assert br0 is not None and eth0 is not None
    assert br0.kind == "bridge" and br0.addresses == ("10.201.0.2/24",)
    assert eth0.master == "br0" and eth0.addresses == ()
    assert default_route(facts) == RouteInfo("default", "br0", "10.201.0.1", proto="static")
    bridge = facts.bridge("br0")
    assert bridge is not None and [p.name for p in bridge.ports] == ["eth0"]
    assert facts.dns == ("10.201.0.1",)
    assert "search example.net" in (host.root / "etc/resolv.conf").read_text()
    assert host.lab.ping(host.ns, "10.201.0.1"), "no path to the gateway through br0"
    # persisted as ifcfg files (the network-scripts dir makes this a RHEL-family root)
    scripts = host.root / "etc/sysconfig/network-scripts"
    ifcfg_br0 = (scripts / "ifcfg-br0").read_text()
    assert (
        "TYPE=Bridge" in ifcfg_br0 and "IPADDR=10.201.0.2" in ifcfg_br0 and "GATEWAY=10.201.0.1" in ifcfg_br0
    )
    assert "DNS1=10.201.0.1" in ifcfg_br0
    assert "BRIDGE=br0" in (scripts / "ifcfg-eth0").read_text()
    assert result.persistence == "ifcfg"
    # the same request again changes nothing
    again = host.module.bridge_create(BridgeCreate("br0", ("eth0",), dns=("10.201.0.1",), options=FAST))
    assert again.state == "unchanged" and again.steps == ()


def test_redelivered_change_is_answered_not_rerun(host: Host) -> None:
    body = BridgeCreate("br0", ("eth0",), options=FAST, change_id="same-id")
    first = host.module.bridge_create(body)
    second = host.module.bridge_create(body)
    assert second == first
    assert len(host.probes) == 1


def test_stp_on_and_off(host: Host) -> None:
    host.module.bridge_create(BridgeCreate("br0", ("eth0",), options=FAST))
    on = host.module.bridge_stp(BridgeStp("br0", True, options=FAST))
    assert on.state == "applied"
    bridge = host.facts().bridge("br0")
    assert bridge is not None and bridge.stp
    assert "STP=yes" in (host.root / "etc/sysconfig/network-scripts/ifcfg-br0").read_text()
    host.module.bridge_stp(BridgeStp("br0", False, options=FAST))
    bridge = host.facts().bridge("br0")
    assert bridge is not None and not bridge.stp


def test_two_bridges_on_two_uplinks(host: Host) -> None:
    host.module.bridge_create(BridgeCreate("br0", ("eth0",), options=FAST))
    host.module.bridge_create(BridgeCreate("br1", ("eth1",), options=FAST))
    facts = host.facts()
    for br, nic, ip in (("br0", "eth0", "10.201.0.2/24"), ("br1", "eth1", "10.202.0.2/24")):
        iface = facts.interface(br)
        assert iface is not None and iface.addresses == (ip,)
        port = facts.interface(nic)
        assert port is not None and port.master == br
    assert host.lab.ping(host.ns, "10.201.0.1") and host.lab.ping(host.ns, "10.202.0.1")


def test_bridge_remove_restores_the_nic(host: Host) -> None:
    before = l3(host.facts())
    host.module.bridge_create(BridgeCreate("br0", ("eth0",), options=FAST))
    removed = host.module.bridge_remove(InterfaceRemove("br0", options=FAST))
    assert removed.state == "applied", removed
    facts = host.facts()
    assert facts.interface("br0") is None
    assert l3(facts) == before
    assert host.lab.ping(host.ns, "10.201.0.1")
    scripts = host.root / "etc/sysconfig/network-scripts"
    assert not (scripts / "ifcfg-br0").exists()
    assert "IPADDR=10.201.0.2" in (scripts / "ifcfg-eth0").read_text()


def test_remove_refuses_while_vm_taps_are_attached(host: Host) -> None:
    host.module.bridge_create(BridgeCreate("br0", ("eth0",), options=FAST))
    ip = host.lab.ns(host.ns)
    ip.link("add", ifname="vnet0", kind="tuntap", mode="tap")
    ip.link("set", index=host.lab.index(host.ns, "vnet0"), master=host.lab.index(host.ns, "br0"))
    with pytest.raises(Conflict, match="vnet0"):
        host.module.bridge_remove(InterfaceRemove("br0", options=FAST))
    assert host.facts().interface("br0") is not None


def test_rollback_when_the_broker_is_unreachable_after_the_change(host: Host) -> None:
    """A wrong gateway takes the default route away from the broker: the module restores."""
    before = l3(host.facts())
    resolv_before = (host.root / "etc/resolv.conf").read_text()
    result = host.module.bridge_create(
        BridgeCreate(
            "br0", ("eth0",), gateway="10.201.0.254", dns=("192.0.2.53",), options=FAST, change_id="bad"
        )
    )
    assert result.state == "rolled-back" and result.rolled_back and result.restored, result
    assert "could not reach the broker within 3 s" in result.rollback_reason
    assert [p.ok for p in host.probes] == [False]
    facts = host.facts()
    assert facts.interface("br0") is None
    assert l3(facts) == before
    assert (host.root / "etc/resolv.conf").read_text() == resolv_before
    assert facts.last_rollback is not None and facts.last_rollback.change_id == "bad"
    assert host.lab.ping(host.ns, "10.201.0.1")
    assert not (host.root / "etc/sysconfig/network-scripts/ifcfg-br0").exists(), (
        "rolled back, so not persisted"
    )
    assert not (host.state / PENDING_FILE).exists()


def test_a_failing_step_rolls_back_what_was_done(host: Host) -> None:
    """The last step (a gateway on no connected network) fails after the bridge took the IP."""
    before = l3(host.facts())
    with pytest.raises(NetworkConfigError, match="host was restored") as err:
        host.module.bridge_create(BridgeCreate("br0", ("eth0",), gateway="192.0.2.1", options=FAST))
    assert err.value.details["rolled_back"] is True
    assert "add route default via 192.0.2.1 dev br0" in err.value.message
    assert l3(host.facts()) == before
    assert host.probes == [], "no probe after a failed step"


def test_bond_is_refused_cleanly_on_a_kernel_without_bonding(host: Host) -> None:
    if Path("/sys/class/net/bonding_masters").exists():
        pytest.skip(
            "the clean refusal of bonds without a bonding driver is not tested: this kernel has bonding (bonds themselves are tested in the QEMU netlab guest)"
        )
    before = l3(host.facts())
    with pytest.raises(NetworkConfigError, match="bonding driver is not available"):
        host.module.bond_create(BondCreate("bond0", ("eth0", "eth1"), options=FAST))
    assert l3(host.facts()) == before


def test_planning_errors_change_nothing(host: Host) -> None:
    before = l3(host.facts())
    with pytest.raises(NotFound):
        host.module.bridge_create(BridgeCreate("br0", ("eth9",), options=FAST))
    host.module.bridge_create(BridgeCreate("br0", ("eth0",), options=FAST))
    with pytest.raises(Conflict, match="already enslaved to br0"):
        host.module.bridge_create(BridgeCreate("br1", ("eth0",), options=FAST))
    assert before != l3(host.facts())


def test_dry_run_plans_without_changing(host: Host) -> None:
    before = l3(host.facts())
    result = host.module.bridge_create(BridgeCreate("br0", ("eth0",), options=replace(FAST, dry_run=True)))
    assert result.state == "dry-run"
    assert result.steps[:2] == ("create bridge br0 (stp off)", "enslave eth0 to br0")
    assert l3(host.facts()) == before


def test_confirm_keeps_the_change(host: Host) -> None:
    result = host.module.bridge_create(BridgeCreate("br1", ("eth1",), options=replace(FAST, confirm_s=30)))
    assert result.state == "pending-confirm" and result.confirm_expires_at is not None
    assert host.facts().pending is not None
    assert not (host.root / "etc/sysconfig/network-scripts/ifcfg-br1").exists(), "persisted only once kept"
    with pytest.raises(Conflict, match="waiting for confirmation"):
        host.module.bridge_create(BridgeCreate("br0", ("eth0",), options=FAST))
    kept = host.module.confirm(ChangeRef(result.change_id))
    assert kept.state == "applied"
    assert (host.root / "etc/sysconfig/network-scripts/ifcfg-br1").exists()
    assert host.facts().pending is None and host.facts().interface("br1") is not None


def test_unconfirmed_change_is_undone_when_the_timeout_passes(host: Host) -> None:
    before = l3(host.facts())
    result = host.module.bridge_create(BridgeCreate("br1", ("eth1",), options=replace(FAST, confirm_s=1.0)))
    assert result.state == "pending-confirm"
    # The rollback's own timer (1 s) decides; the wait is long only for a loaded machine.
    wait_until(lambda: host.module.changes.last_rollback, 60, "the rollback of the unconfirmed change", 0.1)
    facts = host.facts()
    assert l3(facts) == before
    assert facts.last_rollback is not None and "not confirmed within 1 s" in facts.last_rollback.reason
    with pytest.raises(Conflict, match="no longer pending"):
        host.module.confirm(ChangeRef(result.change_id))


def test_revert_undoes_a_pending_change_now(host: Host) -> None:
    before = l3(host.facts())
    result = host.module.bridge_create(BridgeCreate("br1", ("eth1",), options=replace(FAST, confirm_s=60)))
    reverted = host.module.revert(ChangeRef(result.change_id))
    assert reverted.state == "reverted" and reverted.restored
    assert l3(host.facts()) == before


def test_agent_restart_during_a_change_restores_the_snapshot(host: Host) -> None:
    """The pending record on disk (written before applying) is restored by the next agent."""
    before = l3(host.facts())
    saved: list[str] = []
    original = host.module.changes.probe

    def probe_then_crash(deadline: float) -> ProbeResult:
        saved.append((host.state / PENDING_FILE).read_text())  # what a crash here would leave
        return original(deadline)

    host.module.changes.probe = probe_then_crash
    host.module.bridge_create(BridgeCreate("br0", ("eth0",), options=FAST))
    assert host.facts().interface("br0") is not None
    (host.state / PENDING_FILE).write_text(saved[0])
    assert json.loads(saved[0])["operation"] == "bridge create br0"
    restarted = host.new_module()  # handlers() runs recover()
    facts = restarted.facts()
    assert l3(facts) == before
    assert facts.last_rollback is not None and "restarted" in facts.last_rollback.reason
    assert not (host.state / PENDING_FILE).exists()


def test_report_facts_of_the_namespace(host: Host) -> None:
    facts = host.facts()
    names = [i.name for i in facts.interfaces]
    assert names[:3] == ["lo", "eth0", "eth1"] or set(names) >= {"lo", "eth0", "eth1"}
    eth0 = facts.interface("eth0")
    assert eth0 is not None and eth0.kind == "veth" and eth0.admin_up and eth0.carrier
    assert facts.persistence == "ifcfg"
    assert facts.dns == ("10.201.0.53",)
    assert facts.ipv4_forwarding is not None
    assert shutil.which("ping"), "iputils-ping is needed (deploy/install.sh installs it)"
