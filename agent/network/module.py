"""The agent module of the network feature area: its command handlers and report facts.

Wiring: :func:`build_network_module` (one line in :func:`agent.main.build_modules`). Settings
that only matter for networking come from the environment, so the agent's own configuration
stays as it is:

=========================== ====================================================================
``VIRTFLEET_NET_ROOT``      root of the files the module writes (resolv.conf, ifcfg/networkd/
                            keyfile configuration, sysctl.d); default ``/``
``VIRTFLEET_NET_PERSIST``   ``auto`` (detect, default), ``ifcfg``, ``networkd``, ``keyfile``, ``none``
``VIRTFLEET_NET_PROC``      where ``sys/net/ipv4/ip_forward`` is read; default ``/proc``
=========================== ====================================================================
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from agent.drivers import host_facts
from agent.network import planner, resolv
from agent.network.model import Probe
from agent.network.persist import Persister
from agent.network.transaction import ChangeManager, Executor, LinkDriver
from common.errors import InvalidRequest, NetworkConfigError, VirtfleetError
from common.messages import network as msgs
from common.messages.base import replace
from common.messages.host import HostReport
from common.transport.rpc import HandlerTable

log = logging.getLogger(__name__)

#: The host changes: each applied as one transaction named by its ``change_id``.
HostChange = msgs.BridgeCreate | msgs.BridgeStp | msgs.InterfaceRemove | msgs.BondCreate | msgs.BondEnslave


class NetworksPort(Protocol):
    """libvirt networks (:class:`agent.network.libvirt_net.LibvirtNetworks` fits)."""

    def list(self) -> tuple[msgs.LibvirtNetworkInfo, ...]: ...

    def define(self, spec: msgs.NetworkSpec) -> tuple[msgs.LibvirtNetworkInfo, bool]: ...

    def start(self, name: str) -> bool: ...

    def stop(self, name: str) -> bool: ...

    def set_autostart(self, name: str, enabled: bool) -> None: ...

    def undefine(self, name: str) -> bool: ...

    def info(self, name: str) -> msgs.LibvirtNetworkInfo: ...


@dataclass(frozen=True, slots=True)
class NetworkSettings:
    root: Path = Path("/")
    persist: str = "auto"
    proc: Path = Path("/proc")

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> NetworkSettings:
        persist = env.get("VIRTFLEET_NET_PERSIST", "auto") or "auto"
        if persist not in ("auto", "ifcfg", "networkd", "keyfile", "none"):
            raise InvalidRequest(
                f"VIRTFLEET_NET_PERSIST must be auto, ifcfg, networkd, keyfile or none, not {persist!r}"
            )
        return cls(
            root=Path(env.get("VIRTFLEET_NET_ROOT") or "/"),
            persist=persist,
            proc=Path(env.get("VIRTFLEET_NET_PROC") or "/proc"),
        )


class NetworkModule:
    """Handlers for the ``net.*`` agent kinds and the network part of every host report."""

    def __init__(
        self,
        driver: LinkDriver,
        networks: NetworksPort | None,
        probe: Probe,
        *,
        settings: NetworkSettings = NetworkSettings(),
        state_dir: Path | None = None,
    ) -> None:
        self.settings = settings
        self.driver = driver
        self.networks = networks
        self.dns = resolv.ResolvConf(settings.root / "etc/resolv.conf")
        self.persister = Persister(settings.root, settings.persist)
        self._request_report: Callable[[], int] = lambda: 0
        self.changes = ChangeManager(
            Executor(driver, self.dns),
            probe,
            self.persister,
            state_dir,
            on_change=self._report,
        )

    def _report(self) -> None:
        self._request_report()

    # ------------------------------------------------------------------ AgentModule

    def register(self, table: HandlerTable, request_report: Callable[[], int]) -> None:
        """Serve the ``net.*`` commands (first restoring the network after an unfinished change)."""
        self._request_report = request_report
        recovered = self.changes.recover()
        if recovered is not None:
            log.warning("restored the network after an unfinished change: %s", recovered.reason)
        table.register(msgs.NET_LIST, self.list_networks)
        table.register(msgs.NET_DEFINE, self.define_network)
        table.register(msgs.NET_START, self.start_network)
        table.register(msgs.NET_STOP, self.stop_network)
        table.register(msgs.NET_AUTOSTART, self.autostart_network)
        table.register(msgs.NET_UNDEFINE, self.undefine_network)
        table.register(msgs.NET_IP_FORWARD, self.ip_forward)
        table.register(msgs.NET_HOST_FACTS, self.host_facts)
        table.register(msgs.NET_BRIDGE_CREATE, self.bridge_create)
        table.register(msgs.NET_BRIDGE_STP, self.bridge_stp)
        table.register(msgs.NET_BRIDGE_REMOVE, self.bridge_remove)
        table.register(msgs.NET_BOND_CREATE, self.bond_create)
        table.register(msgs.NET_BOND_ENSLAVE, self.bond_enslave)
        table.register(msgs.NET_BOND_REMOVE, self.bond_remove)
        table.register(msgs.NET_HOST_CONFIRM, self.confirm)
        table.register(msgs.NET_HOST_REVERT, self.revert)

    def enrich_report(self, report: HostReport) -> HostReport:
        return replace(report, network=self.facts())

    # ------------------------------------------------------------------ facts

    def _ip_forward_path(self) -> Path:
        return self.settings.proc / "sys/net/ipv4/ip_forward"

    def read_ip_forward(self) -> bool | None:
        try:
            return self._ip_forward_path().read_text().strip() == "1"
        except OSError:
            return None

    def facts(self) -> msgs.HostNetworkReport:
        """Everything the host report carries about networking; what cannot be read is listed in errors."""
        errors: list[str] = []
        try:
            facts = self.driver.facts()
        except VirtfleetError as exc:
            facts = msgs.HostNetworkReport()
            errors.append(exc.message)
        networks: tuple[msgs.LibvirtNetworkInfo, ...] = ()
        if self.networks is not None:
            try:
                networks = self.networks.list()
            except VirtfleetError as exc:
                errors.append(f"libvirt networks: {exc.message}")
        try:
            dns = resolv.nameservers(self.dns.read() or "")
        except VirtfleetError as exc:
            dns = ()
            errors.append(exc.message)
        return replace(
            facts,
            networks=networks,
            dns=dns,
            ipv4_forwarding=self.read_ip_forward(),
            persistence=self.persister.backend,
            last_rollback=self.changes.last_rollback,
            pending=self.changes.pending,
            errors=tuple(errors),
        )

    def host_facts(self, _body: msgs.HostNetShow) -> msgs.HostNetworkReport:
        return self.facts()

    # ------------------------------------------------------------------ libvirt networks

    def _libvirt(self) -> NetworksPort:
        if self.networks is None:
            raise NetworkConfigError("this agent has no libvirt connection for networks")
        return self.networks

    def list_networks(self, _body: msgs.NetworkListRequest) -> msgs.NetworkList:
        return msgs.NetworkList(self._libvirt().list())

    def define_network(self, body: msgs.DefineNetwork) -> msgs.NetworkResult:
        nets = self._libvirt()
        info, created = nets.define(body.spec)
        notes = ["defined" if created else "already defined"]
        if body.start and nets.start(body.spec.name):
            notes.append("started")
        if body.autostart and not info.autostart:
            nets.set_autostart(body.spec.name, True)
            notes.append("autostart on")
        self._request_report()
        return msgs.NetworkResult(nets.info(body.spec.name), ", ".join(notes))

    def start_network(self, body: msgs.NetworkRef) -> msgs.NetworkResult:
        nets = self._libvirt()
        started = nets.start(body.name)
        self._request_report()
        return msgs.NetworkResult(nets.info(body.name), "started" if started else "already active")

    def stop_network(self, body: msgs.NetworkRef) -> msgs.NetworkResult:
        nets = self._libvirt()
        stopped = nets.stop(body.name)
        self._request_report()
        return msgs.NetworkResult(nets.info(body.name), "stopped" if stopped else "already inactive")

    def autostart_network(self, body: msgs.NetworkAutostart) -> msgs.NetworkResult:
        nets = self._libvirt()
        nets.set_autostart(body.name, body.enabled)
        self._request_report()
        return msgs.NetworkResult(nets.info(body.name), f"autostart {'on' if body.enabled else 'off'}")

    def undefine_network(self, body: msgs.NetworkRef) -> msgs.NetworkResult:
        removed = self._libvirt().undefine(body.name)
        self._request_report()
        return msgs.NetworkResult(None, "undefined" if removed else "not defined (nothing to do)")

    def ip_forward(self, body: msgs.IpForwardRequest) -> msgs.IpForwardState:
        before = self.read_ip_forward()
        if before is None:
            raise NetworkConfigError(f"cannot read {self._ip_forward_path()}")
        if not body.enable:
            return msgs.IpForwardState(before, message="net.ipv4.ip_forward = " + ("1" if before else "0"))
        changed = False
        if not before:
            try:
                self._ip_forward_path().write_text("1\n")
            except OSError as exc:
                raise NetworkConfigError(f"cannot enable IPv4 forwarding: {exc.strerror or exc}") from None
            changed = True
        persisted = (self.persister.write_ip_forward(True),) if body.persist else ()
        self._request_report()
        return msgs.IpForwardState(
            bool(self.read_ip_forward()), changed, persisted, "enabled" if changed else "already enabled"
        )

    # ------------------------------------------------------------------ host changes

    def _change(
        self, body: HostChange, plan: Callable[[msgs.HostNetworkReport, str | None], planner.Plan]
    ) -> msgs.NetChangeResult:
        """Apply the steps ``plan`` makes as one transaction (see :mod:`agent.network.transaction`)."""
        return self.changes.run(body.change_id, body.options, plan)

    def bridge_create(self, body: msgs.BridgeCreate) -> msgs.NetChangeResult:
        return self._change(body, lambda facts, text: planner.plan_bridge_create(body, facts, text))

    def bridge_stp(self, body: msgs.BridgeStp) -> msgs.NetChangeResult:
        return self._change(body, lambda facts, _t: planner.plan_bridge_stp(body, facts))

    def bridge_remove(self, body: msgs.InterfaceRemove) -> msgs.NetChangeResult:
        return self._change(body, lambda facts, _t: planner.plan_remove(body, facts, "bridge"))

    def bond_create(self, body: msgs.BondCreate) -> msgs.NetChangeResult:
        return self._change(body, lambda facts, text: planner.plan_bond_create(body, facts, text))

    def bond_enslave(self, body: msgs.BondEnslave) -> msgs.NetChangeResult:
        return self._change(body, lambda facts, _t: planner.plan_bond_enslave(body, facts))

    def bond_remove(self, body: msgs.InterfaceRemove) -> msgs.NetChangeResult:
        return self._change(body, lambda facts, _t: planner.plan_remove(body, facts, "bond"))

    def confirm(self, body: msgs.ChangeRef) -> msgs.NetChangeResult:
        return self.changes.confirm(body.change_id)

    def revert(self, body: msgs.ChangeRef) -> msgs.NetChangeResult:
        return self.changes.revert(body.change_id)

    def close(self) -> None:
        self.changes.close()


def build_network_module(cfg: Any, conn: Any, env: Mapping[str, str] | None = None) -> NetworkModule:
    """The module for a real agent: netlink in the agent's own network namespace, libvirt
    networks over the agent's connection, the broker probe on the agent's AMQP URL."""
    from agent.network.libvirt_net import LibvirtNetworks  # noqa: PLC0415 - keeps libvirt out of pure imports
    from agent.network.netlink import NetlinkDriver  # noqa: PLC0415 - keeps pyroute2 out of pure imports
    from agent.network.probe import BrokerProbe  # noqa: PLC0415 - keeps pika out of pure imports

    if host_facts.is_test_uri(cfg.libvirt_uri):
        # A simulated host: its links live in memory and its files under its state directory.
        # Netlink here would change this machine's real interfaces, routes and bridges.
        return NetworkModule(
            simulated_links(),
            LibvirtNetworks(conn),
            BrokerProbe(cfg.amqp_url, f"agent-{cfg.host_id}-netprobe-{uuid.uuid4().hex[:6]}"),
            settings=simulated_settings(cfg.state_dir),
            state_dir=cfg.state_dir,
        )
    settings = NetworkSettings.from_env(os.environ if env is None else env)
    return NetworkModule(
        NetlinkDriver(),
        LibvirtNetworks(conn),
        BrokerProbe(cfg.amqp_url, f"agent-{cfg.host_id}-netprobe-{uuid.uuid4().hex[:6]}"),
        settings=settings,
        state_dir=cfg.state_dir,
    )


def simulated_links(
    nics: tuple[str, ...] = ("eth0", "eth1"),
    bridges: tuple[str, ...] = (),
    address: str = "192.0.2.10/24",
    gateway: str = "192.0.2.1",
) -> LinkDriver:
    """The in-memory links of a simulated host: ``nics`` (the first with ``address`` and a default
    route via ``gateway``) and ``bridges`` (the first with the second NIC as its port)."""
    from agent.network.fake import FakeLinkDriver  # noqa: PLC0415 - the simulation only

    ports = {bridges[0]: nics[1:2]} if bridges and len(nics) > 1 else {}
    return FakeLinkDriver.simple(nics=nics, bridges=bridges, ports=ports, address=address, gateway=gateway)


def simulated_settings(state_dir: Path, gateway: str = "192.0.2.1") -> NetworkSettings:
    """A simulated host's network files: a tree under ``state_dir/netroot`` shaped like the
    host's /etc and /proc (networkd persistence, resolv.conf, ip_forward)."""
    netroot = state_dir / "netroot"
    (netroot / "etc" / "systemd" / "network").mkdir(parents=True, exist_ok=True)
    resolv_conf = netroot / "etc" / "resolv.conf"
    if not resolv_conf.exists():
        resolv_conf.write_text(f"nameserver {gateway}\n", encoding="utf-8")
    forward = netroot / "proc" / "sys" / "net" / "ipv4" / "ip_forward"
    forward.parent.mkdir(parents=True, exist_ok=True)
    if not forward.exists():
        forward.write_text("0\n", encoding="utf-8")
    return NetworkSettings(root=netroot, persist="networkd", proc=netroot / "proc")
