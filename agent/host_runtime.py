"""Everything the agent keeps for one host, apart from how it consumes and when it reports.

A :class:`HostRuntime` is one host's journal, reporter, handlers and dispatcher around its
hypervisor. :class:`agent.main.Agent` wraps one with its own consumer and reporting thread
(a host per process); :class:`agent.multihost.MultiHostAgent` puts many on one consumer of all
their queues and one reporting thread (a simulated fleet in one process).
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from agent.config import AgentConfig
from agent.handlers import AgentHandlers
from agent.host_storage import HostStorage
from agent.journal import SqliteJournal
from agent.ports import Hypervisor, Images
from agent.reporter import Reporter, TransportReportSink
from common.messages.descriptor import Side
from common.messages.host import HostReport
from common.messages.vm import VmResult, VmStatus
from common.signing import HostKeyring, SignatureCheck, Signer
from common.transport.identity import Logins, identity_checks
from common.transport.port import Delivery, Outcome, Route, Transport
from common.transport.rpc import Admission, Dispatcher, HandlerTable
from common.transport.topology import agent_queue

log = logging.getLogger("agent")


def agent_version() -> str:
    """The installed virtfleet version, reported by every host."""
    try:
        return importlib.metadata.version("virtfleet")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0"


class AgentModule(Protocol):
    """A feature area of the agent beyond VM lifecycle (host networking, tuning): its command
    handlers and the facts it adds to every host report."""

    def register(self, table: HandlerTable, request_report: Callable[[], int]) -> None: ...

    def enrich_report(self, report: HostReport) -> HostReport: ...


def telling(table: HandlerTable, told: Callable[[VmStatus], None]) -> HandlerTable:
    """``table`` with each handler that answers a :class:`~common.messages.vm.VmResult` also
    passing its status to ``told`` (the reporter's :meth:`~agent.reporter.Reporter.vm_told`), so
    that the delta after the command does not repeat what the reply says."""
    out = HandlerTable(table.side)
    for op in table.ops():
        entry = table.get(op.kind)
        assert entry is not None  # listed by ops()
        out.register(op, _telling_handler(entry[1], told))
    return out


def _telling_handler(handler: Callable[[Any], Any], told: Callable[[VmStatus], None]) -> Callable[[Any], Any]:
    def handle(body: Any) -> Any:
        result = handler(body)
        if isinstance(result, VmResult) and result.status is not None:
            told(result.status)
        return result

    return handle


class HostRuntime:
    """One host's journal (in ``cfg.state_dir``), reporter, handlers and dispatcher.

    ``transport`` carries its reports; ``alive`` tells the reporter whether the host's commands
    are being consumed (no heartbeat otherwise). Nothing runs until the owner starts a consumer
    of :meth:`route` and drives :attr:`reporter`.
    """

    def __init__(
        self,
        cfg: AgentConfig,
        hypervisor: Hypervisor,
        transport: Transport,
        *,
        alive: Callable[[], bool],
        modules: Sequence[AgentModule] = (),
        images: Images | None = None,
        version: str | None = None,
    ) -> None:
        self.cfg = cfg
        host = cfg.host_id
        sender = f"agent:{host}"
        cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.journal = SqliteJournal(cfg.state_dir / "journal.db")
        #: checks the controller's signature on every command (None: unsigned fleet)
        self.signatures: SignatureCheck | None = None
        signer: Signer | None = None
        self._signer: Signer | None = None
        if cfg.key_file is not None:
            keyring = HostKeyring(cfg.key_file, host)
            signer = self._signer = Signer(keyring)
            self.signatures = SignatureCheck(
                keyring,
                lambda _env: host,  # a command to this host must carry this host's key
                max_lifetime_s=cfg.max_message_lifetime,
                clock_skew_s=cfg.clock_skew,
                answered=self.journal.get,
                wait_answer=self.journal.wait_for,
            )
        else:
            log.warning("host %s: no key_file: commands are not checked and reports not signed", host)
        self.reporter = Reporter(
            host,
            cfg.libvirt_uri,
            hypervisor,
            TransportReportSink(transport, host, sender, sign=signer),
            report_interval=cfg.report_interval,
            heartbeat_interval=cfg.heartbeat_interval,
            agent_version=version or agent_version(),
            alive=alive,
            enrichers=[m.enrich_report for m in modules],
        )
        storage = HostStorage.for_host(
            hypervisor,
            cfg.pools,
            cfg.allowed_devices,
            default=cfg.storage_pool,
            formats_file=cfg.state_dir / "image-formats.db",
        )
        self.handlers = AgentHandlers(
            hypervisor,
            self.reporter.request_report,
            images,
            vm_changed=self.reporter.vm_changed,
            storage=storage,
        )
        table = HandlerTable(Side.AGENT)
        self.handlers.register(table)
        for module in modules:
            # Host-level changes (networks, bridges, hugepages, tuning profiles) change facts only
            # the full report carries: those modules still ask for one.
            module.register(table, self.reporter.request_report)
        table = telling(table, self.reporter.vm_told)
        # Commands only from the controller's broker login, then a valid signature (both before
        # the journal).
        admit: list[Admission] = identity_checks(
            Logins(controller=cfg.controller_login), trust_broker_logins=cfg.trust_broker_logins
        )
        if self.signatures is not None:
            admit.append(self.signatures)
        self.dispatcher = Dispatcher(sender, table, journal=self.journal, admit=admit)
        #: VMs changed outside virtfleet reach the controller in deltas too, where the driver
        #: emits lifecycle events (None: they wait for the next full report)
        self._unwatch = hypervisor.watch_lifecycle(self.reporter.vm_changed)
        #: libvirt lost (libvirtd restarted) or back: a degraded report now, a full one after the
        #: reconnect (the driver re-registers the lifecycle events first)
        self._unwatch_connection = hypervisor.watch_connection(self.reporter.hypervisor_changed)

    @property
    def host_id(self) -> str:
        return self.cfg.host_id

    def route(self) -> Route:
        """The host's command queue and the dispatcher that answers it (its replies signed with
        the host's key on a signed fleet)."""
        return Route(agent_queue(self.cfg.host_id), self.serve)

    def serve(self, delivery: Delivery) -> Outcome:
        """One command through the dispatcher; the reply signed (also one answered from the journal,
        which keeps the unsigned reply: a signature is made for each sending)."""
        outcome = self.dispatcher(delivery)
        if self._signer is None or outcome.reply is None:
            return outcome
        return Outcome(self._signer(outcome.reply, self.cfg.host_id), outcome.dead_letter)

    def close(self) -> None:
        """Stop watching lifecycle events and close the journal and the image format record
        (after the consumer stopped and the final report went out)."""
        if self._unwatch is not None:
            self._unwatch()
            self._unwatch = None
        if self._unwatch_connection is not None:
            self._unwatch_connection()
            self._unwatch_connection = None
        self.journal.close()
        self.handlers.storage.formats.close()


__all__ = ["AgentModule", "HostRuntime", "agent_version", "telling"]
