"""The chaos tier's kit (tests/chaos, bench/chaos.py): faults, a create load and an audit of a live fleet.

Builds on tests/vfsupport.py (:class:`~vfsupport.Fleet`, :class:`~vfsupport.Proc`,
:func:`~vfsupport.wait_until`): a fleet of real processes on a real broker. Here are

* fault injectors: :func:`kill9`, :func:`freeze` / :func:`thaw` (SIGSTOP / SIGCONT), and a
  private single-node RabbitMQ (:func:`private_rabbit`) that a test may stop and start
  (never the shared broker on 5672: other engineers' tests use it);
* a load driver (:func:`start_creates`): N ``api.vm.create`` calls from threads, each recorded as
  answered ok, answered with a typed error, or not answered;
* an audit of the fleet from outside (:func:`audit`): what the controller shows (``vm list``,
  ``host capacity`` with each host's drift against its agent's last report) compared with what
  each client was told, counted as sent / completed / duplicated / lost.

Every wait is bounded; every process and node started here is stopped on the way out.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pika
from vfsupport import Fleet, Proc, free_port, wait_until

from common.errors import AlreadyExists, ControllerUnavailable, RequestTimeout, TransportError, VirtfleetError
from common.messages import api
from common.messages import placement as pmsg
from common.messages.vm import Lifecycle, VmView
from common.transport.amqp import AmqpTransport
from common.transport.topology import DEAD_LETTER_EXCHANGE
from controller.cli.client import ApiClient

#: what :attr:`Outcome.result` says of a call that got no reply (its error was a timeout or a
#: lost connection on the client's side: the operation may or may not have happened)
NO_ANSWER = "no answer"
OK = "ok"
#: drift notes (controller.placement_ops.drift_notes) that mean a domain runs that no record claims
_UNCLAIMED_PREFIXES = ("unknown domain ", "unmanaged domain ")
_NOT_REPORTED = "is claimed here but the host does not report it"

# ------------------------------------------------------------------ faults


def kill9(proc: Proc) -> None:
    """SIGKILL ``proc`` (it gets no chance to clean up) and reap it."""
    proc.kill()


def freeze(proc: Proc) -> None:
    """SIGSTOP ``proc``: its connections stay open, it answers nothing (a wedged process)."""
    os.kill(proc.popen.pid, signal.SIGSTOP)


def thaw(proc: Proc) -> None:
    """SIGCONT ``proc`` (harmless when it is already gone)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.popen.pid, signal.SIGCONT)


@contextlib.contextmanager
def frozen(proc: Proc) -> Iterator[Proc]:
    """``proc`` stopped inside the ``with``; continued on the way out, even on failure (a stopped
    process ignores SIGTERM, so the fleet could not be stopped otherwise)."""
    freeze(proc)
    try:
        yield proc
    finally:
        thaw(proc)


def set_aside(fleet: Fleet, proc: Proc) -> None:
    """Forget the dead ``proc`` (so a process of the same name can be started again), its log kept
    beside the new one as ``NAME.N.log``."""
    assert not proc.alive(), f"{proc.name} still runs"
    fleet.procs.remove(proc)
    kept = proc.log_path.with_name(f"{proc.name}.{len(list(fleet.tmp.glob(proc.name + '.*.log')))}.log")
    proc.log_path.rename(kept)
    proc.log_path = kept


def queue_messages(amqp_url: str, queue: str) -> int:
    """Messages in ``queue`` (ready and delivered-but-unacknowledged) on the shared broker's vhost of
    ``amqp_url`` (rabbitmqctl; a passive declare counts only the ready ones)."""
    vhost = unquote(urlsplit(amqp_url).path.lstrip("/"))
    listed = subprocess.run(
        ["rabbitmqctl", "-q", "list_queues", "-p", vhost, "--no-table-headers", "name", "messages"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    counts = dict(line.split("\t") for line in listed.splitlines() if "\t" in line)
    return int(counts.get(queue, "0"))


@dataclass
class RabbitNode:
    """A private single-node RabbitMQ on loopback: own node name, ports, data, logs and cookie.

    It runs in the foreground as a child of the test (``rabbitmq-server`` without ``-detached``),
    so :meth:`stop` is a SIGTERM (RabbitMQ's clean shutdown) and nothing outlives the test. The
    mnesia directory survives :meth:`restart`: durable queues and persistent messages come back.
    """

    base: Path
    port: int = field(default_factory=free_port)
    dist_port: int = field(default_factory=free_port)
    name: str = field(default_factory=lambda: f"vfchaos{uuid.uuid4().hex[:8]}@localhost")
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        """The AMQP URL of its default vhost (guest may log in over loopback)."""
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    def _env(self) -> dict[str, str]:
        home = self.base / "home"
        cookie = home / ".erlang.cookie"
        if not cookie.exists():
            home.mkdir(parents=True, exist_ok=True)
            cookie.write_text(uuid.uuid4().hex)
            cookie.chmod(0o400)
        (self.base / "enabled_plugins").touch()
        keep = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        return {
            **keep,
            "HOME": str(home),
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            # Erlang distribution on loopback too (it listens on every interface by default).
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            "RABBITMQ_MNESIA_BASE": str(self.base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.base / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.base / "enabled_plugins"),
            # No config files: the defaults (the Debian /etc/rabbitmq ones belong to the shared node).
            "RABBITMQ_CONFIG_FILE": str(self.base / "no-rabbitmq"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.base / "no-advanced.config"),
        }

    def start(self, timeout: float = 90) -> None:
        """Start the node and wait until guest can log in (about 6-9 s on this machine)."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        for sub in ("mnesia", "log"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        self.starts += 1
        log = (self.base / f"server-{self.starts}.log").open("wb")
        self.proc = subprocess.Popen(
            ["/usr/lib/rabbitmq/bin/rabbitmq-server"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self._env(),
            cwd=self.base,
            start_new_session=True,  # its own group: stop() reaches erl's children too
        )
        log.close()
        wait_until(self._accepts_logins, timeout, f"private RabbitMQ {self.name} on port {self.port}", 0.3)

    def _accepts_logins(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise AssertionError(f"private RabbitMQ exited:\n{self.log()}")
        try:
            probe = AmqpTransport(self.url, "chaoskit-probe")
            try:
                probe.consumer_count("chaoskit-none", retries=0)
            finally:
                probe.close()
        except VirtfleetError:
            return False
        return True

    def stop(self, timeout: float = 60) -> None:
        """SIGTERM (a clean shutdown); SIGKILL to the group after ``timeout``."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        # erl's helpers (erl_child_setup, inet_gethost) share the group: leave none behind.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    def ctl(self, *args: str, timeout: float = 60) -> str:
        """``rabbitmqctl ARGS`` against this node (the Debian wrapper would switch to the shared
        node's user and cookie, so the real script is called with this node's HOME)."""
        # The CLI's own distribution port: by default DIST_PORT + 10000, which may pass 65535.
        port = str(free_port())
        env = {**self._env(), "RABBITMQ_CTL_DIST_PORT_MIN": port, "RABBITMQ_CTL_DIST_PORT_MAX": port}
        return subprocess.run(
            ["/usr/lib/rabbitmq/bin/rabbitmqctl", "-n", self.name, "-q", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=True,
            env=env,
        ).stdout

    @contextlib.contextmanager
    def vhost(self) -> Iterator[str]:
        """A fresh vhost on this node for guest: yields its AMQP URL; deleted afterwards (when the
        node runs). Fleets that follow one another on one node must not share queues: a report
        left over for a host of the same name would show as a domain nobody claims."""
        name = f"vfchaos-{uuid.uuid4().hex[:8]}"
        self.ctl("add_vhost", name)
        self.ctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        try:
            yield f"amqp://guest:guest@127.0.0.1:{self.port}/{name}"
        finally:
            if self.proc is not None and self.proc.poll() is None:
                self.ctl("delete_vhost", name)

    def queue_messages(self, queue: str, amqp_url: str | None = None) -> int:
        """Messages (ready and unacknowledged) in ``queue`` of ``amqp_url``'s vhost (default: /)."""
        vhost = unquote(urlsplit(amqp_url).path.lstrip("/")) if amqp_url else "/"
        listed = self.ctl("list_queues", "-p", vhost, "--no-table-headers", "name", "messages")
        counts = dict(line.split("\t") for line in listed.splitlines() if "\t" in line)
        return int(counts.get(queue, "0"))

    def restart(self, down_s: float = 0.0) -> float:
        """Stop, stay down ``down_s`` seconds, start again; returns how long it took."""
        started = time.monotonic()
        self.stop()
        time.sleep(down_s)
        self.start()
        return time.monotonic() - started

    def log(self, tail: int = 40) -> str:
        path = self.base / f"server-{self.starts}.log"
        lines = path.read_text(errors="replace").splitlines() if path.exists() else []
        return "\n".join(lines[-tail:])


@contextlib.contextmanager
def private_rabbit(base: Path) -> Iterator[RabbitNode]:
    """A running private RabbitMQ node with its data under ``base``; stopped on the way out."""
    node = RabbitNode(base)
    try:
        node.start()
        yield node
    finally:
        node.stop()


# ------------------------------------------------------------------ malformed messages


def publish_raw(amqp_url: str, exchange: str, routing_key: str, bodies: Sequence[bytes]) -> None:
    """Publish ``bodies`` as they are (no envelope, no signature: what a broken or hostile
    sender puts on the bus), persistent, with publisher confirms."""
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        for body in bodies:
            ch.basic_publish(
                exchange, routing_key, body, pika.BasicProperties(delivery_mode=2), mandatory=True
            )
    finally:
        conn.close()


class DeadLetterTap:
    """A private queue bound to the dead-letter exchange: what is dead-lettered from now on."""

    def __init__(self, amqp_url: str) -> None:
        self._conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
        self._ch = self._conn.channel()
        self._ch.exchange_declare(DEAD_LETTER_EXCHANGE.name, str(DEAD_LETTER_EXCHANGE.type), durable=True)
        self._queue = str(self._ch.queue_declare("", exclusive=True).method.queue)
        self._ch.queue_bind(self._queue, DEAD_LETTER_EXCHANGE.name, "")
        #: (queue it died in, body) of each message seen so far
        self.seen: list[tuple[str, bytes]] = []

    def wait_for(self, bodies: Sequence[bytes], timeout: float = 60) -> list[str]:
        """The queue each of ``bodies`` was dead-lettered from; fails after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            found = {body: queue for queue, body in self.seen}
            if all(b in found for b in bodies):
                return [found[b] for b in bodies]
            if time.monotonic() >= deadline:
                missing = [b[:40] for b in bodies if b not in found]
                raise AssertionError(f"not dead-lettered within {timeout}s: {missing}")
            method, props, body = self._ch.basic_get(self._queue, auto_ack=True)
            if method is None:
                self._conn.sleep(0.1)
                continue
            deaths = (props.headers or {}).get("x-death") or [{}]
            queue = deaths[0].get("queue", b"?")
            self.seen.append((queue.decode() if isinstance(queue, bytes) else str(queue), bytes(body)))

    def close(self) -> None:
        self._conn.close()


# ------------------------------------------------------------------ load


@dataclass(frozen=True)
class Outcome:
    """What the client of one request was told."""

    name: str
    #: ``ok``, the type name of a typed error (``HostDown``...), or :data:`NO_ANSWER`
    result: str
    #: where the answer says the VM is (ok answers only)
    host: str | None = None
    message: str = ""
    #: seconds since the load started when the answer came
    at: float = 0.0


def _outcome(client: ApiClient, body: api.VmCreate, started: float) -> Outcome:
    try:
        created = client.call(api.API_VM_CREATE, body)
    except ControllerUnavailable as exc:  # a typed answer, given before anything was sent
        return Outcome(body.name, type(exc).__name__, None, exc.message, time.monotonic() - started)
    except (RequestTimeout, TransportError) as exc:
        what = f"{type(exc).__name__}: {exc.message}"
        return Outcome(body.name, NO_ANSWER, None, what, time.monotonic() - started)
    except VirtfleetError as exc:
        return Outcome(body.name, type(exc).__name__, None, exc.message, time.monotonic() - started)
    host = created.vm.host if created.vm is not None else None
    return Outcome(body.name, OK, host, "", time.monotonic() - started)


@dataclass
class Load:
    """Creates running in threads; :meth:`wait` returns one :class:`Outcome` per request."""

    bodies: list[api.VmCreate]
    futures: list[Future[Outcome]]
    pool: ThreadPoolExecutor
    transport: AmqpTransport
    started: float
    #: set once every request has been handed to the transport (some may still wait for a reply)
    sent: threading.Event

    def wait(self, timeout: float) -> list[Outcome]:
        """Every outcome; fails the test if a client still waits after ``timeout`` (the client
        timeout given to :func:`start_creates` should end each call sooner)."""
        deadline = time.monotonic() + timeout
        try:
            if not self.sent.wait(timeout):
                raise TimeoutError
            return [f.result(timeout=max(0.0, deadline - time.monotonic())) for f in self.futures]
        except TimeoutError:
            raise AssertionError(f"creates still unanswered {timeout}s after they started") from None
        finally:
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.transport.close()


def create_body(name: str, memory_mib: int = 64, host: str | None = None) -> api.VmCreate:
    """The create of a small VM (1 vCPU, ``memory_mib``, a 1 GiB disk), optionally on ``host``."""
    return api.VmCreate(name=name, vcpus=1, memory_mib=memory_mib, disk_gib=1, host=host)


def start_creates(
    amqp_url: str,
    bodies: Sequence[api.VmCreate],
    *,
    workers: int = 8,
    client_timeout: float = 90,
    spacing_s: float = 0.0,
) -> Load:
    """Send ``bodies`` as ``api.vm.create`` calls from ``workers`` threads (each has its own broker
    connection) with ``client_timeout`` per call; ``spacing_s`` between two starts spreads them
    out (so a fault lands in the middle of the load)."""
    transport = AmqpTransport(amqp_url, f"chaos-load-{uuid.uuid4().hex[:6]}")
    client = ApiClient(transport, timeout=client_timeout, sender="chaos-load")
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="chaos-load")
    started = time.monotonic()
    sent = threading.Event()
    futures: list[Future[Outcome]] = []
    items = list(bodies)

    def submit_all() -> None:
        for i, body in enumerate(items):
            if spacing_s and i:
                time.sleep(spacing_s)
            futures.append(pool.submit(_outcome, client, body, started))
        sent.set()

    if spacing_s:
        threading.Thread(target=submit_all, daemon=True).start()
    else:
        submit_all()
    return Load(items, futures, pool, transport, started, sent)


def run_creates(
    amqp_url: str,
    bodies: Sequence[api.VmCreate],
    *,
    workers: int = 8,
    client_timeout: float = 90,
    timeout: float = 180,
) -> list[Outcome]:
    """:func:`start_creates` and wait (at most ``timeout``) for every outcome."""
    return start_creates(amqp_url, bodies, workers=workers, client_timeout=client_timeout).wait(timeout)


# ------------------------------------------------------------------ audit


@dataclass(frozen=True)
class FleetView:
    """What the controller shows of the fleet: VM records, and per host its capacity rows and drift."""

    vms: tuple[VmView, ...]
    capacity: tuple[pmsg.HostCapacity, ...]

    def by_name(self) -> dict[str, list[VmView]]:
        named: dict[str, list[VmView]] = {}
        for vm in self.vms:
            named.setdefault(vm.name, []).append(vm)
        return named

    def drift(self) -> list[str]:
        return [f"{h.host}: {note}" for h in self.capacity for note in h.drift]


def fleet_view(amqp_url: str, timeout: float = 60) -> FleetView:
    """``vm list`` and ``host capacity`` (each host's claims, and drift against its agent's report)."""
    client = ApiClient(AmqpTransport(amqp_url, f"chaos-audit-{uuid.uuid4().hex[:6]}"), timeout=timeout)
    try:
        vms = client.call(api.API_VM_LIST, api.VmListRequest()).vms
        capacity = client.call(pmsg.API_HOST_CAPACITY, pmsg.CapacityRequest()).hosts
    finally:
        client.close()
    return FleetView(tuple(vms), tuple(capacity))


def settled_view(amqp_url: str, timeout: float = 30) -> FleetView:
    """The fleet once nothing is ``building`` and the agents' reports agree with the records (no
    drift), or as it is after ``timeout`` (the audit then counts what still differs)."""
    deadline = time.monotonic() + timeout
    while True:
        view = fleet_view(amqp_url)
        quiet = not any(v.status is Lifecycle.BUILDING for v in view.vms) and not view.drift()
        if quiet or time.monotonic() >= deadline:
            return view
        time.sleep(1.0)


@dataclass(frozen=True)
class Audit:
    """Each request's fate against what the fleet shows (see :func:`audit`)."""

    sent: int
    #: answered ok, and the VM is active on the host the answer named, which reports it
    completed: int
    #: a VM made twice: a domain no record claims, or a client told AlreadyExists for the VM its
    #: own (only) request made
    duplicated: int
    #: no effect: an ok answer whose VM is missing, not active or not on its host; or no answer and no VM
    lost: int
    #: answered with a typed error, by type
    errors: dict[str, int]
    #: not answered, by what happened: ``done`` (the VM exists anyway), ``lost`` (counted in lost)
    unanswered: dict[str, int]
    #: VMs still ``building``
    stuck: tuple[str, ...]
    #: per host and resource, what is claimed beyond the capacity (empty: never past capacity)
    over_capacity: tuple[str, ...]
    #: per host, MiB claimed that no live VM record accounts for (capacity leaked by a fault)
    leaked_mib: dict[str, int]
    drift: tuple[str, ...]
    notes: tuple[str, ...]

    @property
    def clean(self) -> bool:
        """Nothing duplicated, lost, stuck, past capacity or leaked."""
        return not (
            self.duplicated or self.lost or self.stuck or self.over_capacity or any(self.leaked_mib.values())
        )

    def summary(self) -> str:
        errors = ", ".join(f"{k} {v}" for k, v in sorted(self.errors.items())) or "none"
        unanswered = ", ".join(f"{k} {v}" for k, v in sorted(self.unanswered.items())) or "none"
        return (
            f"sent {self.sent}, completed {self.completed}, duplicated {self.duplicated}, lost {self.lost}; "
            f"errors: {errors}; unanswered: {unanswered}; stuck {len(self.stuck)}; "
            f"past capacity {len(self.over_capacity)}; leaked MiB {sum(self.leaked_mib.values())}"
        )

    def explain(self) -> str:
        """The summary and every note (for assertion messages)."""
        return "\n".join([self.summary(), *self.notes, *self.drift, *self.over_capacity])


def audit(outcomes: Sequence[Outcome], view: FleetView) -> Audit:
    """Compare what each client was told (``outcomes``, one request per VM name) with ``view``."""
    named = view.by_name()
    reported_missing = _not_reported(view)
    unclaimed = [
        f"{h.host}: {n}" for h in view.capacity for n in h.drift if n.startswith(_UNCLAIMED_PREFIXES)
    ]
    completed = duplicated = lost = 0
    errors: Counter[str] = Counter()
    unanswered: Counter[str] = Counter()
    notes: list[str] = []
    for out in outcomes:
        records = named.get(out.name, [])
        live = [v for v in records if v.status is Lifecycle.ACTIVE and v.name not in reported_missing]
        if len(records) > 1:
            duplicated += len(records) - 1
            notes.append(f"{out.name}: {len(records)} records")
        if out.result == OK:
            if live and live[0].host == out.host:
                completed += 1
            else:
                lost += 1
                notes.append(
                    f"{out.name}: answered ok on {out.host}, but the fleet shows {_describe(records)}"
                )
        elif out.result == NO_ANSWER:
            if live:
                unanswered["done"] += 1
            else:
                unanswered["lost"] += 1
                lost += 1
                notes.append(f"{out.name}: no answer ({out.message}) and {_describe(records)}")
        else:
            errors[out.result] += 1
            if out.result == AlreadyExists.__name__:
                duplicated += 1  # one request per name: the VM it "already exists" as is its own
                notes.append(f"{out.name}: AlreadyExists for its own request ({out.message})")
            elif any(v.name not in reported_missing for v in records if v.host is not None):
                where = _describe(records)
                notes.append(f"{out.name}: answered {out.result} ({out.message}), yet the VM exists: {where}")
    duplicated += len(unclaimed)
    for u in unclaimed:
        # "h1: unknown domain NAME (...)": a record of that name elsewhere or with another uuid
        # means the VM was made twice; none means an orphan of a request whose record went away.
        domain = u.split(" ")[3]
        notes.append(
            f"domain no record claims: {u}; records named {domain}: {_describe(named.get(domain, []))}"
        )
    return Audit(
        sent=len(outcomes),
        completed=completed,
        duplicated=duplicated,
        lost=lost,
        errors=dict(errors),
        unanswered=dict(unanswered),
        stuck=tuple(v.name for v in view.vms if v.status is Lifecycle.BUILDING),
        over_capacity=tuple(
            f"{h.host} {r.resource}: used {r.used} > capacity {r.capacity}"
            for h in view.capacity
            for r in h.resources
            if r.used > r.capacity
        ),
        leaked_mib=_leaked(view),
        drift=tuple(view.drift()),
        notes=tuple(notes),
    )


def _describe(records: Sequence[VmView]) -> str:
    if not records:
        return "no VM"
    return ", ".join(f"{v.status} on {v.host}" for v in records)


def _not_reported(view: FleetView) -> set[str]:
    """Names of the VMs a host is said to hold but does not report (its drift notes)."""
    return {note.split(" ", 2)[1] for h in view.capacity for note in h.drift if _NOT_REPORTED in note}


def _leaked(view: FleetView) -> dict[str, int]:
    """Per host: memory claimed beyond what the VMs there account for.

    A VM ``active``, ``building`` or ``deleting`` holds its claim; one in ``error`` holds it only
    while its host runs it (a build that timed out keeps the claim, one that failed releases it):
    a claim of an ``error`` VM its host does not report is capacity leaked."""
    missing = _not_reported(view)
    expected: Counter[str] = Counter()
    for vm in view.vms:
        if vm.host is not None and (vm.status is not Lifecycle.ERROR or vm.name not in missing):
            expected[vm.host] += vm.memory_mib
    leaked: dict[str, int] = {}
    for h in view.capacity:
        used = sum(r.used for r in h.resources if r.resource == "MEMORY_MIB")
        leaked[h.host] = used - expected[h.host]
    return leaked


def fleet_serves(amqp_url: str, probe_name: str, host: str | None = None, timeout: float = 60) -> Outcome:
    """One more create after the fault (the service is back when it is answered ok)."""
    return run_creates(
        amqp_url, [create_body(probe_name, host=host)], timeout=timeout, client_timeout=timeout
    )[0]


def first_ok_after(outcomes: Sequence[Outcome], after_s: float) -> float | None:
    """Seconds after ``after_s`` (load time) of the first ok answer, or None (time to recover)."""
    times = [o.at for o in outcomes if o.result == OK and o.at >= after_s]
    return min(times) - after_s if times else None


def names(prefix: str, count: int) -> list[str]:
    """``count`` VM names unique to this run (the audit takes one request per name)."""
    run = uuid.uuid4().hex[:4]
    return [f"{prefix}-{run}-{i:03d}" for i in range(count)]


__all__ = [
    "NO_ANSWER",
    "OK",
    "Audit",
    "DeadLetterTap",
    "FleetView",
    "Load",
    "Outcome",
    "RabbitNode",
    "audit",
    "create_body",
    "first_ok_after",
    "fleet_serves",
    "fleet_view",
    "freeze",
    "frozen",
    "kill9",
    "names",
    "private_rabbit",
    "publish_raw",
    "queue_messages",
    "run_creates",
    "set_aside",
    "settled_view",
    "start_creates",
    "thaw",
]
