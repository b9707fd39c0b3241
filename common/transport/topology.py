"""Every exchange, queue, queue argument and binding of virtfleet, as data.

Both transports (AMQP and in-memory) declare from these objects, and docs/protocol.md's broker
sections are generated from them, so the reference cannot drift from what runs. Declarations
are idempotent: every party declares what it uses, so start order does not matter.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Any, Protocol

from common.messages.descriptor import Role


class ExchangeType(StrEnum):
    DIRECT = "direct"
    TOPIC = "topic"
    FANOUT = "fanout"


@dataclass(frozen=True, slots=True)
class Exchange:
    """A durable exchange."""

    name: str
    type: ExchangeType
    doc: str = ""


@dataclass(frozen=True, slots=True)
class Binding:
    """``queue`` receives what ``exchange`` routes with ``routing_key``."""

    exchange: Exchange
    routing_key: str


@dataclass(frozen=True, slots=True)
class Queue:
    """A queue with its arguments and bindings.

    ``disposable``: its messages are worth nothing after a while (reports, heartbeats), so a
    declaration that the broker refuses because an older release declared the queue with other
    arguments (``406 PRECONDITION_FAILED``) may delete and re-declare it. Other queues are never
    deleted by virtfleet.

    ``owns_dependencies``: whoever declares this queue also declares its exchanges and its
    dead-letter queue (the controller's queues). False for the queues of the other parties (an
    agent's command queue, a caller's reply queue): their exchanges and the dead-letter queue are
    the controller's, which the other parties' broker users may not configure, so they are only
    checked to exist (a passive declaration needs no permission) and declared only when missing
    (a fresh broker where the party starts first and may: a development broker's single user).

    ``companions``: more exchanges its declarer declares (the API queues': the replies exchange,
    and the commands exchange the controller sends agents' commands on).
    """

    name: str
    arguments: Mapping[str, Any] = field(default_factory=dict)
    bindings: tuple[Binding, ...] = ()
    durable: bool = True
    exclusive: bool = False
    auto_delete: bool = False
    disposable: bool = False
    owns_dependencies: bool = True
    companions: tuple[Exchange, ...] = ()
    doc: str = ""

    @property
    def dead_letter_exchange(self) -> str | None:
        """The exchange rejected and expired messages go to, if any."""
        value = self.arguments.get("x-dead-letter-exchange")
        return value if isinstance(value, str) else None

    def exchanges(self) -> tuple[Exchange, ...]:
        """The exchanges this queue needs (its bindings', its companions and its dead-letter exchange)."""
        seen = {e.name: e for e in (*(b.exchange for b in self.bindings), *self.companions)}
        if self.dead_letter_exchange == DEAD_LETTER_EXCHANGE.name:
            seen.setdefault(DEAD_LETTER_EXCHANGE.name, DEAD_LETTER_EXCHANGE)
        return tuple(seen.values())


# ---------------------------------------------------------------------------------- exchanges

#: Where every queue's rejected (malformed, refused) messages go, for people to inspect.
DEAD_LETTER_EXCHANGE = Exchange(
    "virtfleet.dlx", ExchangeType.FANOUT, "dead letters of every virtfleet queue -> virtfleet.dead"
)
#: Controller -> agent commands; the routing key is the host id.
COMMANDS_EXCHANGE = Exchange(
    "virtfleet.commands", ExchangeType.DIRECT, "controller -> agent commands, key = host id"
)
#: Agent -> controller reports and heartbeats; the routing key is ``<kind>.<host id>``.
REPORTS_EXCHANGE = Exchange(
    "virtfleet.reports", ExchangeType.TOPIC, "agent -> controller reports, key = <kind>.<host id>"
)
#: Client -> controller API calls; the routing key is the API queue's name. An exchange of its own,
#: not the default one, so that no party but the controller needs write on ``amq.default`` (which
#: reaches every queue by name: docs/security.md).
API_EXCHANGE = Exchange(
    "virtfleet.requests", ExchangeType.DIRECT, "client -> controller API calls, key = API queue name"
)
#: Every reply; the routing key is the caller's reply queue name, ``virtfleet.reply.<login>.<id>``
#: (:func:`reply_queue`): a topic exchange, so that the broker's topic permissions bind each login
#: to its own replies and let agents reply to the controller only.
REPLIES_EXCHANGE = Exchange(
    "virtfleet.replies", ExchangeType.TOPIC, "replies, key = the caller's reply queue name"
)
#: AMQP's default exchange: routes to the queue named by the routing key. virtfleet publishes
#: nothing there (see :data:`API_EXCHANGE` and :data:`REPLIES_EXCHANGE`).
DEFAULT_EXCHANGE = ""

# ---------------------------------------------------------------------------------- arguments

#: Messages kept in the dead-letter queue before the oldest are dropped (a queue argument).
DEAD_LETTER_MAX = 10_000
#: Bytes (message bodies) kept in the dead-letter queue: 10,000 oversized messages would otherwise
#: fill the broker's disk or memory. Beyond it new dead letters are refused (``reject-publish``), so
#: the queue keeps the first of a flood for people. Applied by the broker policy
#: :data:`DEAD_LETTER_POLICY` (deploy/rabbitmq/bootstrap.sh), not by queue arguments: every release
#: declares ``virtfleet.dead`` (the agents too), and a queue argument that differs between releases
#: would make RabbitMQ refuse one release's declaration (406) during an upgrade.
DEAD_LETTER_MAX_BYTES = 64 * 1024 * 1024
#: The RabbitMQ policy bootstrap.sh sets on ``virtfleet.dead`` (name, pattern, definition).
DEAD_LETTER_POLICY: tuple[str, str, Mapping[str, Any]] = (
    "virtfleet-dead-letters",
    r"^virtfleet\.dead$",
    {"max-length-bytes": DEAD_LETTER_MAX_BYTES, "overflow": "reject-publish"},
)
#: The largest message body virtfleet publishes or handles (``max_message_bytes`` in both
#: configurations); a full report of a host with a thousand VMs is well under 1 MiB. The broker
#: refuses larger ones when rabbitmq.conf says ``max_message_size = 8388608`` (deploy/rabbitmq).
MAX_MESSAGE_BYTES = 8 * 1024 * 1024
#: Heartbeats older than this are worthless (the host's liveness is judged by the newest one):
#: the agent sets ``expires_at`` this far ahead and the controller skips expired ones.
HEARTBEAT_TTL_MS = 30_000
#: Reports older than this are worthless (a newer one follows); enforced the same way.
REPORT_TTL_MS = 120_000
#: Reports or heartbeats queued while no controller consumes them. Beyond it the broker refuses
#: new ones (``reject-publish``: the agent's publish is nacked and it sends a fresh one later)
#: rather than dead-lettering them, so a controller outage cannot flood ``virtfleet.dead``; for
#: the same reason these queues have no queue TTL (RabbitMQ dead-letters expired messages).
REPORT_BACKLOG_MAX = 10_000

#: How often a message of a consumed queue may be delivered before the broker dead-letters it
#: (reason ``delivery_limit``): a message that kills or wedges every consumer that takes it (a
#: poison message) ends in ``virtfleet.dead`` instead of going round forever. Each connection lost
#: or process stopped with the message unacknowledged counts once, so the limit is far above what
#: failovers and restarts spend.
DELIVERY_LIMIT = 20

#: What the controller's API consumers declare besides their queues (agents and callers may not).
_CONTROLLER_EXCHANGES = (REPLIES_EXCHANGE, COMMANDS_EXCHANGE)
#: Every shared queue (but the dead-letter queue, see there) is a quorum queue: replicated on every node of a RabbitMQ cluster (Raft),
#: so losing a node loses neither the queue nor its messages (docs/operations.md, "Running it
#: highly available"). A queue cannot change type in place: a broker that has the classic queues
#: of an older release is migrated with ``virtfleet-controller broker migrate``.
QUORUM: Mapping[str, str] = MappingProxyType({"x-queue-type": "quorum"})
_DEAD_LETTERED = {**QUORUM, "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE.name}
#: A consumed queue: quorum, dead-lettered, and a poison message stops after DELIVERY_LIMIT tries.
_CONSUMED = {**_DEAD_LETTERED, "x-delivery-limit": DELIVERY_LIMIT}

# ---------------------------------------------------------------------------------- queues

DEAD_LETTER_QUEUE = Queue(
    "virtfleet.dead",
    # Classic, not quorum, on purpose: agents of the releases before the quorum queues declare
    # it themselves (a quorum one would be refused to them, 406, so a controller-first upgrade
    # would stop every old agent); RabbitMQ 3.10's quorum queues let a byte cap be overshot by a
    # message and report no message bytes. Nothing waits on it: while its node is down, the
    # parties declare their queues without it (amqp.py) and dead letters are dropped (quorum
    # queues dead-letter at most once), never looped.
    arguments={"x-max-length": DEAD_LETTER_MAX},
    bindings=(Binding(DEAD_LETTER_EXCHANGE, ""),),
    doc="every rejected message, for people to inspect; no consumer; at most DEAD_LETTER_MAX_BYTES"
    " (policy virtfleet-dead-letters: new ones refused beyond it), oldest dropped beyond DEAD_LETTER_MAX",
)
API_QUEUE = Queue(
    "virtfleet.api",
    arguments=_CONSUMED,
    bindings=(Binding(API_EXCHANGE, "virtfleet.api"),),
    companions=_CONTROLLER_EXCHANGES,
    doc="client -> controller API calls; controllers compete for them",
)
API_READ_QUEUE = Queue(
    "virtfleet.api.read",
    arguments=_CONSUMED,
    bindings=(Binding(API_EXCHANGE, "virtfleet.api.read"),),
    companions=_CONTROLLER_EXCHANGES,
    doc="client -> controller read-only API calls (role reader): their own lane and workers, so a"
    " `host list` or `vm show` never waits behind a burst of creates",
)


def api_queue(role: Role) -> Queue:
    """Where a client sends a call of ``role``: reads have a lane of their own."""
    return API_READ_QUEUE if role is Role.READER else API_QUEUE


def _reports_queue(name: str, routing_patterns: tuple[str, ...], doc: str) -> Queue:
    """A controller queue of what agents publish on the reports exchange: bounded, refusing new
    messages when full (see :data:`REPORT_BACKLOG_MAX`), disposable (a newer message follows)."""
    return Queue(
        name,
        arguments={**_CONSUMED, "x-max-length": REPORT_BACKLOG_MAX, "x-overflow": "reject-publish"},
        bindings=tuple(Binding(REPORTS_EXCHANGE, pattern) for pattern in routing_patterns),
        disposable=True,
        doc=doc,
    )


# "#", not "*": a host id may contain dots (node1.example.com), and "*" matches one word only.
REPORTS_QUEUE = _reports_queue(
    "virtfleet.controller.reports",
    # One queue for both: a delta and a full report of a host are handled in the order sent
    # (give or take the consumer's workers; their shared seq orders them).
    ("host.report.#", "host.vm_changes.#"),
    "full host reports and VM deltas; controllers compete for them; malformed ones are dead-lettered",
)
#: Heartbeats have their own queue so that they are never stuck behind a backlog of full
#: reports (a late heartbeat would make a busy host look down).
HEARTBEATS_QUEUE = _reports_queue(
    "virtfleet.controller.heartbeats", ("host.heartbeat.#",), "host heartbeats; controllers compete for them"
)

#: The name pattern of agent queues, for documentation.
AGENT_QUEUE_PATTERN = "virtfleet.agent.<host_id>"


def agent_queue(host_id: str) -> Queue:
    """The durable command queue of one agent, bound to the commands exchange by host id."""
    return Queue(
        f"virtfleet.agent.{host_id}",
        arguments=_CONSUMED,
        bindings=(Binding(COMMANDS_EXCHANGE, host_id),),
        owns_dependencies=False,
        doc="controller -> agent commands for one host",
    )


#: What moves a broker's classic queues (an older release's) to quorum queues: docs/operations.md.
MIGRATE_COMMAND = "virtfleet-controller broker migrate"


def queue_type_refused(queue: str) -> str:
    """What an operator is told when the broker refuses to declare ``queue`` as a quorum queue
    because an older release left a classic queue of that name (406, ``x-queue-type`` differs)."""
    return (
        f"queue {queue} is a classic queue (an older release's) and a queue cannot change its type "
        f"in place: stop the controllers and agents and run `{MIGRATE_COMMAND}` "
        "(docs/operations.md, 'Running it highly available')"
    )


#: The name pattern of reply queues, for documentation.
REPLY_QUEUE_PATTERN = "virtfleet.reply.<login>.<random>"


def reply_queue(login: str, suffix: str) -> Queue:
    """A caller's private reply queue (exclusive to its connection), named after its broker login so
    that the broker's permissions can confine each login to its own replies. A classic queue:
    RabbitMQ allows no exclusive quorum queue, and it dies with its connection anyway (a caller
    that reconnects to another node declares a new one and sends its request again)."""
    name = f"virtfleet.reply.{login}.{suffix}"
    return Queue(
        name,
        bindings=(Binding(REPLIES_EXCHANGE, name),),
        durable=False,
        exclusive=True,
        auto_delete=True,
        owns_dependencies=False,
        doc="one caller connection's replies",
    )


def report_routing_key(kind: str, host_id: str) -> str:
    """``<kind>.<host id>`` on the reports topic exchange."""
    return f"{kind}.{host_id}"


#: Every shared queue (agent queues follow :func:`agent_queue`), for docs and tests.
SHARED_QUEUES: tuple[Queue, ...] = (
    API_QUEUE,
    API_READ_QUEUE,
    REPORTS_QUEUE,
    HEARTBEATS_QUEUE,
    DEAD_LETTER_QUEUE,
)
EXCHANGES: tuple[Exchange, ...] = (
    API_EXCHANGE,
    COMMANDS_EXCHANGE,
    REPORTS_EXCHANGE,
    REPLIES_EXCHANGE,
    DEAD_LETTER_EXCHANGE,
)


# ---------------------------------------------------------------------------------- declaring


class Channel(Protocol):
    """The subset of an AMQP channel (pika's BlockingChannel) that declarations use."""

    def exchange_declare(
        self, exchange: str, exchange_type: str, durable: bool = ..., *, passive: bool = ...
    ) -> Any: ...

    def queue_declare(
        self,
        queue: str,
        *,
        passive: bool = ...,
        durable: bool = ...,
        exclusive: bool = ...,
        auto_delete: bool = ...,
        arguments: dict[str, Any] | None = ...,
    ) -> Any: ...

    def queue_bind(self, queue: str, exchange: str, routing_key: str | None = ...) -> Any: ...


@dataclass(frozen=True, slots=True)
class Declaration:
    """One declaration; ``what`` (exchange, queue, binding of queue) and ``name`` say what it
    declares, for the message when the broker refuses it.

    ``exists``: set for what the declarer does not own (see :attr:`Queue.owns_dependencies`): a
    passive declaration, done first; ``run`` (which may be several steps) only when it fails
    because the exchange or queue is missing.
    """

    what: str
    name: str
    run: Callable[[Channel], object]
    exists: Callable[[Channel], object] | None = None


def declarations(queue: Queue) -> list[Declaration]:
    """What declaring ``queue`` takes, in order: its exchanges, its dead-letter queue (declared
    the same way), the queue itself and its bindings; exchanges and dead-letter queue only when
    missing if the queue does not own them."""
    steps = [_exchange(exchange) for exchange in queue.exchanges()]
    if queue.dead_letter_exchange == DEAD_LETTER_EXCHANGE.name and queue is not DEAD_LETTER_QUEUE:
        if queue.owns_dependencies:
            steps += declarations(DEAD_LETTER_QUEUE)
        else:
            steps.append(_if_missing_queue(DEAD_LETTER_QUEUE))
    if not queue.owns_dependencies:
        steps = [_if_missing(step) for step in steps]
    steps.append(_queue(queue))
    steps += [_binding(queue, binding) for binding in queue.bindings]
    return steps


def _if_missing(step: Declaration) -> Declaration:
    if step.exists is not None or step.what != "exchange":
        return step
    name = step.name
    return Declaration(
        step.what, name, step.run, lambda ch: ch.exchange_declare(name, "direct", durable=True, passive=True)
    )


def _if_missing_queue(queue: Queue) -> Declaration:
    return Declaration(
        "queue",
        queue.name,
        lambda ch: declare(ch, queue),
        lambda ch: ch.queue_declare(queue.name, passive=True),
    )


def _exchange(exchange: Exchange) -> Declaration:
    return Declaration(
        "exchange",
        exchange.name,
        lambda ch: ch.exchange_declare(exchange.name, exchange.type.value, durable=True),
    )


def _queue(queue: Queue) -> Declaration:
    return Declaration(
        "queue",
        queue.name,
        lambda ch: ch.queue_declare(
            queue.name,
            durable=queue.durable,
            exclusive=queue.exclusive,
            auto_delete=queue.auto_delete,
            arguments=dict(queue.arguments),
        ),
    )


def _binding(queue: Queue, binding: Binding) -> Declaration:
    return Declaration(
        "binding of queue",
        queue.name,
        lambda ch: ch.queue_bind(queue.name, binding.exchange.name, binding.routing_key),
    )


class Missing(Exception):
    """What a :class:`Channel` raises when a passive declaration finds nothing (AMQP's 404)."""


def declare(ch: Channel, queue: Queue) -> str:
    """Declare ``queue``, its exchanges, its dead-letter queue and its bindings on ``ch`` (a channel
    whose passive declarations raise :class:`Missing`; the AMQP transport runs the steps itself)."""
    for step in declarations(queue):
        run_step(ch, step)
    return queue.name


def run_step(ch: Channel, step: Declaration) -> None:
    """One declaration; a dependency (``step.exists``) only when missing."""
    if step.exists is not None:
        try:
            step.exists(ch)
        except Missing:
            pass
        else:
            return
    step.run(ch)


def ensure_exchange(exchange: Exchange) -> Declaration:
    """An exchange a publisher needs: checked to exist, declared only when missing (a publisher's
    login may not configure it: the controller declares it)."""
    return _if_missing(_exchange(exchange))


def declare_exchange(ch: Channel, exchange: Exchange) -> None:
    """Only an exchange, declared outright (on any channel; a publisher's transport uses
    :func:`ensure_exchange` instead)."""
    _exchange(exchange).run(ch)
