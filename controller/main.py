"""``virtfleet-controller``: wiring only (config, database, transport, service, signals)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from common import credentials
from common.errors import VirtfleetError
from common.messages.audit import API_AUDIT_LIST
from common.messages.descriptor import Side
from common.signing import FleetKeys, SignatureCheck, Signer, body_host, check_reply
from common.transport.factory import open_transport
from common.transport.identity import identity_checks
from common.transport.port import Transport
from common.transport.rpc import HandlerTable
from common.transport.topology import API_QUEUE, API_READ_QUEUE, HEARTBEATS_QUEUE, REPORTS_QUEUE
from controller import broker_cli, keys_cli
from controller.access import Rate, RateLimiter, RoleCheck
from controller.agent_api import AgentClient, configured_cap
from controller.audit import AuditedApi
from controller.config import SECRET_SETTINGS, ControllerConfig, load_config
from controller.db.audit import AuditLog
from controller.db.engine import make_engine, migrate
from controller.endpoint import api_dispatcher, report_dispatcher
from controller.recovery import Recovery
from controller.request_journal import ApiJournal
from controller.service import ControllerService

if TYPE_CHECKING:
    from common.transport.memory import MemoryBroker

log = logging.getLogger("virtfleet.controller")

#: seconds a stopping controller gives the API requests in flight that do not wait on an agent
STOP_GRACE_S = 5.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="virtfleet-controller",
        description="The virtfleet controller. 'virtfleet-controller keys --help': the fleet's signing keys.",
    )
    parser.add_argument("--config", type=Path, help="TOML configuration file")
    parser.add_argument(
        "--amqp-url",
        help="broker URL, or a cluster's URLs comma-separated (env VIRTFLEET_AMQP_URL); with a password,"
        " prefer VIRTFLEET_AMQP_URL_FILE",
    )
    parser.add_argument(
        "--database-url",
        help="SQLAlchemy URL (env VIRTFLEET_DATABASE_URL); with a password, prefer VIRTFLEET_DATABASE_URL_FILE",
    )
    parser.add_argument(
        "--down-after", type=float, dest="down_after_s", help="seconds without heartbeat = down"
    )
    parser.add_argument("--workers", type=int, help="concurrent API requests")
    parser.add_argument("--strategy", choices=["spread", "pack"])
    parser.add_argument(
        "--master-key-file",
        help="the fleet master secret: sign commands, check reports (env VIRTFLEET_MASTER_KEY_FILE)",
    )
    parser.add_argument("--log-level", default=os.environ.get("VIRTFLEET_LOG_LEVEL", "INFO"))
    return parser.parse_args(argv)


class Controller:
    """A running controller: API server, report consumers and reconciler.

    ``memory``: the in-process broker a ``memory://`` URL names (in-process tests).
    """

    def __init__(
        self, config: ControllerConfig, name: str | None = None, *, memory: MemoryBroker | None = None
    ) -> None:
        self.config = config
        self.name = name or f"controller:{socket.gethostname()}:{os.getpid()}"
        #: checks every report's and heartbeat's signature (None: unsigned fleet)
        self.signatures: SignatureCheck | None = None
        signer: Signer | None = None
        keys: FleetKeys | None = None
        if config.master_key_file:
            keys = FleetKeys(Path(config.master_key_file), grace_s=config.key_grace_s)
            signer = Signer(keys)
            self.signatures = SignatureCheck(
                keys,
                body_host,  # a report must carry the key of the host it is about
                max_lifetime_s=config.max_message_lifetime_s,
                clock_skew_s=config.clock_skew_s,
            )
        else:
            log.warning("no master_key_file: agent commands are not signed and reports not checked")
        # The key file is checked first: a bad one stops the start before the database is touched.
        self.engine = make_engine(config.database_url)
        migrate(self.engine)
        # On the in-process broker the controller logs in as the configured controller login.
        self.transport: Transport = open_transport(
            config.amqp_url,
            name=self.name,
            memory=memory,
            memory_user=config.logins.controller,
            max_message_bytes=config.max_message_bytes,
        )
        agents = AgentClient(
            self.transport,
            self.name,
            cap=configured_cap(config.version_cap),
            sign=signer,
            check_reply=None
            if keys is None
            else lambda reply, host: check_reply(keys, reply, host, time.time()),
            # A wait on an agent ends when the fleet state declares its host down.
            down=lambda host, down: self.service.fleet.watch_down(host, down),  # noqa: PLW0108 (service made below)
        )
        self.agents = agents
        self.service = ControllerService(self.engine, config, agents)
        #: this instance's liveness record, the reconciler lease and the recovery passes
        self.recovery = Recovery(self.service, self.name, self.engine)
        #: answers redelivered and retried API requests (both lanes share it)
        self.journal = ApiJournal(self.service)
        self.audit = AuditLog(self.engine)
        access = config.access
        self._limiter = RateLimiter(
            Rate(access.rate_per_s, access.burst), Rate(access.read_rate_per_s, access.read_burst)
        )
        # Who a delivery is from (the broker login) is checked before anything else is.
        self._identity = identity_checks(config.logins, trust_broker_logins=config.trust_broker_logins)
        reports = report_dispatcher(
            self.service,
            self.name,
            [*self._identity, *([self.signatures] if self.signatures is not None else [])],
        )
        #: the reports and heartbeats dispatcher (its `refused` counts what identity and signature
        #: checks refused)
        self.report_dispatcher = reports
        self.api = self.transport.consumer(
            API_QUEUE,
            self._api_front(),
            name=f"{self.name}-api",
            prefetch=config.workers,
            workers=config.workers,
        )
        # Reads on their own lane and workers: they never queue behind creates waiting on agents.
        self.reads = self.transport.consumer(
            API_READ_QUEUE,
            self._api_front(),
            name=f"{self.name}-api-read",
            prefetch=8,
            workers=4,
        )
        self.reports = self.transport.consumer(
            REPORTS_QUEUE, reports, name=f"{self.name}-reports", prefetch=16, workers=2
        )
        self.heartbeats = self.transport.consumer(
            HEARTBEATS_QUEUE, reports, name=f"{self.name}-heartbeats", prefetch=64, workers=1
        )
        self._stop = threading.Event()
        self._reconciler = threading.Thread(target=self._reconcile_loop, name="reconciler", daemon=True)
        self._liveness = threading.Thread(target=self._liveness_loop, name="liveness", daemon=True)
        self._fleet_sync = threading.Thread(target=self._fleet_sync_loop, name="fleet-sync", daemon=True)

    def _api_front(self) -> AuditedApi:
        """An API lane's handler: rate limit, role check (admission), handler, audit record.

        Both lanes share the rate limiter, so a login's calls count once whichever lane serves them.
        """
        extra = HandlerTable(Side.CONTROLLER)
        extra.register(API_AUDIT_LIST, self.audit.list)
        roles = RoleCheck(self.config.access.roles)
        dispatcher = api_dispatcher(
            self.service, self.name, admit=[*self._identity, roles], extra=extra, journal=self.journal
        )
        return AuditedApi(dispatcher, self.audit.record, limit=self._limiter)

    def start(self) -> None:
        # Alive before it takes any request: no build or task of this instance is ever taken
        # for a dead controller's.
        self.recovery.register()
        self._liveness.start()
        self.audit.start()
        self.heartbeats.start()
        self.reports.start()
        self.api.start()
        self.reads.start()
        self._reconciler.start()
        self._fleet_sync.start()

    def wait_ready(self, timeout: float = 30.0) -> bool:
        return all(s.ready.wait(timeout) for s in (self.api, self.reads, self.reports, self.heartbeats))

    def _reconcile_loop(self) -> None:
        """At start, then every recovery_interval_s: the work of dead controllers; every
        reconcile_interval_s also the fleet-wide checks. Only in the lease holder (Recovery.step)."""
        config = self.config
        last_full: float | None = None
        while True:
            started = time.monotonic()
            full = last_full is None or started - last_full >= config.reconcile_interval_s
            try:
                for change in self.recovery.step(full=full):
                    log.info("reconcile: %s", change)
            except Exception:
                log.exception("reconciliation pass failed")
            if full:
                last_full = started
            if self._stop.wait(min(config.recovery_interval_s, config.reconcile_interval_s)):
                return

    def _liveness_loop(self) -> None:
        """This instance's heartbeat in the database (and the lease's renewal), every
        instance_heartbeat_s; a failed beat is retried at the next one."""
        while not self._stop.wait(self.config.instance_heartbeat_s):
            try:
                self.recovery.heartbeat()
            except Exception:
                log.exception("liveness heartbeat failed (retried next interval)")

    def _fleet_sync_loop(self) -> None:
        """Write batched heartbeats and read other controllers' changes, every fleet_sync_s."""
        while not self._stop.wait(self.config.fleet_sync_s):
            self._sync_fleet()

    def _sync_fleet(self) -> None:
        # First, and from memory alone: the waits on hosts now down end even when the database
        # cannot be reached.
        self.service.fleet.sweep(self.service.clock())
        try:
            self.service.fleet.flush_heartbeats()
            self.service.fleet.sync(self.service.clock())
        except Exception:
            log.exception("fleet sync failed (retried next interval)")

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """Stop in about ``grace_s`` seconds, even when agents never answer.

        The API lanes stop taking deliveries; every call waiting on an agent (and any started
        after this) ends with Interrupted, whose API request is handed back to its queue
        unanswered (not acknowledged) for the next controller; what does not need an agent gets
        ``grace_s`` to finish and be answered. Then the reports, the fleet sync and the audit
        log stop, and the connections close.
        """
        self._stop.set()
        lanes = [
            threading.Thread(target=lane.stop, kwargs={"timeout": grace_s}, name=f"stop-{lane.name}")
            for lane in (self.api, self.reads)
        ]
        for lane in lanes:
            lane.start()
        # After the lanes were told to stop: a request taken meanwhile is handed back at once.
        self.journal.interrupt()
        waiting = self.agents.interrupt()
        if waiting:
            log.info("stopping: %d call(s) waiting on agents given up; their requests go back", waiting)
        for lane in lanes:
            lane.join()
        self.reports.stop()
        self.heartbeats.stop()
        self._fleet_sync.join(timeout=10)
        self.service.fleet.flush_heartbeats()  # the last beats, so the next controller sees them
        self.audit.stop()  # every call answered is in the audit log
        self.service.close()
        self._reconciler.join(timeout=10)
        self._liveness.join(timeout=10)
        try:  # what is left is recovered by another controller at once, not after the expiry
            self.recovery.resign()
        except Exception:
            log.exception("could not remove this instance's liveness record (it expires)")
        self.transport.close()
        self.engine.dispose()


def main(argv: list[str] | None = None) -> int:
    given = sys.argv[1:] if argv is None else argv
    if given[:1] == ["keys"]:
        return keys_cli.main(given[1:])  # key management on the controller's host (no service started)
    if given[:1] == ["broker"]:
        return broker_cli.main(given[1:])  # broker maintenance: the quorum migration (no service started)
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("pika").setLevel(logging.WARNING)
    for warning in credentials.argv_password_warnings(
        sys.argv[1:] if argv is None else argv, SECRET_SETTINGS
    ):
        log.warning("%s", warning)
    try:
        config = load_config(
            args.config,
            overrides={
                "amqp_url": args.amqp_url,
                "database_url": args.database_url,
                "down_after_s": args.down_after_s,
                "workers": args.workers,
                "strategy": args.strategy,
                "master_key_file": args.master_key_file,
            },
        )
        controller = Controller(config)
    except VirtfleetError as exc:
        log.error("cannot start: %s", exc.message)
        return 2
    stopping = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s; stopping", signal.Signals(signum).name)
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    controller.start()
    if controller.wait_ready():
        log.info(
            "controller %s ready (database %s)", controller.name, controller.engine.url.render_as_string()
        )
    while not stopping.wait(1.0):
        pass
    controller.stop()
    log.info("controller stopped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
