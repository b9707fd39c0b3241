"""The in-process tier: a controller, N agents and the CLI in one test process.

Real code on both sides of the bus -- the controller's :class:`~controller.main.Controller` wiring,
each agent's :class:`~agent.main.Agent` with its handlers, journal, reporter and the tuning and
network modules -- over the in-memory broker (:mod:`common.transport.memory`, the same semantics
as RabbitMQ: see tests/contract) and the shipped fakes of every host port (:mod:`agent.fakehost`).
The database is a SQLite file, or PostgreSQL when ``VIRTFLEET_DATABASE_URL`` says so. The CLI runs
as a user runs it (``controller.cli.app.main`` with argv, exit code, stdout, stderr), only its
broker is the in-memory one. No broker, root, libvirtd or QEMU is needed.

:class:`InProcessFleet` offers the same ``cli`` as the process fleet of tests/vfsupport.py, and what
:class:`vfsupport.CliFleet` builds on it for both (``cli_ok``, ``hosts``, ``wait_hosts``,
``resources``...), plus direct access to each host's fakes for setting up what an operator would
have prepared by hand (an image file, a foreign domain) and for faults.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from vfsupport import DOWN_AFTER_S, NODES, CliFleet, CliResult, enrolled_key, fleet_master, fresh_database

from agent.fakehost import FakeHost, build_fake_host
from agent.main import Agent
from common.messages.descriptor import Role
from common.signing import HostKeyring, Signer
from common.transport.memory import MemoryBroker
from controller.cli.app import main as cli_main
from controller.cli.runner import Environment
from controller.config import AccessConfig, ControllerConfig
from controller.main import Controller

log = logging.getLogger(__name__)

#: The broker login of the CLI in this tier (the controller logs in as ``controller``, each agent as
#: ``agent-<host>``, as in a deployment).
HARNESS_LOGIN = "operator"
#: The test fleet's access settings: its one login is an admin, and no call is rate limited.
HARNESS_ACCESS = AccessConfig(roles={HARNESS_LOGIN: Role.ADMIN}, rate_per_s=0.0)

#: The URL the CLI is given: ``memory://`` URLs name an in-process broker (handed in, not looked up).
BROKER_URL = "memory://fleet"


@dataclass(frozen=True)
class HostShape:
    """One simulated host: a node file of tests/fixtures/nodes and the agent's CPU sets."""

    node: str = "small"
    dedicated_cpus: str | None = None
    shared_cpus: str | None = None
    reserved_cpus: str | None = None
    hw_virt: bool = True


@dataclass
class RunningHost:
    """A host of the fleet: its fakes and, while it runs, its agent."""

    name: str
    fake: FakeHost
    agent: Agent | None = None


@dataclass
class InProcessFleet(CliFleet):
    """A controller, agents and the CLI in this process (see the module docstring)."""

    hosts_timeout: ClassVar[float] = 30

    tmp: Path
    database_url: str
    broker: MemoryBroker = field(default_factory=MemoryBroker)
    down_after_s: float = DOWN_AFTER_S
    heartbeat_interval: float = 0.5
    report_interval: float = 5.0
    controller: Controller | None = None
    hosts_by_name: dict[str, RunningHost] = field(default_factory=dict)
    #: commands and reports signed (the master file in ``tmp``, a key file per host)
    signed: bool = True

    def key_file(self, name: str) -> Path:
        """Host ``name``'s key file, enrolled (again) from the fleet's master file."""
        return enrolled_key(self.tmp, name)

    def signer(self, name: str) -> Signer | None:
        """Signs what host ``name``'s agent would send (None on an unsigned fleet)."""
        return Signer(HostKeyring(self.key_file(name), name)) if self.signed else None

    # ------------------------------------------------------------------ processes
    def start_controller(self, **overrides: Any) -> Controller:
        """The controller; unless ``access`` is given, the CLI's login (``guest``) is an admin and
        calls are not rate limited."""
        config = ControllerConfig(
            **{
                "amqp_url": BROKER_URL,
                "database_url": self.database_url,
                "down_after_s": self.down_after_s,
                "workers": 8,
                "access": HARNESS_ACCESS,
                "master_key_file": str(fleet_master(self.tmp)) if self.signed else "",
                **overrides,
            }
        )
        self.controller = Controller(config, name="controller", memory=self.broker)
        self.controller.start()
        assert self.controller.wait_ready(30), "the controller's consumers did not start"
        return self.controller

    def add_host(self, name: str, shape: HostShape) -> RunningHost:
        fake = build_fake_host(
            self.tmp / f"agent-{name}",
            host_id=name,
            node_xml=NODES / f"{shape.node}.xml",
            hw_virt=shape.hw_virt,
            dedicated_cpus=shape.dedicated_cpus,
            shared_cpus=shape.shared_cpus,
            reserved_cpus=shape.reserved_cpus,
            amqp_url=BROKER_URL,
        )
        fake.config = dataclasses.replace(
            fake.config,
            heartbeat_interval=self.heartbeat_interval,
            report_interval=self.report_interval,
            key_file=self.key_file(name) if self.signed else None,
        )
        host = RunningHost(name, fake)
        self.hosts_by_name[name] = host
        self.start_agent(name)
        return host

    def start_agent(self, name: str) -> Agent:
        host = self.hosts_by_name[name]
        assert host.agent is None, f"the agent of {name} runs already"
        host.agent = host.fake.agent(self.broker.transport(f"agent-{name}", user=f"agent-{name}"))
        host.agent.start()
        return host.agent

    def stop_agent(self, name: str) -> None:
        """Stop an agent as SIGTERM does (finish, acknowledge, last report)."""
        host = self.hosts_by_name[name]
        if host.agent is not None:
            host.agent.stop(timeout=10)
            host.agent = None

    def kill_agent(self, name: str) -> None:
        """An agent dies at once: its connections drop, unacknowledged commands go back to the queue,
        no last report, no more heartbeats."""
        host = self.hosts_by_name[name]
        agent, host.agent = host.agent, None
        if agent is None:
            return
        self.broker.kill_connections(f"agent-{name}")
        agent.reporter.stop(final_report=False, timeout=10)
        agent.server.stop(timeout=1)
        agent.runtime.close()  # the journal, and the dead reporter's watch of lifecycle events

    def fake(self, name: str) -> FakeHost:
        """The fakes of a host (its hypervisor, images, links...)."""
        return self.hosts_by_name[name].fake

    def stop_all(self) -> None:
        for name in list(self.hosts_by_name):
            with contextlib.suppress(Exception):
                self.stop_agent(name)
            self.hosts_by_name[name].fake.close()
        if self.controller is not None:
            self.controller.stop()
            self.controller = None

    # ------------------------------------------------------------------ the CLI, as a user runs it
    def cli(
        self,
        *args: str,
        output: str = "json",
        timeout: float | None = None,
        stdin: str = "",
        tty: bool = False,
        login: str = HARNESS_LOGIN,
    ) -> CliResult:
        """``virtfleet --output OUTPUT ARGS...``: exit code, stdout and stderr.

        Each call has its own stdin (``stdin``, a terminal when ``tty``), stdout and stderr, so
        calls from several threads at once do not mix. ``login``: the broker login it connects as.
        """
        argv = ["--output", output, "--amqp-url", BROKER_URL]
        if timeout is not None:
            argv += ["--timeout", str(timeout)]
        out, err = io.StringIO(), io.StringIO()
        env = Environment(
            connect=lambda _url: self.broker.transport("cli", user=login),
            stdin=_Input(stdin, tty),
            stdout=out,
            stderr=err,
            width=200,
        )
        code = 0
        try:
            cli_main([*argv, *args], env=env)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        return CliResult(code, out.getvalue(), err.getvalue())


class _Input(io.StringIO):
    """What a person would type; a terminal or not."""

    def __init__(self, text: str, tty: bool) -> None:
        super().__init__(text)
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


@contextlib.contextmanager
def inprocess_fleet(
    tmp: Path,
    hosts: Mapping[str, HostShape],
    *,
    down_after_s: float = DOWN_AFTER_S,
    report_interval: float = InProcessFleet.report_interval,
    **controller_overrides: Any,
) -> Iterator[InProcessFleet]:
    """A started fleet of ``hosts`` (all up, full reports every ``report_interval``), stopped on the
    way out."""
    with fresh_database(tmp) as db:
        fleet = InProcessFleet(tmp, db, down_after_s=down_after_s, report_interval=report_interval)
        try:
            fleet.start_controller(**controller_overrides)
            for name, shape in hosts.items():
                fleet.add_host(name, shape)
            fleet.wait_hosts(set(hosts))
            yield fleet
        finally:
            fleet.stop_all()


def database_is_postgres() -> bool:
    return os.environ.get("VIRTFLEET_DATABASE_URL", "").startswith("postgres")
