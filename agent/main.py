"""``virtfleet-agent``: wiring only (config, libvirt, journal, consumer, reporter, signals).

One libvirt connection is opened and shared by every thread (see
:mod:`agent.drivers.libvirt_driver`). Commands arrive on ``virtfleet.agent.<host>`` through a
:class:`~common.transport.amqp.ConsumerServer`; a :class:`~common.transport.rpc.Dispatcher`
with the SQLite journal answers redelivered commands from the journal. SIGTERM/SIGINT stop
consuming, let in-flight commands finish and be acknowledged, send a last report, exit 0.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any, Protocol

import libvirt

from agent import config as config_mod
from agent.config import AgentConfig
from agent.drivers import host_facts
from agent.drivers.libvirt_driver import LibvirtHypervisor, open_connection
from agent.handlers import AgentHandlers
from agent.journal import SqliteJournal
from agent.network.module import build_network_module
from agent.ports import Hypervisor, Images
from agent.reporter import Reporter, TransportReportSink
from agent.tuning.module import TuningModule
from common.errors import VirtfleetError
from common.messages.descriptor import Side
from common.messages.host import HostReport
from common.transport.factory import open_transport
from common.transport.port import Transport
from common.transport.rpc import Dispatcher, HandlerTable
from common.transport.topology import agent_queue

log = logging.getLogger("agent")

#: Commands handled at once (also the prefetch): bounds concurrent libvirt work on one host.
CONCURRENCY = 4


def agent_version() -> str:
    try:
        return importlib.metadata.version("virtfleet")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0"


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


class AgentModule(Protocol):
    """A feature area of the agent beyond VM lifecycle (host networking, tuning): its command
    handlers and the facts it adds to every host report."""

    def register(self, table: HandlerTable, request_report: Callable[[], int]) -> None: ...

    def enrich_report(self, report: HostReport) -> HostReport: ...


def build_modules(cfg: AgentConfig, conn: Any) -> list[AgentModule]:
    """The agent modules for this host. Feature areas register here (one line each)."""
    return [TuningModule.for_host(cfg, conn), build_network_module(cfg, conn)]


class Agent:
    """The running agent: consumer + dispatcher + journal + reporter around one hypervisor.

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
        sender = f"agent:{host}"
        self.transport = transport or open_transport(cfg.amqp_url, name=f"agent-{host}")
        cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.journal = SqliteJournal(cfg.state_dir / "journal.db")
        self.reporter = Reporter(
            host,
            cfg.libvirt_uri,
            hypervisor,
            TransportReportSink(self.transport, host, sender),
            report_interval=cfg.report_interval,
            heartbeat_interval=cfg.heartbeat_interval,
            agent_version=agent_version(),
            alive=self._consumer_healthy,
            enrichers=[m.enrich_report for m in modules],
        )
        self.handlers = AgentHandlers(hypervisor, self.reporter.request_report, images)
        table = HandlerTable(Side.AGENT)
        self.handlers.register(table)
        for module in modules:
            module.register(table, self.reporter.request_report)
        self.dispatcher = Dispatcher(sender, table, journal=self.journal)
        self.server = self.transport.consumer(
            agent_queue(host),
            self.dispatcher,
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
        self.journal.close()
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


def main(argv: Sequence[str] | None = None) -> int:
    try:
        cfg = config_mod.load(argv, os.environ)
    except VirtfleetError as exc:
        print(f"virtfleet-agent: error: {exc.message}", file=sys.stderr)
        return 2
    _setup_logging(cfg.log_level)
    libvirt.registerErrorHandler(_quiet_libvirt, None)

    stop = threading.Event()

    received: list[int] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)  # no logging here: the handler may interrupt a logging call
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    try:
        conn = open_connection(cfg.libvirt_uri)
    except VirtfleetError as exc:
        log.error("cannot start: %s", exc.message)
        return 1
    try:
        try:
            agent = Agent(cfg, build_hypervisor(cfg, conn), modules=build_modules(cfg, conn))
        except VirtfleetError as exc:
            log.error("cannot start: %s", exc.message)
            return 1
        agent.start()
        while not stop.wait(1.0):
            pass
        log.info("received %s", ", ".join(signal.Signals(n).name for n in received))
        agent.stop()
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
