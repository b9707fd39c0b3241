"""``virtfleet-agent``: wiring only (config, libvirt, journal, consumer, reporter, signals).

With ``--simulate N`` or ``--host ID=URI`` one process serves several hosts, each with its own
libvirt connection, through :class:`agent.multihost.MultiHostAgent`; otherwise :class:`Agent`
serves the one host of ``--host-id``, as described below.

One libvirt connection is opened and shared by every thread (see
:mod:`agent.drivers.libvirt_driver`). Commands arrive on ``virtfleet.agent.<host>`` through a
:class:`~common.transport.amqp.ConsumerServer`; a :class:`~common.transport.rpc.Dispatcher`
with the SQLite journal answers redelivered commands from the journal. SIGTERM/SIGINT stop
consuming, let in-flight commands finish and be acknowledged, send a last report, exit 0.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType
from typing import Any, Protocol

import libvirt

from agent import config as config_mod
from agent.config import AgentConfig, MultiHostConfig
from agent.drivers import host_facts
from agent.drivers.libvirt_driver import LibvirtHypervisor, open_connection, open_link
from agent.drivers.libvirt_link import LibvirtLink, LiveConnection
from agent.host_runtime import AgentModule, HostRuntime
from agent.multihost import HostParts, MultiHostAgent
from agent.network.module import build_network_module
from agent.ports import Hypervisor, Images
from agent.tuning.module import TuningModule
from common import credentials
from common.errors import VirtfleetError
from common.transport.factory import open_transport
from common.transport.port import Transport

log = logging.getLogger("agent")

#: Commands handled at once (also the prefetch): bounds concurrent libvirt work on one host.
CONCURRENCY = 4


def build_hypervisor(cfg: AgentConfig, conn: Any) -> LibvirtHypervisor:
    """The libvirt driver for ``conn``, with the simulation knobs of test:/// hosts applied."""
    simulated = host_facts.is_test_uri(cfg.libvirt_uri)
    hv = LibvirtHypervisor(
        conn,
        cfg.storage_pool,
        simulated=simulated,
        hw_virt=cfg.simulate_hw_virt if simulated else host_facts.detect_hw_virt(),
        pool_capacity_bytes=host_facts.read_node_file_pool_capacity(cfg.libvirt_uri, cfg.storage_pool)
        if simulated
        else None,
    )
    hv.ensure_pool(cfg.images_dir)
    return hv


class HostLibvirt:
    """A host's libvirt connection as the driver (``driver``) and the modules (``modules``) take
    it. A real host's is a LibvirtLink that reconnects after a libvirtd restart; the in-process
    test driver's (``test:///``) is a plain connection: reopening it would lose its state, and it
    cannot lose its connection anyway."""

    def __init__(self, uri: str) -> None:
        if host_facts.is_test_uri(uri):
            self._conn: Any = open_connection(uri)
            #: the reconnecting link of a real host (None for the test driver)
            self.link: LibvirtLink | None = None
            self.driver: Any = self._conn
            self.modules: Any = self._conn
        else:
            self.link = open_link(uri)
            self._conn = None
            self.driver = self.link
            self.modules = LiveConnection(self.link)

    def close(self) -> None:
        if self.link is not None:
            self.link.close()
        else:
            with contextlib.suppress(libvirt.libvirtError):
                self._conn.close()


def build_modules(cfg: AgentConfig, conn: Any) -> list[AgentModule]:
    """The agent modules for this host. Feature areas register here (one line each)."""
    return [TuningModule.for_host(cfg, conn), build_network_module(cfg, conn)]


class Agent:
    """The running agent of one host: its :class:`~agent.host_runtime.HostRuntime` (dispatcher,
    journal, reporter around the hypervisor) with a consumer and a reporting thread of its own.

    ``transport``: the fleet's broker (opened from ``cfg.amqp_url`` when not given); ``images``:
    the qemu-img port (QemuImg when not given).
    """

    def __init__(
        self,
        cfg: AgentConfig,
        hypervisor: Hypervisor,
        *,
        transport: Transport | None = None,
        modules: Sequence[AgentModule] = (),
        images: Images | None = None,
    ) -> None:
        self.cfg = cfg
        host = cfg.host_id
        self.transport = transport or open_transport(
            cfg.amqp_url, name=f"agent-{host}", max_message_bytes=cfg.max_message_bytes
        )
        self.runtime = HostRuntime(
            cfg, hypervisor, self.transport, alive=self._consumer_healthy, modules=modules, images=images
        )
        self.journal = self.runtime.journal
        self.reporter = self.runtime.reporter
        self.handlers = self.runtime.handlers
        self.dispatcher = self.runtime.dispatcher
        route = self.runtime.route()
        self.server = self.transport.consumer(
            route.queue,
            route.handler,
            name=f"agent-{host}",
            prefetch=CONCURRENCY,
            workers=CONCURRENCY,
        )

    def _consumer_healthy(self) -> bool:
        return self.server.healthy()

    def start(self) -> None:
        self.reporter.start()
        self.server.start()
        log.info(
            "agent %s started (libvirt %s, broker consumer %s)",
            self.cfg.host_id,
            self.cfg.libvirt_uri,
            self.server.name,
        )

    def stop(self, timeout: float = 60.0) -> None:
        """Stop consuming, finish and acknowledge in-flight commands, send a last report, close."""
        log.info("agent %s stopping", self.cfg.host_id)
        self.server.stop(timeout)
        self.reporter.stop(final_report=True, timeout=timeout)
        self.runtime.close()
        self.transport.close()
        log.info("agent %s stopped", self.cfg.host_id)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=config_mod.log_level_number(level),
        format="%(asctime)s %(levelname)-7s %(name)s [%(threadName)s] %(message)s",
    )
    logging.getLogger("pika").setLevel(logging.WARNING)


def _quiet_libvirt(_ctx: object, _err: object) -> None:
    """libvirt prints every error to stderr by default; ours are translated and logged instead."""


class _Served(Protocol):
    """What :func:`_serve` runs: an :class:`Agent` or a :class:`MultiHostAgent`."""

    def start(self) -> None: ...

    def stop(self) -> None: ...


def _serve(agent: _Served, stop: threading.Event, received: list[int]) -> None:
    """Start the agent; stop it on the first signal."""
    agent.start()
    while not stop.wait(1.0):
        pass
    log.info("received %s", ", ".join(signal.Signals(n).name for n in received))
    agent.stop()


def _run_one(cfg: AgentConfig, stop: threading.Event, received: list[int]) -> int:
    try:
        conn = HostLibvirt(cfg.libvirt_uri)
    except VirtfleetError as exc:
        log.error("cannot start: %s", exc.message)
        return 1
    try:
        try:
            agent = Agent(cfg, build_hypervisor(cfg, conn.driver), modules=build_modules(cfg, conn.modules))
        except VirtfleetError as exc:
            log.error("cannot start: %s", exc.message)
            return 1

        _serve(agent, stop, received)
    finally:
        conn.close()
    return 0


def _run_many(multi: MultiHostConfig, stop: threading.Event, received: list[int]) -> int:
    """Every host's own libvirt connection, driver and modules, served by one MultiHostAgent."""
    conns: list[HostLibvirt] = []
    try:
        hosts: list[HostParts] = []
        try:
            for cfg in multi.hosts:
                conn = HostLibvirt(cfg.libvirt_uri)
                conns.append(conn)
                hosts.append(
                    HostParts(cfg, build_hypervisor(cfg, conn.driver), build_modules(cfg, conn.modules))
                )
                if stop.is_set():
                    return 0
            agent = MultiHostAgent(hosts)
        except VirtfleetError as exc:
            log.error("cannot start host %s: %s", multi.hosts[len(hosts)].host_id, exc.message)
            return 1

        _serve(agent, stop, received)
    finally:
        for conn in conns:
            conn.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        cfg = config_mod.load_any(argv, os.environ)
    except VirtfleetError as exc:
        print(f"virtfleet-agent: error: {exc.message}", file=sys.stderr)
        return 2
    _setup_logging(cfg.log_level)
    for warning in credentials.argv_password_warnings(
        sys.argv[1:] if argv is None else argv, (credentials.AMQP_URL,)
    ):
        log.warning("%s", warning)
    libvirt.registerErrorHandler(_quiet_libvirt, None)

    stop = threading.Event()

    received: list[int] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)  # no logging here: the handler may interrupt a logging call
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    if isinstance(cfg, MultiHostConfig):
        return _run_many(cfg, stop, received)
    return _run_one(cfg, stop, received)


if __name__ == "__main__":
    sys.exit(main())
