"""End to end: ``virtfleet net`` / ``virtfleet host net`` -> controller -> a real agent process
running inside a network namespace, with its own libvirtd in that namespace.

The "hypervisor" namespace has two veth NICs, eth0 (10.201.0.2/24, default route via
10.201.0.1) and eth1 (10.202.0.2/24), whose peers sit in a "gateway" namespace. The agent
reaches the broker at 10.200.0.1:5672 — an address of the gateway namespace where a relay to
the real RabbitMQ listens — only through its default route. A libvirtd started inside the
hypervisor namespace (private sockets and state, tests/netsupport.py) gets the NAT networks, so
virbr0, dnsmasq and the iptables rules stay in the namespace. The agent's files (resolv.conf,
ifcfg, sysctl.d) go to a tmp root (``VIRTFLEET_NET_ROOT``). The tests run in order.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from netsupport import RELAY_IP, Lab, PrivateLibvirtd, lab, processes_in
from vfsupport import BIN, CliResult, Fleet, enrolled_key, fresh_database, private_vhost, wait_until

from agent.network.netlink import NetlinkDriver
from common.messages.network import HostNetworkReport

pytestmark = [pytest.mark.broker, pytest.mark.netns]

HOST = "hv1"
#: ``virtfleet`` arguments that bridge the second NIC (eth1, 10.202.0.2/24) as br1
BR1_ON_ETH1 = ("host", "net", "bridge", "create", HOST, "br1", "--nic", "eth1")


@dataclass
class Env:
    fleet: Fleet
    lab: Lab
    ns: str
    root: Path
    libvirtd: PrivateLibvirtd
    agent_log: Path

    def facts(self) -> HostNetworkReport:
        return NetlinkDriver(self.ns).facts()

    def cli(self, *args: str) -> CliResult:
        return self.fleet.cli(*args)

    def ok(self, *args: str) -> Any:
        result = self.cli(*args)
        assert result.code == 0, (
            f"virtfleet {' '.join(args)} -> {result.code}\n{result.stdout}{result.stderr}\n{self.logs()}"
        )
        return result.json

    def logs(self) -> str:
        agent = (
            "\n".join(self.agent_log.read_text(errors="replace").splitlines()[-40:])
            if self.agent_log.exists()
            else ""
        )
        return f"{self.fleet.logs()}\n===== agent {HOST} =====\n{agent}\n===== libvirtd =====\n{self.libvirtd.log()}"

    def reported(self) -> dict[str, Any]:
        return dict(self.ok("host", "net", "show", HOST))


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("net-e2e")
    with lab() as the_lab, private_vhost() as url, fresh_database(tmp) as db:
        h, _gateway = the_lab.host_behind_gateway("hv", "gw")
        libvirtd = PrivateLibvirtd(the_lab, h, tmp / "libvirtd")
        libvirtd.start()
        root = tmp / "root"
        (root / "etc/sysconfig/network-scripts").mkdir(parents=True)
        (root / "etc/resolv.conf").write_text("nameserver 10.201.0.53\n")
        (tmp / "agent.toml").write_text(
            f'[agent]\nimages_dir = "{tmp / "images"}"\nstorage_pool = "vftest-net"\n'
        )
        fleet = Fleet(tmp, url, db)
        agent_log = tmp / "agent.log"
        env_vars = {k: v for k, v in os.environ.items() if not k.startswith("VIRTFLEET_")}
        env_vars |= {
            "VIRTFLEET_NET_ROOT": str(root),
            "PYTHONUNBUFFERED": "1",
            "VIRTFLEET_TRUST_BROKER_LOGINS": "false",  # guest for all: development mode
        }
        agent_url = url.replace("127.0.0.1", RELAY_IP)
        e = Env(fleet, the_lab, h, root, libvirtd, agent_log)
        try:
            fleet.start_controller()
            the_lab.spawn(
                h,
                [
                    str(BIN / "virtfleet-agent"),
                    "--config",
                    str(tmp / "agent.toml"),
                    "--host-id",
                    HOST,
                    "--libvirt-uri",
                    libvirtd.uri,
                    "--amqp-url",
                    agent_url,
                    "--state-dir",
                    str(tmp / "agent-state"),
                    "--key-file",
                    str(enrolled_key(tmp, HOST)),
                    "--heartbeat-interval",
                    "1",
                    "--report-interval",
                    "3",
                    "--log-level",
                    "INFO",
                ],
                agent_log,
                env=env_vars,
            )
            fleet.wait_hosts({HOST}, timeout=60)
            yield e
        except BaseException:
            print(e.logs(), file=sys.stderr)
            raise
        finally:
            fleet.stop_all()
            the_lab.close()  # the agent first (it holds a connection to libvirtd)
            libvirtd.stop()


def _iface(report: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((i for i in report["interfaces"] if i["name"] == name), None)


def _default(report: dict[str, Any]) -> tuple[str | None, str | None]:
    r = next((r for r in report["routes"] if r["dst"] == "default" and r["family"] == "inet"), None)
    return (r["gateway"], r["dev"]) if r else (None, None)


def test_host_reports_its_network(env: Env) -> None:
    def reported() -> dict[str, Any] | None:
        report = env.reported()
        return report if _iface(report, "eth0") else None

    report = wait_until(reported, 30, "network facts in the host report")
    eth0 = _iface(report, "eth0")
    assert eth0 is not None and eth0["addresses"] == ["10.201.0.2/24"]
    assert _default(report) == ("10.201.0.1", "eth0")
    assert report["persistence"] == "ifcfg"
    live = env.ok("host", "net", "show", HOST, "--live")
    eth1 = _iface(live, "eth1")
    assert eth1 is not None and eth1["addresses"] == ["10.202.0.2/24"]
    table = env.fleet.cli("host", "net", "show", HOST, output="table")
    assert table.code == 0 and "eth0" in table.stdout and "10.201.0.1" in table.stdout


def test_ip_forward_check_and_enable(env: Env) -> None:
    before = env.ok("net", "ip-forward", HOST)
    assert before["enabled"] is False
    after = env.ok("net", "ip-forward", HOST, "--enable")
    assert after["enabled"] is True and after["changed"] is True
    assert env.lab.run(env.ns, ["cat", "/proc/sys/net/ipv4/ip_forward"]).stdout.strip() == "1"
    assert (
        (env.root / "etc/sysctl.d/90-virtfleet-ip-forward.conf")
        .read_text()
        .endswith("net.ipv4.ip_forward = 1\n")
    )


def test_nat_and_isolated_networks(env: Env) -> None:
    nat = env.ok(
        "net", "define", HOST, "default", "--address", "192.168.122.1/24",
        "--dhcp", "192.168.122.2-192.168.122.254", "--bridge", "virbr0",
    )  # fmt: skip
    net = nat["network"]
    assert (net["active"], net["autostart"], net["forward_mode"], net["bridge"]) == (
        True,
        True,
        "nat",
        "virbr0",
    )
    assert (net["address"], net["dhcp_start"], net["dhcp_end"]) == (
        "192.168.122.1/24",
        "192.168.122.2",
        "192.168.122.254",
    )
    assert "dnsmasq" in processes_in(env.ns), "libvirt's dnsmasq runs in the hypervisor namespace"
    virbr0 = env.facts().interface("virbr0")
    assert virbr0 is not None and virbr0.addresses == ("192.168.122.1/24",)
    again = env.ok("net", "define", HOST, "default", "--address", "192.168.122.1/24",
                   "--dhcp", "192.168.122.2-192.168.122.254", "--bridge", "virbr0")  # fmt: skip
    assert again["network"]["name"] == "default", "defining the same network again is not an error"
    iso = env.ok(
        "net",
        "define",
        HOST,
        "isolated",
        "--mode",
        "isolated",
        "--address",
        "10.99.0.1/24",
        "--bridge",
        "virbr1",
    )
    assert iso["network"]["forward_mode"] == "isolated"
    live = env.ok("net", "list", "--host", HOST, "--live")
    assert {e["network"]["name"] for e in live["entries"]} == {"default", "isolated"}
    wait_until(
        lambda: (
            {e["network"]["name"] for e in env.ok("net", "list")["entries"] if e["host"] == HOST}
            >= {"default", "isolated"}
        ),
        30,
        "the networks in the host report",
    )
    clash = env.cli("net", "define", HOST, "default", "--address", "192.168.100.1/24")
    assert clash.code == 4, clash.stdout
    assert env.ok("net", "autostart", HOST, "isolated", "--disable")["network"]["autostart"] is False


def test_bridge_takes_the_ip_route_and_dns_of_the_nic(env: Env) -> None:
    result = env.ok("host", "net", "bridge", "create", HOST, "br0", "--nic", "eth0", "--dns", "10.201.0.1")
    assert result["state"] == "applied", result
    assert result["probe"].startswith("broker reached"), result["probe"]
    facts = env.facts()
    br0, eth0 = facts.interface("br0"), facts.interface("eth0")
    assert br0 is not None and br0.addresses == ("10.201.0.2/24",)
    assert eth0 is not None and eth0.master == "br0"
    assert env.lab.ping(env.ns, "10.201.0.1"), "no path through br0"
    ifcfg = (env.root / "etc/sysconfig/network-scripts/ifcfg-br0").read_text()
    assert "TYPE=Bridge" in ifcfg and "GATEWAY=10.201.0.1" in ifcfg and "DNS1=10.201.0.1" in ifcfg
    assert "nameserver 10.201.0.1" in (env.root / "etc/resolv.conf").read_text()


def test_network_on_the_host_bridge_and_stp(env: Env) -> None:
    fwd = env.ok("net", "define", HOST, "lan", "--mode", "bridge", "--bridge", "br0")
    assert (fwd["network"]["forward_mode"], fwd["network"]["bridge"], fwd["network"]["active"]) == (
        "bridge",
        "br0",
        True,
    )
    on = env.ok("host", "net", "bridge", "stp", HOST, "br0", "on")
    assert on["state"] == "applied"
    bridge = env.facts().bridge("br0")
    assert bridge is not None and bridge.stp is True
    off = env.ok("host", "net", "bridge", "stp", HOST, "br0", "off")
    assert off["state"] == "applied"
    bridge = env.facts().bridge("br0")
    assert bridge is not None and bridge.stp is False


def test_agent_rolls_back_when_the_change_cuts_it_off_from_the_broker(env: Env) -> None:
    before = env.facts()
    result = env.cli(*BR1_ON_ETH1, "--gateway", "10.202.0.254", "--deadline", "4")
    assert result.code == 1, f"{result.stdout}{result.stderr}"
    body = result.json
    assert (body["state"], body["rolled_back"], body["restored"]) == ("rolled-back", True, True), body
    assert "could not reach the broker within 4 s" in body["rollback_reason"]
    after = env.facts()
    assert after.interface("br1") is None
    eth1_before, eth1_after = before.interface("eth1"), after.interface("eth1")
    assert eth1_before is not None and eth1_after is not None
    assert eth1_after.addresses == eth1_before.addresses
    assert {(r.dst, r.gateway, r.dev) for r in after.routes} == {
        (r.dst, r.gateway, r.dev) for r in before.routes
    }
    assert env.lab.ping(env.ns, "10.201.0.1")

    def rollback_reported() -> dict[str, Any] | None:
        rb = env.reported().get("last_rollback")
        return rb if rb and rb["change_id"] == body["change_id"] else None

    rb = wait_until(rollback_reported, 30, "the rollback in the next host report")
    assert rb["operation"] == "bridge create br1" and rb["restored"] is True


def test_second_bridge_on_the_second_uplink_and_its_removal(env: Env) -> None:
    env.ok(*BR1_ON_ETH1)
    assert env.lab.ping(env.ns, "10.201.0.1") and env.lab.ping(env.ns, "10.202.0.1")
    removed = env.ok("host", "net", "bridge", "remove", HOST, "br1")
    assert removed["state"] == "applied"
    facts = env.facts()
    eth1 = facts.interface("eth1")
    assert facts.interface("br1") is None
    assert eth1 is not None and eth1.addresses == ("10.202.0.2/24",)
    assert not (env.root / "etc/sysconfig/network-scripts/ifcfg-br1").exists()


def test_confirm_or_it_is_undone(env: Env) -> None:
    pending = env.ok(*BR1_ON_ETH1, "--confirm", "--confirm-timeout", "2")
    assert pending["state"] == "pending-confirm"

    def undone() -> HostNetworkReport | None:
        # Undone means all of it: the rollback's steps land one after another (the bridge goes, then
        # the address comes back), so wait for the whole restored state, not its first step.
        facts = env.facts()
        eth1 = facts.interface("eth1")
        restored = eth1 is not None and eth1.master is None and eth1.addresses == ("10.202.0.2/24",)
        return facts if restored and facts.interface("br1") is None else None

    wait_until(undone, 15, "undo: br1 gone, eth1 free with its address back")
    kept = env.ok(*BR1_ON_ETH1, "--confirm", "--confirm-timeout", "60")
    confirmed = env.ok("host", "net", "confirm", HOST, kept["change_id"])
    assert confirmed["state"] == "applied"
    br1 = env.facts().interface("br1")
    assert br1 is not None and br1.addresses == ("10.202.0.2/24",)
    env.ok("host", "net", "bridge", "remove", HOST, "br1")
    # An operator may also undo a pending change at once instead of waiting for its timeout.
    tried = env.ok(*BR1_ON_ETH1, "--confirm", "--confirm-timeout", "60")
    eth1 = env.facts().interface("eth1")
    assert eth1 is not None and eth1.master == "br1"
    reverted = env.ok("host", "net", "revert", HOST, tried["change_id"])
    assert reverted["state"] == "reverted"
    facts = env.facts()
    eth1 = facts.interface("eth1")
    assert facts.interface("br1") is None
    assert eth1 is not None and eth1.addresses == ("10.202.0.2/24",)
    gone = env.cli("host", "net", "confirm", HOST, tried["change_id"])
    assert gone.code != 0  # nothing left to confirm


def test_bond_is_refused_cleanly_on_this_kernel(env: Env) -> None:
    if Path("/sys/class/net/bonding_masters").exists():
        pytest.skip(
            "the clean refusal of bonds without a bonding driver is not tested: this kernel has bonding (bonds themselves are tested in the QEMU netlab guest)"
        )
    before = env.facts()
    result = env.cli(
        "host", "net", "bond", "create", HOST, "bond0", "--slave", "eth1", "--address", "10.202.0.3/24"
    )
    assert result.code == 1
    assert "bonding driver is not available" in result.json["error"]["message"]
    after = env.facts()
    assert after.interface("bond0") is None and after.interface("eth1") == before.interface("eth1")


def test_delete_the_default_network_and_the_bridge(env: Env) -> None:
    assert env.ok("net", "stop", HOST, "default")["network"]["active"] is False
    assert env.ok("net", "start", HOST, "default")["network"]["active"] is True  # virsh net-start
    env.ok("net", "stop", HOST, "default")
    undefined = env.ok("net", "undefine", HOST, "default")
    assert undefined["network"] is None
    names = {e["network"]["name"] for e in env.ok("net", "list", "--host", HOST, "--live")["entries"]}
    assert "default" not in names
    removed = env.ok("host", "net", "bridge", "remove", HOST, "br0")
    assert removed["state"] == "applied", removed
    facts = env.facts()
    eth0 = facts.interface("eth0")
    assert eth0 is not None and eth0.addresses == ("10.201.0.2/24",)
    assert any(r.dst == "default" and r.dev == "eth0" and r.gateway == "10.201.0.1" for r in facts.routes)
    assert env.lab.ping(env.ns, "10.201.0.1")
