"""Test support: real brokers (a private vhost each), real databases, real processes.

Every fleet a test starts gets its own RabbitMQ vhost, so queues such as ``virtfleet.api``
never mix between tests, and its own database (a SQLite file, or a fresh PostgreSQL
database when ``VIRTFLEET_DATABASE_URL`` points at PostgreSQL).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar
from urllib.parse import quote, unquote, urlsplit

import sqlalchemy as sa

from common.signing import (
    DEFAULT_GRACE_S,
    host_keys_of,
    init_master,
    parse_master,
    read_secret_file,
    write_secret_file,
)
from common.transport.amqp import AmqpTransport
from common.transport.topology import API_QUEUE

REPO = Path(__file__).resolve().parents[1]
#: How long a test fleet's controller waits for a live host's heartbeat before calling it down. Long:
#: under CPU load (and on PostgreSQL, where a heartbeat's UPDATE waits behind claims' row locks)
#: a live agent's recorded heartbeat has been seen to age 7-18 s. A test that needs a host to go
#: down starts its own fleet with a short value (and expects nothing else of that fleet's timing).
DOWN_AFTER_S = 60.0
#: The short down-after of fleets whose tests kill an agent.
SHORT_DOWN_AFTER_S = 10.0
BIN = Path(sys.executable).parent
NODES = REPO / "tests" / "fixtures" / "nodes"

T = TypeVar("T")
BROKER_HOST, BROKER_PORT = "127.0.0.1", 5672


def broker_reachable() -> bool:
    with contextlib.suppress(OSError), socket.create_connection((BROKER_HOST, BROKER_PORT), timeout=2):
        return True
    return False


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


@contextlib.contextmanager
def private_vhost(prefix: str = "vftest") -> Iterator[str]:
    """A fresh vhost with full rights for guest; yields its AMQP URL; deleted afterwards."""
    name = f"{prefix}-{uuid.uuid4().hex[:10]}"
    _rabbitmqctl("add_vhost", name)
    try:
        _rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        yield f"amqp://guest:guest@{BROKER_HOST}:{BROKER_PORT}/{quote(name, safe='')}"
    finally:
        _rabbitmqctl("delete_vhost", name)


@contextlib.contextmanager
def broker_login(vhost_url: str, prefix: str = "vfuser") -> Iterator[tuple[str, str]]:
    """A new broker user with full rights on ``vhost_url``'s vhost: yields (login, its AMQP URL);
    deleted afterwards."""
    login = f"{prefix}-{uuid.uuid4().hex[:10]}"
    password = uuid.uuid4().hex
    vhost = unquote(urlsplit(vhost_url).path[1:]) or "/"
    _rabbitmqctl("add_user", login, password)
    try:
        _rabbitmqctl("set_permissions", "-p", vhost, login, ".*", ".*", ".*")
        yield login, f"amqp://{login}:{password}@{BROKER_HOST}:{BROKER_PORT}/{quote(vhost, safe='')}"
    finally:
        _rabbitmqctl("delete_user", login)


def fleet_master(tmp: Path) -> Path:
    """The fleet master file of a test fleet in ``tmp`` (created on first use, mode 0600)."""
    path = tmp / "master.key"
    if not path.exists():
        init_master(path, time.time())
    return path


def enrolled_key(tmp: Path, host_id: str) -> Path:
    """Host ``host_id``'s key file, enrolled (again) from ``tmp``'s master file, as
    ``virtfleet-controller keys enroll --force`` writes it."""
    master_path = fleet_master(tmp)
    path = tmp / "keys" / f"{host_id}.key"
    path.parent.mkdir(mode=0o700, exist_ok=True)
    master = parse_master(read_secret_file(master_path)[0], master_path)
    write_secret_file(
        path, host_keys_of(master, host_id, time.time(), DEFAULT_GRACE_S).to_text(), overwrite=True
    )
    return path


def database_backend() -> str:
    url = os.environ.get("VIRTFLEET_DATABASE_URL", "")
    return "postgresql" if url.startswith("postgres") else "sqlite"


@contextlib.contextmanager
def fresh_database(tmp: Path) -> Iterator[str]:
    """A new empty database URL: a file in ``tmp``, or a new PostgreSQL database."""
    base = os.environ.get("VIRTFLEET_DATABASE_URL", "")
    if not base.startswith("postgres"):
        yield f"sqlite:///{tmp / 'virtfleet.db'}"
        return
    admin_url = sa.engine.make_url(base).set(drivername="postgresql+psycopg")
    name = f"vftest_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(admin_url.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin_url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on now (the kernel's pick, just freed): for private
    brokers, databases and the dead addresses of failover tests."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_until(predicate: Callable[[], T | None], timeout: float, what: str, interval: float = 0.2) -> T:
    """Poll ``predicate`` until it returns something truthy (which it returns); fail the test with
    ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value: {last!r}")


@dataclass
class Proc:
    """A daemon started by a test, with its log kept for failure messages."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    def log(self, tail: int = 60) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-tail:])

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 20.0) -> int:
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                return self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
                raise AssertionError(f"{self.name} ignored SIGTERM for {timeout}s:\n{self.log()}") from None
        return int(self.popen.returncode)

    def kill(self) -> None:
        if self.alive():
            self.popen.kill()
            self.popen.wait()


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str

    @property
    def json(self) -> Any:
        return json.loads(self.stdout)


class CliFleet:
    """What a fleet offers on top of its ``cli``, the same for the fleet of processes here and the
    in-process one (tests/inproc.py): the CLI's JSON, the hosts and their resources as it shows them."""

    #: How long :meth:`wait_hosts` waits unless told.
    hosts_timeout: ClassVar[float] = 60

    def cli(self, *args: str, output: str = "json") -> CliResult:
        """``virtfleet --output OUTPUT ARGS...`` as a user runs it."""
        raise NotImplementedError

    def cli_ok(self, *args: str) -> Any:
        result = self.cli(*args)
        assert result.code == 0, (
            f"virtfleet {' '.join(args)} failed ({result.code}): {result.stdout}{result.stderr}"
        )
        return result.json

    def hosts(self) -> dict[str, Any]:
        result = self.cli("host", "list")
        if result.code != 0:
            return {}
        return {h["host_id"]: h for h in result.json["hosts"]}

    def wait_hosts(self, ids: set[str], status: str = "up", timeout: float | None = None) -> None:
        wait_until(
            lambda: all(self.hosts().get(i, {}).get("status") == status for i in ids),
            self.hosts_timeout if timeout is None else timeout,
            f"hosts {sorted(ids)} to be {status}",
        )

    def resources(self, host: str) -> dict[str, dict[str, Any]]:
        """The rows of ``host show HOST``'s resources by resource class (``MEMORY_MIB``...)."""
        return {r["resource"]: r for r in self.cli_ok("host", "show", host)["resources"]}

    def used(self, host: str) -> dict[str, int]:
        return {name: row["used"] for name, row in self.resources(host).items()}

    def free(self, host: str) -> dict[str, int]:
        return {name: row["free"] for name, row in self.resources(host).items()}


@dataclass
class Fleet(CliFleet):
    """A controller, agents and the CLI against one private vhost and database."""

    tmp: Path
    amqp_url: str
    database_url: str
    procs: list[Proc] = field(default_factory=list)
    #: commands and reports signed: the controller gets the master file of ``tmp``, each agent
    #: its host's key file (through the environment, so another release's agent ignores it)
    signed: bool = True

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("VIRTFLEET_")}
        env["VIRTFLEET_AMQP_URL"] = self.amqp_url
        # The test fleets' one broker login is an admin; calls are not rate limited.
        env["VIRTFLEET_ACCESS_ROLES"] = "guest=admin"
        env["VIRTFLEET_ACCESS_RATE_PER_S"] = "0"
        # Every party logs in as guest here: the documented development mode (docs/security.md);
        # tests/security runs a fleet with the bootstrapped users and the checks on.
        env["VIRTFLEET_TRUST_BROKER_LOGINS"] = "false"
        env["PYTHONUNBUFFERED"] = "1"
        if self.signed:
            env["VIRTFLEET_MASTER_KEY_FILE"] = str(fleet_master(self.tmp))
        return env

    def _spawn(self, name: str, argv: list[str], env: Mapping[str, str] | None = None) -> Proc:
        log_path = self.tmp / f"{name}.log"
        handle = log_path.open("wb")
        popen = subprocess.Popen(
            argv, stdout=handle, stderr=subprocess.STDOUT, env={**self._env(), **(env or {})}, cwd=self.tmp
        )
        handle.close()
        proc = Proc(name, popen, log_path)
        self.procs.append(proc)
        return proc

    def start_controller(
        self,
        name: str = "controller",
        *extra: str,
        down_after: float = DOWN_AFTER_S,
        env: Mapping[str, str] | None = None,
    ) -> Proc:
        return self._spawn(
            name,
            [
                str(BIN / "virtfleet-controller"),
                "--database-url",
                self.database_url,
                "--down-after",
                str(down_after),
                "--log-level",
                "INFO",
                *extra,
            ],
            env,
        )

    def start_agent(
        self,
        host_id: str,
        uri: str,
        *extra: str,
        heartbeat: float = 1.0,
        command: Sequence[str] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> Proc:
        """An agent process; ``command`` replaces ``virtfleet-agent`` (e.g. another release's code)."""
        state = self.tmp / f"agent-{host_id}"
        state.mkdir(exist_ok=True)
        if self.signed:
            env = {"VIRTFLEET_AGENT_KEY_FILE": str(enrolled_key(self.tmp, host_id)), **(env or {})}
        return self._spawn(
            f"agent-{host_id}",
            [
                *(command or [str(BIN / "virtfleet-agent")]),
                "--host-id",
                host_id,
                "--libvirt-uri",
                uri,
                "--state-dir",
                str(state),
                "--heartbeat-interval",
                str(heartbeat),
                "--report-interval",
                "5",
                *extra,
            ],
            env,
        )

    def cli(
        self, *args: str, output: str = "json", timeout: float = 120, amqp_url: str | None = None
    ) -> CliResult:
        """Run ``virtfleet`` as a user would; ``amqp_url``: connect with another login."""
        argv = [str(BIN / "virtfleet"), "--output", output, *args]
        env = self._env() if amqp_url is None else {**self._env(), "VIRTFLEET_AMQP_URL": amqp_url}
        done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout, check=False)
        return CliResult(done.returncode, done.stdout, done.stderr)

    def logs(self) -> str:
        return "\n\n".join(f"===== {p.name} =====\n{p.log()}" for p in self.procs)

    def wait_api_consumers(self, count: int, timeout: float = 60) -> None:
        """Until ``count`` controllers consume the API queue (a race between controllers needs
        each of them taking requests before the load starts)."""
        probe = AmqpTransport(self.amqp_url, "probe")
        try:
            wait_until(
                lambda: probe.consumer_count(API_QUEUE.name) == count,
                timeout,
                f"{count} controllers to consume the API queue",
            )
        finally:
            probe.close()

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            with contextlib.suppress(AssertionError):
                proc.stop()

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_exc: object) -> None:
        """Print the logs if anything failed inside the ``with``; stop every process either way."""
        if exc_type is not None:
            print(self.logs())
        self.stop_all()


@contextlib.contextmanager
def private_fleet(tmp: Path, *, signed: bool = True) -> Iterator[Fleet]:
    """A fleet with no process yet on a private vhost and a fresh database; its logs are printed if
    anything fails, and every process it starts is stopped on the way out. ``signed``: see
    :attr:`Fleet.signed`."""
    with private_vhost() as url, fresh_database(tmp) as db, Fleet(tmp, url, db, signed=signed) as f:
        yield f


@contextlib.contextmanager
def running_fleet(
    tmp: Path, agents: Mapping[str, tuple[str, ...]], *, down_after: float = DOWN_AFTER_S
) -> Iterator[Fleet]:
    """A controller and one agent per host on a private vhost and a fresh database.

    ``agents`` maps each host id to its node file name (tests/fixtures/nodes) followed by
    extra ``virtfleet-agent`` arguments. The logs are printed if anything fails, and every
    process is stopped on the way out.
    """
    with private_fleet(tmp) as f:
        f.start_controller(down_after=down_after)
        for host, (node, *args) in agents.items():
            f.start_agent(host, node_uri(node), *args)
        f.wait_hosts(set(agents))
        yield f


def node_uri(name: str) -> str:
    """libvirt test-driver URI of a simulated host file in tests/fixtures/nodes."""
    return f"test://{NODES / f'{name}.xml'}"
