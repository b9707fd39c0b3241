"""The networking CLI end to end, in-process: ``virtfleet net ...`` and ``virtfleet host net ...``.

The CLI talks to a real controller, which forwards to a real agent whose network module (planner,
transaction, persistence) drives the shipped fakes of :mod:`agent.network.fake`: each simulated
host has eth0 (192.0.2.10/24, default route via 192.0.2.1), eth1 (port of br0) and the libvirt
network ``default``; its probe reaches the broker (198.51.100.1) only while a usable route to it
exists, so a change that cuts the host off is rolled back as on a real host. The files the module
writes (networkd configuration, resolv.conf, sysctl.d) go under ``<state dir>/netroot``.

What an operator expects is taken from tests/integration/test_net_agent_e2e.py and
tests/integration/test_net_netns.py (real namespaces and kernels; they stay as they are). Each test
gets a host of its own in one module-wide fleet, so the tests do not depend on each other.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from inproc import HostShape, InProcessFleet, inprocess_fleet
from vfsupport import wait_until

from agent.network.model import DeleteLink, SetMaster
from agent.network.transaction import PENDING_FILE, ROLLBACK_FILE
from common.errors import NetworkConfigError
from common.messages.network import HostNetworkReport

# SQLite only (deploy/test.sh): host networking is planned and rolled back by the agent; the database only stores the reported facts.
pytestmark = pytest.mark.backend_neutral

_numbers = itertools.count(1)
#: a change held for confirmation longer than any test runs
HELD = ("--confirm", "--confirm-timeout", "600")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessFleet]:
    with inprocess_fleet(tmp_path_factory.mktemp("net"), {}) as f:
        yield f


def new_host(fleet: InProcessFleet) -> str:
    """A fresh simulated host (node ``small``), up and reported."""
    name = f"hv{next(_numbers)}"
    fleet.add_host(name, HostShape("small"))
    fleet.wait_hosts({name})
    return name


@pytest.fixture
def host(fleet: InProcessFleet) -> str:
    return new_host(fleet)


# ----------------------------------------------------------------------------------------- helpers


def facts(fleet: InProcessFleet, host: str) -> HostNetworkReport:
    """What the host's links look like now (the truth on the host, not what was reported)."""
    return fleet.fake(host).links.facts()


def netroot(fleet: InProcessFleet, host: str) -> Path:
    return fleet.fake(host).config.state_dir / "netroot"


def networkd(fleet: InProcessFleet, host: str) -> Path:
    return netroot(fleet, host) / "etc/systemd/network"


def state_dir(fleet: InProcessFleet, host: str) -> Path:
    return fleet.fake(host).config.state_dir


def l3(report: HostNetworkReport) -> tuple[dict[str, Any], set[tuple[str, str | None, str | None]]]:
    """What a rollback must restore: master, addresses and up per interface; the routes."""
    links = {i.name: (i.master, i.addresses, i.admin_up) for i in report.interfaces}
    routes = {(r.dst, r.gateway, r.dev) for r in report.routes}
    return links, routes


def default_route(report: HostNetworkReport) -> tuple[str | None, str | None]:
    r = next((r for r in report.routes if r.dst == "default" and r.family == "inet"), None)
    return (r.gateway, r.dev) if r else (None, None)


def iface(report: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((i for i in report["interfaces"] if i["name"] == name), None)


def reported_show(fleet: InProcessFleet, host: str) -> dict[str, Any]:
    return dict(fleet.cli_ok("host", "net", "show", host))


def wait_reported(
    fleet: InProcessFleet, host: str, what: str, check: Callable[[dict[str, Any]], object]
) -> dict[str, Any]:
    """The reported network facts once ``check(report)`` holds (the agent reports after a change)."""

    def ready() -> dict[str, Any] | None:
        report = reported_show(fleet, host)
        return report if check(report) else None

    result: dict[str, Any] = wait_until(ready, 30, what)
    return result


# ----------------------------------------------------------------------------------------- facts


def test_host_net_show_reported_live_and_as_tables(fleet: InProcessFleet, host: str) -> None:
    report = wait_reported(fleet, host, "network facts in the host report", lambda r: iface(r, "eth0"))
    eth0 = iface(report, "eth0")
    assert eth0 is not None and eth0["addresses"] == ["192.0.2.10/24"] and eth0["admin_up"] is True
    eth1 = iface(report, "eth1")
    assert eth1 is not None and eth1["master"] == "br0"
    assert [(r["dst"], r["gateway"], r["dev"]) for r in report["routes"] if r["dst"] == "default"] == [
        ("default", "192.0.2.1", "eth0")
    ]
    assert [b["name"] for b in report["bridges"]] == ["br0"]
    assert report["persistence"] == "networkd" and report["dns"] == ["192.0.2.1"]
    assert report["ipv4_forwarding"] is False
    assert [n["name"] for n in report["networks"]] == ["default"]
    assert report["pending"] is None and report["last_rollback"] is None

    # --live asks the agent now: a NIC plugged since the last report shows at once. (The host's
    # reports stop first, heartbeats with them, so that the reported facts stay as they are.)
    agent = fleet.hosts_by_name[host].agent
    assert agent is not None
    agent.reporter.stop(final_report=False)
    fleet.fake(host).links.add_link("eth7", addresses=("203.0.113.7/24",))
    live = fleet.cli_ok("host", "net", "show", host, "--live")
    eth7 = iface(live, "eth7")
    assert eth7 is not None and eth7["addresses"] == ["203.0.113.7/24"]
    assert iface(reported_show(fleet, host), "eth7") is None, "the reported facts are the last report's"

    table = fleet.cli("host", "net", "show", host, "--live", output="table")
    assert table.code == 0, table.stdout + table.stderr
    for title in (
        "interfaces " + host,
        "routes (main table)",
        "bridges",
        "libvirt networks",
        "host networking",
    ):
        assert title in table.stdout
    assert re.search(r"eth1 .*br0", table.stdout), "eth1's master"
    assert re.search(r"default .*192\.0\.2\.1 .*eth0", table.stdout), "the default route"
    assert "eth1 (forwarding)" in table.stdout, "br0's port and its state"
    assert re.search(r"IPv4 forwarding .*no", table.stdout)
    assert re.search(r"persistence .*networkd", table.stdout)
    assert "bonds" not in table.stdout, "no bonds table on a host without bonds"


def test_net_show_and_list_refuse_unknown_hosts_and_bad_options(fleet: InProcessFleet, host: str) -> None:
    unknown = fleet.cli("host", "net", "show", "nosuchhost")
    assert unknown.code == 3 and unknown.json["error"]["type"] == "NotFound"
    unknown_live = fleet.cli("net", "list", "--host", "nosuchhost", "--live")
    assert unknown_live.code == 3
    forward = fleet.cli("net", "start", "nosuchhost", "default")
    assert forward.code == 3 and "nosuchhost" in forward.json["error"]["message"]
    live_all = fleet.cli("net", "list", "--live")
    assert live_all.code == 2 and "--live needs --host" in live_all.json["error"]["message"]
    table = fleet.cli("net", "list", "--live", output="table")
    assert table.code == 2 and "--live needs --host" in table.stderr
    bad_host = fleet.cli("host", "net", "show", "bad host!")
    assert bad_host.code == 2


# ----------------------------------------------------------------------------------------- libvirt networks


def test_libvirt_network_lifecycle(fleet: InProcessFleet, host: str) -> None:
    hv = fleet.fake(host).hypervisor
    nat = fleet.cli_ok(
        "net", "define", host, "lab", "--address", "192.168.150.1/24",
        "--dhcp", "192.168.150.2-192.168.150.254", "--bridge", "virbr5",
    )  # fmt: skip
    net = nat["network"]
    assert (net["active"], net["autostart"], net["forward_mode"], net["bridge"]) == (
        True,
        True,
        "nat",
        "virbr5",
    )
    assert (net["address"], net["dhcp_start"], net["dhcp_end"]) == (
        "192.168.150.1/24",
        "192.168.150.2",
        "192.168.150.254",
    )
    assert nat["message"] == "defined, started, autostart on"
    stored = hv.network("lab")
    assert stored is not None and stored.active and stored.autostart

    again = fleet.cli_ok(
        "net", "define", host, "lab", "--address", "192.168.150.1/24",
        "--dhcp", "192.168.150.2-192.168.150.254", "--bridge", "virbr5",
    )  # fmt: skip
    assert again["message"] == "already defined", "defining the same network again is not an error"
    clash = fleet.cli("net", "define", host, "lab", "--address", "192.168.100.1/24")
    assert clash.code == 4 and clash.json["error"]["type"] == "AlreadyExists", clash.stdout

    iso = fleet.cli_ok(
        "net", "define", host, "iso", "--mode", "isolated", "--address", "10.99.0.1/24", "--no-autostart"
    )
    assert iso["network"]["forward_mode"] == "isolated" and iso["network"]["autostart"] is False
    assert iso["network"]["bridge"].startswith("virbr"), "libvirt names the bridge when none is given"
    lan = fleet.cli_ok("net", "define", host, "lan", "--mode", "bridge", "--bridge", "br0", "--no-start")
    assert (lan["network"]["forward_mode"], lan["network"]["bridge"], lan["network"]["active"]) == (
        "bridge",
        "br0",
        False,
    )

    live = fleet.cli_ok("net", "list", "--host", host, "--live")
    assert {e["network"]["name"] for e in live["entries"]} == {"default", "lab", "iso", "lan"}
    assert {e["host"] for e in live["entries"]} == {host}
    wait_until(
        lambda: (
            {e["network"]["name"] for e in fleet.cli_ok("net", "list")["entries"] if e["host"] == host}
            == {"default", "lab", "iso", "lan"}
        ),
        30,
        "the networks in the host report",
    )
    only = fleet.cli_ok("net", "list", "--host", host)
    assert {e["host"] for e in only["entries"]} == {host}

    # virsh net-start / net-destroy / net-autostart: each says whether it changed anything.
    assert fleet.cli_ok("net", "start", host, "lan")["message"] == "started"
    assert fleet.cli_ok("net", "start", host, "lan")["message"] == "already active"
    stopped = fleet.cli_ok("net", "stop", host, "lab")
    assert (stopped["network"]["active"], stopped["message"]) == (False, "stopped")
    assert fleet.cli_ok("net", "stop", host, "lab")["message"] == "already inactive"
    off = fleet.cli_ok("net", "autostart", host, "lab", "--disable")
    assert (off["network"]["autostart"], off["message"]) == (False, "autostart off")
    assert fleet.cli_ok("net", "autostart", host, "lab")["network"]["autostart"] is True
    stored = hv.network("lab")
    assert stored is not None and not stored.active and stored.autostart

    # The default NAT network can be deleted (virsh net-destroy + net-undefine).
    undefined = fleet.cli_ok("net", "undefine", host, "default")
    assert undefined == {"network": None, "message": "undefined"}
    assert hv.network("default") is None
    assert fleet.cli_ok("net", "undefine", host, "default")["message"] == "not defined (nothing to do)"
    missing = fleet.cli("net", "start", host, "default")
    assert missing.code == 3 and "no network with matching name 'default'" in missing.json["error"]["message"]
    names = {e["network"]["name"] for e in fleet.cli_ok("net", "list", "--host", host, "--live")["entries"]}
    assert names == {"lab", "iso", "lan"}


def test_libvirt_network_tables_and_refused_specs(fleet: InProcessFleet, host: str) -> None:
    define = fleet.cli(
        "net", "define", host, "tbl", "--address", "10.77.0.1/24", "--dhcp", "10.77.0.10-10.77.0.20",
        output="table",
    )  # fmt: skip
    assert define.code == 0, define.stdout + define.stderr
    assert "network tbl: defined, started, autostart on" in define.stdout
    row = next(line for line in define.stdout.splitlines() if " tbl " in line)
    for cell in ("active", "yes", "nat", "10.77.0.1/24", "10.77.0.10-10.77.0.20"):
        assert cell in row, (cell, row)
    listed = fleet.cli("net", "list", "--host", host, "--live", output="table")
    assert listed.code == 0 and "libvirt networks" in listed.stdout
    assert re.search(rf"{host} +│ default +│ active", listed.stdout)
    undefine = fleet.cli("net", "undefine", host, "tbl", output="table")
    assert undefine.code == 0 and undefine.stdout.strip() == "undefined"

    before = fleet.fake(host).hypervisor.network_infos()
    for args, message in (
        (("--mode", "nat"), "a nat network needs an address"),
        (("--address", "10.1.0.1/24", "--dhcp", "10.1.0.9"), "--dhcp must be START-END"),
        (("--address", "10.1.0.1/24", "--dhcp", "10.2.0.2-10.2.0.9"), "is not inside 10.1.0.0/24"),
        (("--mode", "bridge"), "needs the host bridge"),
        (("--mode", "mesh", "--address", "10.1.0.1/24"), "network mode must be one of"),
        (("--address", "10.1.0.0/24"), "not the network address"),
    ):
        refused = fleet.cli("net", "define", host, "bad", *args)
        assert refused.code == 2, (args, refused.stdout)
        assert message in refused.json["error"]["message"], (args, refused.json)
    assert fleet.fake(host).hypervisor.network_infos() == before, "a refused definition changes nothing"


def test_ip_forward_check_enable_and_persist(fleet: InProcessFleet, host: str) -> None:
    proc = netroot(fleet, host) / "proc/sys/net/ipv4/ip_forward"
    sysctl = netroot(fleet, host) / "etc/sysctl.d/90-virtfleet-ip-forward.conf"
    before = fleet.cli_ok("net", "ip-forward", host)
    assert (before["enabled"], before["changed"], before["message"]) == (
        False,
        False,
        "net.ipv4.ip_forward = 0",
    )
    check = fleet.cli("net", "ip-forward", host, output="table")
    assert check.code == 0 and f"{host}: net.ipv4.ip_forward = 0" in check.stdout
    assert not sysctl.exists(), "checking changes nothing"

    after = fleet.cli_ok("net", "ip-forward", host, "--enable")
    assert (after["enabled"], after["changed"], after["message"]) == (True, True, "enabled")
    assert after["persisted"] == [str(sysctl)]
    assert proc.read_text().strip() == "1"
    assert sysctl.read_text().endswith("net.ipv4.ip_forward = 1\n")
    again = fleet.cli("net", "ip-forward", host, "--enable", output="table")
    assert again.code == 0
    assert f"{host}: net.ipv4.ip_forward = 1 (already enabled)" in again.stdout
    assert f"wrote: {sysctl}" in again.stdout
    wait_reported(fleet, host, "forwarding in the host report", lambda r: r["ipv4_forwarding"] is True)

    # --no-persist: the runtime switch only (a fresh host, so that forwarding is off again).
    other = new_host(fleet)
    runtime = fleet.cli_ok("net", "ip-forward", other, "--enable", "--no-persist")
    assert runtime["enabled"] is True and runtime["persisted"] == []
    assert not (netroot(fleet, other) / "etc/sysctl.d").exists()


# ----------------------------------------------------------------------------------------- bridges


def test_bridge_takes_the_ip_route_and_dns_of_the_nic_and_is_persisted(
    fleet: InProcessFleet, host: str
) -> None:
    result = fleet.cli_ok(
        "host", "net", "bridge", "create", host, "br1", "--nic", "eth0", "--dns", "192.0.2.53"
    )
    assert result["state"] == "applied" and result["rolled_back"] is False, result
    assert result["operation"] == "bridge create br1"
    assert result["probe"] == "reached the broker (fake probe)"
    assert result["steps"][:2] == ["create bridge br1 (stp off)", "enslave eth0 to br1"]
    now = facts(fleet, host)
    br1, eth0 = now.interface("br1"), now.interface("eth0")
    assert br1 is not None and br1.kind == "bridge" and br1.addresses == ("192.0.2.10/24",)
    assert eth0 is not None and eth0.master == "br1" and eth0.addresses == ()
    assert default_route(now) == ("192.0.2.1", "br1")
    assert fleet.fake(host).probe.calls == [30.0], "one probe, with the default deadline"
    resolv = (netroot(fleet, host) / "etc/resolv.conf").read_text()
    assert "nameserver 192.0.2.53" in resolv and "192.0.2.1" not in resolv

    # persisted as systemd-networkd files under the host's state dir
    files = networkd(fleet, host)
    assert result["persistence"] == "networkd"
    assert set(result["persisted"]) >= {
        str(files / "10-virtfleet-br1.netdev"),
        str(files / "10-virtfleet-br1.network"),
        str(files / "10-virtfleet-eth0.network"),
    }
    assert "Kind=bridge" in (files / "10-virtfleet-br1.netdev").read_text()
    br1_network = (files / "10-virtfleet-br1.network").read_text()
    for line in ("Name=br1", "Address=192.0.2.10/24", "Gateway=192.0.2.1", "DNS=192.0.2.53"):
        assert line in br1_network.splitlines(), (line, br1_network)
    assert "Bridge=br1" in (files / "10-virtfleet-eth0.network").read_text().splitlines()
    assert not (state_dir(fleet, host) / PENDING_FILE).exists(), "the change is kept: no pending record"

    reported = wait_reported(
        fleet, host, "br1 in the host report", lambda r: (iface(r, "br1") or {}).get("addresses")
    )
    reported_eth0 = iface(reported, "eth0")
    assert reported_eth0 is not None and reported_eth0["master"] == "br1"
    assert reported["dns"] == ["192.0.2.53"]
    assert "br1" in fleet.cli_ok("host", "show", host)["bridges"], "the bridge is a host fact for placement"

    # the same request again changes nothing
    again = fleet.cli_ok(
        "host", "net", "bridge", "create", host, "br1", "--nic", "eth0", "--dns", "192.0.2.53"
    )
    assert again["state"] == "unchanged" and again["steps"] == []


def test_bridge_stp_and_removal_as_tables(fleet: InProcessFleet, host: str) -> None:
    created = fleet.cli("host", "net", "bridge", "create", host, "br1", "--nic", "eth0", output="table")
    assert created.code == 0, created.stdout + created.stderr
    lines = created.stdout.splitlines()
    assert re.fullmatch(r"bridge create br1: applied \(change [0-9a-f]{32}, \d+\.\ds\)", lines[0]), lines[0]
    assert "  step: create bridge br1 (stp off)" in lines
    assert "  probe: reached the broker (fake probe)" in lines
    assert "  persistence: networkd" in lines
    assert f"  wrote: {networkd(fleet, host) / '10-virtfleet-br1.netdev'}" in lines

    on = fleet.cli("host", "net", "bridge", "stp", host, "br1", "on", output="table")
    assert on.code == 0 and on.stdout.startswith("bridge stp br1 on: applied")
    bridge = facts(fleet, host).bridge("br1")
    assert bridge is not None and bridge.stp is True
    assert "STP=yes" in (networkd(fleet, host) / "10-virtfleet-br1.netdev").read_text()
    shown = fleet.cli("host", "net", "show", host, "--live", output="table")
    assert re.search(r"br1 +│ yes +│ eth0 \(forwarding\)", shown.stdout), shown.stdout
    off = fleet.cli_ok("host", "net", "bridge", "stp", host, "br1", "off")
    assert off["state"] == "applied"
    bridge = facts(fleet, host).bridge("br1")
    assert bridge is not None and bridge.stp is False
    assert fleet.cli_ok("host", "net", "bridge", "stp", host, "br1", "off")["state"] == "unchanged"
    bad = fleet.cli("host", "net", "bridge", "stp", host, "br1", "maybe")
    assert bad.code == 2 and "STP must be on or off" in bad.json["error"]["message"]
    not_a_bridge = fleet.cli("host", "net", "bridge", "stp", host, "eth1", "on")
    assert not_a_bridge.code == 2 and "not a bridge" in not_a_bridge.json["error"]["message"]

    removed = fleet.cli("host", "net", "bridge", "remove", host, "br1", output="table")
    assert removed.code == 0, removed.stdout + removed.stderr
    assert removed.stdout.startswith("bridge remove br1: applied")
    assert f"  removed: {networkd(fleet, host) / '10-virtfleet-br1.netdev'}" in removed.stdout.splitlines()
    now = facts(fleet, host)
    assert now.interface("br1") is None
    eth0 = now.interface("eth0")
    assert eth0 is not None and eth0.addresses == ("192.0.2.10/24",)
    assert default_route(now) == ("192.0.2.1", "eth0")
    assert not (networkd(fleet, host) / "10-virtfleet-br1.network").exists()
    assert "Address=192.0.2.10/24" in (networkd(fleet, host) / "10-virtfleet-eth0.network").read_text()
    gone = fleet.cli_ok("host", "net", "bridge", "remove", host, "br1")
    assert gone["state"] == "unchanged", "removing a bridge that is not there is not an error"


def test_dry_run_plans_without_changing(fleet: InProcessFleet, host: str) -> None:
    before = l3(facts(fleet, host))
    links = fleet.fake(host).links
    links.applied.clear()
    result = fleet.cli_ok("host", "net", "bridge", "create", host, "br1", "--nic", "eth0", "--dry-run")
    assert result["state"] == "dry-run"
    assert result["steps"][:2] == ["create bridge br1 (stp off)", "enslave eth0 to br1"]
    assert "add address 192.0.2.10/24 to br1" in result["steps"]
    assert l3(facts(fleet, host)) == before and links.applied == []
    assert not networkd(fleet, host).joinpath("10-virtfleet-br1.netdev").exists()
    assert fleet.fake(host).probe.calls == [], "a dry run does not probe"
    table = fleet.cli("host", "net", "bond", "remove", host, "bond9", "--dry-run", output="table")
    assert table.code == 0 and table.stdout.startswith("bond remove bond9: dry-run")


def test_planning_errors_change_nothing(fleet: InProcessFleet, host: str) -> None:
    before = l3(facts(fleet, host))
    no_nic = fleet.cli("host", "net", "bridge", "create", host, "br1", "--nic", "eth9")
    assert no_nic.code == 3 and "interface eth9 does not exist" in no_nic.json["error"]["message"]
    taken = fleet.cli("host", "net", "bridge", "create", host, "br1", "--nic", "eth1")
    assert taken.code == 4 and "already enslaved to br0" in taken.json["error"]["message"]
    for args, message in (
        (("--nic", "eth0", "--deadline", "200"), "rollback deadline must be 1-90 s"),
        (("--nic", "eth0", "--confirm", "--confirm-timeout", "0.5"), "confirm timeout must be 1-3600 s"),
        (("--nic", "eth0", "--gateway", "not-an-ip"), "invalid gateway"),
        (("--nic", "eth0", "--address", "10.0.0.1"), "expected ADDRESS/PREFIX"),
        (("--nic", "eth0", "--nic", "eth0"), "an interface is named twice"),
    ):
        refused = fleet.cli("host", "net", "bridge", "create", host, "br1", *args)
        assert refused.code == 2 and message in refused.json["error"]["message"], (args, refused.stdout)
    assert l3(facts(fleet, host)) == before
    assert fleet.fake(host).probe.calls == []


# ----------------------------------------------------------------------------------------- safety


def test_change_that_cuts_the_host_off_from_the_broker_is_rolled_back(
    fleet: InProcessFleet, host: str
) -> None:
    """eth0 enslaved to a bridge with its address left on it (--no-move-ip): a port's own address
    receives nothing, so the broker is unreachable; the agent restores the host by itself."""
    before = l3(facts(fleet, host))
    resolv_before = (netroot(fleet, host) / "etc/resolv.conf").read_text()
    result = fleet.cli(
        "host", "net", "bridge", "create", host, "br1", "--nic", "eth0", "--no-move-ip",
        "--dns", "192.0.2.99", "--deadline", "5",
    )  # fmt: skip
    assert result.code == 1, result.stdout + result.stderr
    body = result.json
    assert (body["state"], body["rolled_back"], body["restored"]) == ("rolled-back", True, True), body
    assert "could not reach the broker within 5 s" in body["rollback_reason"]
    assert fleet.fake(host).probe.calls == [5.0]
    after = facts(fleet, host)
    assert after.interface("br1") is None
    assert l3(after) == before
    assert (netroot(fleet, host) / "etc/resolv.conf").read_text() == resolv_before
    assert not networkd(fleet, host).joinpath("10-virtfleet-br1.netdev").exists(), (
        "rolled back: not persisted"
    )
    assert not (state_dir(fleet, host) / PENDING_FILE).exists()
    saved = json.loads((state_dir(fleet, host) / ROLLBACK_FILE).read_text())
    assert saved["change_id"] == body["change_id"]

    def rollback_reported() -> dict[str, Any] | None:
        rb = reported_show(fleet, host).get("last_rollback")
        return rb if rb and rb["change_id"] == body["change_id"] else None

    rb = wait_until(rollback_reported, 30, "the rollback in the next host report")
    assert rb["operation"] == "bridge create br1" and rb["restored"] is True
    table = fleet.cli("host", "net", "show", host, output="table")
    assert re.search(r"last rollback .*bridge create br1 at .*could not reach the broker", table.stdout)
    assert "(restored)" in table.stdout

    # The same, for people: exit 1 and the reason in the text.
    text = fleet.cli(
        "host", "net", "bridge", "create", host, "br1", "--nic", "eth0", "--no-move-ip", "--deadline", "2",
        output="table",
    )  # fmt: skip
    assert text.code == 1
    assert "bridge create br1: rolled-back" in text.stdout
    assert "  ROLLED BACK: could not reach the broker within 2 s" in text.stdout
    assert "  the previous configuration was restored" in text.stdout
    assert l3(facts(fleet, host)) == before


def test_a_failing_step_is_undone(fleet: InProcessFleet, host: str) -> None:
    """The last step (a gateway on no connected network) fails after the bridge took the IP."""
    before = l3(facts(fleet, host))
    result = fleet.cli(
        "host", "net", "bridge", "create", host, "br1", "--nic", "eth0", "--gateway", "203.0.113.1"
    )
    assert result.code == 1, result.stdout
    error = result.json["error"]
    assert error["type"] == "NetworkConfigError"
    assert "add route default via 203.0.113.1 dev br1" in error["message"]
    assert "the host was restored as it was" in error["message"]
    assert error["details"]["rolled_back"] is True and error["details"]["restored"] is True
    assert l3(facts(fleet, host)) == before
    assert fleet.fake(host).probe.calls == [], "no probe after a failed step"


def test_confirm_keeps_the_change(fleet: InProcessFleet, host: str) -> None:
    files = networkd(fleet, host)
    pending = fleet.cli_ok("host", "net", "bridge", "create", host, "br1", "--nic", "eth0", "--confirm")
    assert pending["state"] == "pending-confirm" and pending["confirm_expires_at"] is not None
    eth0 = facts(fleet, host).interface("eth0")
    assert eth0 is not None and eth0.master == "br1"
    assert not files.joinpath("10-virtfleet-br1.netdev").exists(), "persisted only once kept"
    assert (state_dir(fleet, host) / PENDING_FILE).exists(), "an agent restart now would restore the host"
    live = fleet.cli_ok("host", "net", "show", host, "--live")
    assert live["pending"]["change_id"] == pending["change_id"]
    table = fleet.cli("host", "net", "show", host, "--live", output="table")
    assert re.search(
        rf"awaiting confirm .*bridge create br1 \({pending['change_id']}\), undone in \d+s", table.stdout
    )
    wait_reported(fleet, host, "the pending change in the report", lambda r: r["pending"] is not None)

    busy = fleet.cli("host", "net", "bridge", "stp", host, "br0", "on")
    assert busy.code == 4 and "waiting for confirmation" in busy.json["error"]["message"]

    kept = fleet.cli_ok("host", "net", "confirm", host, pending["change_id"])
    assert kept["state"] == "applied" and kept["confirm_expires_at"] is None
    assert files.joinpath("10-virtfleet-br1.netdev").exists()
    assert not (state_dir(fleet, host) / PENDING_FILE).exists()
    br1 = facts(fleet, host).interface("br1")
    assert br1 is not None and br1.addresses == ("192.0.2.10/24",)
    assert fleet.cli_ok("host", "net", "show", host, "--live")["pending"] is None
    # confirming again is answered, not an error (a retried CLI call)
    assert fleet.cli_ok("host", "net", "confirm", host, pending["change_id"])["state"] == "applied"
    unknown = fleet.cli("host", "net", "confirm", host, "nosuchchange")
    assert unknown.code == 3
    bad_id = fleet.cli("host", "net", "confirm", host, "not/an/id")
    assert bad_id.code == 2


def test_revert_undoes_a_pending_change_now(fleet: InProcessFleet, host: str) -> None:
    before = l3(facts(fleet, host))
    tried = fleet.cli_ok("host", "net", "bridge", "create", host, "br1", "--nic", "eth0", *HELD)
    eth0 = facts(fleet, host).interface("eth0")
    assert eth0 is not None and eth0.master == "br1"
    reverted = fleet.cli_ok("host", "net", "revert", host, tried["change_id"])
    assert reverted["state"] == "reverted" and reverted["restored"] is True
    assert reverted["rollback_reason"] == "reverted by the operator"
    assert l3(facts(fleet, host)) == before
    gone = fleet.cli("host", "net", "confirm", host, tried["change_id"])
    assert gone.code == 4 and "no longer pending: it was reverted" in gone.json["error"]["message"]
    again = fleet.cli("host", "net", "revert", host, tried["change_id"], output="table")
    assert again.code == 0 and "bridge create br1: reverted" in again.stdout
    assert "  ROLLED BACK: reverted by the operator" in again.stdout
    nothing = fleet.cli("host", "net", "revert", host, "nosuchchange")
    assert nothing.code == 3 and "no change nosuchchange is waiting" in nothing.json["error"]["message"]


def test_unconfirmed_change_is_undone_when_the_timeout_passes(fleet: InProcessFleet, host: str) -> None:
    before = l3(facts(fleet, host))
    pending = fleet.cli(
        "host", "net", "bridge", "create", host, "br1", "--nic", "eth0", "--confirm", "--confirm-timeout", "1",
        output="table",
    )  # fmt: skip
    assert pending.code == 0, pending.stdout + pending.stderr
    match = re.search(r"\(change ([0-9a-f]{32}),", pending.stdout)
    assert match is not None, pending.stdout
    change_id = match.group(1)
    assert "bridge create br1: pending-confirm" in pending.stdout
    assert re.search(r"  undone in \d+s unless confirmed", pending.stdout)
    assert f"confirm with: virtfleet host net confirm {host} {change_id}" in pending.stdout

    def undone() -> HostNetworkReport | None:
        report = fleet.cli_ok("host", "net", "show", host, "--live")
        rb = report["last_rollback"]
        return facts(fleet, host) if rb and rb["change_id"] == change_id else None

    after = wait_until(undone, 30, "the unconfirmed change to be undone")
    assert l3(after) == before
    rb = fleet.cli_ok("host", "net", "show", host, "--live")["last_rollback"]
    assert "not confirmed within 1 s" in rb["reason"]
    late = fleet.cli("host", "net", "confirm", host, change_id)
    assert late.code == 4 and "no longer pending" in late.json["error"]["message"]
    assert not networkd(fleet, host).joinpath("10-virtfleet-br1.netdev").exists()


def test_a_restore_that_fails_is_reported_and_finished_by_the_restarted_agent(
    fleet: InProcessFleet, host: str
) -> None:
    before = l3(facts(fleet, host))
    pending = fleet.cli_ok("host", "net", "bridge", "create", host, "br1", "--nic", "eth0", *HELD)
    links = fleet.fake(host).links
    links.fail_next(NetworkConfigError("delete link br1: Operation not permitted"), DeleteLink)
    reverted = fleet.cli("host", "net", "revert", host, pending["change_id"], output="table")
    assert reverted.code == 1, "a revert that could not restore everything fails"
    assert "bridge create br1: reverted" in reverted.stdout
    assert "  the previous configuration was NOT fully restored" in reverted.stdout
    assert "  warning: delete link br1: Operation not permitted" in reverted.stdout
    assert re.search(r"  warning: still different: delete .*br1", reverted.stdout), reverted.stdout
    now = facts(fleet, host)
    assert now.interface("br1") is not None, "the bridge could not be deleted"
    eth0 = now.interface("eth0")
    assert eth0 is not None and eth0.addresses == ("192.0.2.10/24",), "the rest was put back"
    assert (state_dir(fleet, host) / PENDING_FILE).exists(), "kept, so that the restore is finished later"
    rb = fleet.cli_ok("host", "net", "show", host, "--live")["last_rollback"]
    assert (rb["change_id"], rb["restored"]) == (pending["change_id"], False)
    table = fleet.cli("host", "net", "show", host, "--live", output="table")
    assert "NOT fully restored: delete link br1: Operation not permitted" in table.stdout

    # The agent restarts (a new process would): it finishes the restore before serving anything.
    fleet.stop_agent(host)
    fleet.start_agent(host)
    assert l3(facts(fleet, host)) == before
    assert not (state_dir(fleet, host) / PENDING_FILE).exists()
    rb = fleet.cli_ok("host", "net", "show", host, "--live")["last_rollback"]
    assert rb["restored"] is True and rb["reason"] == "the agent restarted before the change was kept"


@pytest.mark.parametrize("keep", [True, False], ids=["keep", "undo"])
def test_confirm_is_asked_on_a_terminal(fleet: InProcessFleet, host: str, keep: bool) -> None:
    """On a terminal the CLI asks at once and confirms or reverts by itself (like netplan try)."""
    before = l3(facts(fleet, host))
    result = fleet.cli(
        "host",
        "net",
        "bridge",
        "create",
        host,
        "br1",
        "--nic",
        "eth0",
        "--confirm",
        output="table",
        stdin="y\n" if keep else "n\n",
        tty=True,
    )
    assert "Keep this network configuration? [y/N]" in result.stderr
    assert "bridge create br1: pending-confirm" in result.stdout
    if keep:
        assert result.code == 0 and "bridge create br1: applied" in result.stdout
        assert facts(fleet, host).interface("br1") is not None
        assert networkd(fleet, host).joinpath("10-virtfleet-br1.netdev").exists()
    else:
        assert result.code == 1, "undone: exit 1 like any rolled-back change"
        assert "bridge create br1: reverted" in result.stdout
        assert l3(facts(fleet, host)) == before


def test_bridge_remove_refuses_while_vm_interfaces_are_attached(fleet: InProcessFleet, host: str) -> None:
    # The fake hypervisor does not plug a running VM's tap into the fake links (a real host does):
    # the tap a VM on br0 would have is put there by hand.
    links = fleet.fake(host).links
    links.add_link("vnet0", kind="tun")
    links.apply(SetMaster("vnet0", "br0"))
    refused = fleet.cli("host", "net", "bridge", "remove", host, "br0")
    assert (
        refused.code == 4
        and "VM interfaces are still attached to br0: vnet0" in refused.json["error"]["message"]
    )
    assert facts(fleet, host).interface("br0") is not None
    forced = fleet.cli_ok("host", "net", "bridge", "remove", host, "br0", "--force")
    assert forced["state"] == "applied"
    now = facts(fleet, host)
    vnet0 = now.interface("vnet0")
    assert now.interface("br0") is None
    assert vnet0 is not None and vnet0.master is None, "the VM's interface stays, outside any bridge"


# ----------------------------------------------------------------------------------------- bonds


def test_bond_create_enslave_failover_and_remove(fleet: InProcessFleet, host: str) -> None:
    links = fleet.fake(host).links
    for nic in ("eth2", "eth3", "eth4"):
        links.add_link(nic)
    created = fleet.cli_ok(
        "host", "net", "bond", "create", host, "bond0", "--slave", "eth2", "--slave", "eth3",
        "--primary", "eth2", "--address", "10.9.0.2/24", "--miimon", "200",
    )  # fmt: skip
    assert created["state"] == "applied", created
    bond = facts(fleet, host).bond("bond0")
    assert bond is not None and (bond.mode, bond.miimon, bond.primary, bond.active_slave) == (
        "active-backup",
        200,
        "eth2",
        "eth2",
    )
    assert [(s.name, s.state) for s in bond.slaves] == [("eth2", "active"), ("eth3", "backup")]
    bond0 = facts(fleet, host).interface("bond0")
    assert bond0 is not None and bond0.addresses == ("10.9.0.2/24",)
    netdev = (networkd(fleet, host) / "10-virtfleet-bond0.netdev").read_text()
    assert "Kind=bond" in netdev and "Mode=active-backup" in netdev and "MIIMonitorSec=200ms" in netdev
    assert "Bond=bond0" in (networkd(fleet, host) / "10-virtfleet-eth2.network").read_text()

    enslaved = fleet.cli_ok("host", "net", "bond", "enslave", host, "bond0", "eth4")
    assert enslaved["state"] == "applied" and enslaved["operation"] == "bond enslave bond0 eth4"
    bond = facts(fleet, host).bond("bond0")
    assert bond is not None and [s.name for s in bond.slaves] == ["eth2", "eth3", "eth4"]
    taken = fleet.cli("host", "net", "bond", "enslave", host, "bond0", "eth1")
    assert taken.code == 4 and "already enslaved to br0" in taken.json["error"]["message"]
    not_a_bond = fleet.cli("host", "net", "bond", "enslave", host, "br0", "eth4")
    assert not_a_bond.code == 2

    # The primary loses its cable: the bond fails over (what /proc/net/bonding shows).
    links.set_cable("eth2", False)
    live = fleet.cli("host", "net", "show", host, "--live", output="table")
    assert live.code == 0 and "bonds" in live.stdout
    assert re.search(
        r"bond0 +│ active-backup +│ 200 +│ eth3 +│ eth2 +│ eth2 +│ down +│ backup", live.stdout
    ), live.stdout
    assert re.search(r"│ eth3 +│ up +│ active", live.stdout)
    reported = wait_reported(
        fleet, host, "the bond in the report", lambda r: any(b["name"] == "bond0" for b in r["bonds"])
    )
    assert reported["bonds"][0]["mode"] == "active-backup"
    links.set_cable("eth2", True)

    removed = fleet.cli_ok("host", "net", "bond", "remove", host, "bond0")
    assert removed["state"] == "applied"
    now = facts(fleet, host)
    assert now.interface("bond0") is None and now.bonds == ()
    eth2 = now.interface("eth2")
    assert eth2 is not None and eth2.addresses == ("10.9.0.2/24",), "the primary gets the address back"
    assert not (networkd(fleet, host) / "10-virtfleet-bond0.netdev").exists()


def test_bond_over_the_uplink_with_a_bridge_on_top_keeps_the_host_reachable(
    fleet: InProcessFleet, host: str
) -> None:
    fleet.fake(host).links.add_link("eth2")
    result = fleet.cli(
        "host", "net", "bond", "create", host, "bond0", "--slave", "eth0", "--slave", "eth2",
        "--bridge", "brbond", "--bridge-stp", "--mode", "802.3ad", "--confirm", output="table",
    )  # fmt: skip
    assert result.code == 0, result.stdout + result.stderr
    assert "bond create bond0: pending-confirm" in result.stdout
    pending = re.search(r"\(change ([0-9a-f]{32}),", result.stdout)
    assert pending is not None, f"the output names the pending change: {result.stdout}"
    change_id = pending.group(1)
    now = facts(fleet, host)
    brbond, bond0, bridge = now.interface("brbond"), now.interface("bond0"), now.bridge("brbond")
    assert brbond is not None and brbond.addresses == ("192.0.2.10/24",)
    assert bond0 is not None and bond0.master == "brbond"
    assert default_route(now) == ("192.0.2.1", "brbond")
    assert bridge is not None and bridge.stp is True
    kept = fleet.cli("host", "net", "confirm", host, change_id, output="table")
    assert kept.code == 0 and "bond create bond0: applied" in kept.stdout
    assert "Kind=bridge" in (networkd(fleet, host) / "10-virtfleet-brbond.netdev").read_text()
    assert "Mode=802.3ad" in (networkd(fleet, host) / "10-virtfleet-bond0.netdev").read_text()


def test_bond_is_refused_cleanly_without_the_bonding_driver(fleet: InProcessFleet, host: str) -> None:
    links = fleet.fake(host).links
    links.bonding = False  # a kernel without the bonding module (this project's CI kernel)
    before = l3(facts(fleet, host))
    result = fleet.cli(
        "host", "net", "bond", "create", host, "bond0", "--slave", "eth0", "--address", "10.9.0.3/24"
    )
    assert result.code == 1
    assert "bonding driver is not available" in result.json["error"]["message"]
    assert l3(facts(fleet, host)) == before


def test_a_bond_without_slaves_is_shown(fleet: InProcessFleet, host: str) -> None:
    # A bond whose slaves were all released by hand (ip link set ethX nomaster).
    fleet.fake(host).links.add_link("eth2")
    fleet.cli_ok("host", "net", "bond", "create", host, "bond1", "--slave", "eth2", "--no-move-ip")
    fleet.fake(host).links.apply(SetMaster("eth2", None))
    table = fleet.cli("host", "net", "show", host, "--live", output="table")
    assert re.search(r"bond1 +│ active-backup +│ 100 +│ - +│ - +│ - +│ - +│ - +│ -", table.stdout), (
        table.stdout
    )


# ----------------------------------------------------------------------------------------- placement


def test_vms_are_placed_on_the_host_with_the_new_bridge_or_network(fleet: InProcessFleet) -> None:
    bridged, networked = new_host(fleet), new_host(fleet)
    refused = fleet.cli(
        "vm", "create", "onbr", "--memory", "128", "--disk", "1", "--network", "bridge=brvm", "--dry-run"
    )
    assert refused.code == 4 and refused.json["error"]["type"] == "NoValidHost"
    rules = {r["host"]: r["rule"] for r in refused.json["error"]["details"]["reasons"]}
    assert rules[bridged] == rules[networked] == "bridge"
    assert set(rules.values()) <= {"bridge", "host_down"}, "(hosts of other tests may be down)"
    text = fleet.cli("vm", "create", "onbr", "--network", "bridge=brvm", "--dry-run", output="table")
    assert text.code == 4 and "why each host was excluded" in text.stderr and "bridge" in text.stderr

    # An internal bridge (no NIC) on one host, a NAT network on another.
    assert fleet.cli_ok("host", "net", "bridge", "create", bridged, "brvm")["state"] == "applied"
    fleet.cli_ok("net", "define", networked, "labnet", "--address", "10.66.0.1/24")
    wait_until(
        lambda: (
            "brvm" in fleet.cli_ok("host", "show", bridged)["bridges"]
            and "labnet" in fleet.cli_ok("host", "show", networked)["networks"]
        ),
        30,
        "the new bridge and network in the host reports",
    )
    on_bridge = fleet.cli_ok(
        "vm", "create", "onbr", "--memory", "128", "--disk", "1", "--network", "bridge=brvm"
    )
    assert on_bridge["vm"]["host"] == bridged and on_bridge["vm"]["power_state"] == "running"
    on_net = fleet.cli_ok(
        "vm", "create", "onnet", "--memory", "128", "--disk", "1", "--network", "network=labnet"
    )
    assert on_net["vm"]["host"] == networked and on_net["vm"]["power_state"] == "running"
    nics = fleet.cli_ok("vm", "nic", "list", "onbr")
    assert [(n["type"], n["source"]) for n in nics["nics"]] == [("bridge", "brvm")]
    for vm in ("onbr", "onnet"):
        fleet.cli_ok("vm", "delete", vm, "--delete-disks")


def test_a_stopped_network_still_attracts_vms_and_the_build_is_refused_by_the_host(
    fleet: InProcessFleet,
) -> None:
    """libvirt lists inactive networks too (listAllNetworks(0)), and so do the reports: the
    scheduler sends the VM there, the host refuses to start it, and no other host has the network."""
    only = new_host(fleet)
    fleet.cli_ok("net", "define", only, "cold", "--address", "10.67.0.1/24", "--no-start", "--no-autostart")
    wait_until(lambda: "cold" in fleet.cli_ok("host", "show", only)["networks"], 30, "the network reported")
    result = fleet.cli("vm", "create", "cold1", "--memory", "128", "--disk", "1", "--network", "network=cold")
    assert result.code == 4, result.stdout
    message = result.json["error"]["message"]
    assert f"failed on {only}" in message and "network 'cold' is not active" in message
    assert result.json["error"]["type"] == "NoValidHost"
    vm = fleet.cli_ok("vm", "show", "cold1")
    assert (vm["status"], vm["host"]) == ("error", None)
    assert "network 'cold' is not active" in vm["last_error"]
    hv = fleet.fake(only).hypervisor
    assert hv.list_statuses() == () and hv.calls[-2:] == ["delete_volume_path", "undefine"], "cleaned up"
    fleet.cli_ok("vm", "delete", "cold1")
