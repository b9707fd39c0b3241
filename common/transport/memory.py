"""An in-process broker with RabbitMQ's semantics, for tests and one-process fleets.

:class:`MemoryBroker` keeps exchanges (direct, topic, fanout and the default exchange), queues,
bindings and messages in memory, under one lock; :class:`MemoryTransport`
(``broker.transport(name)``) implements :class:`~common.transport.port.Transport` on it, with
the same semantics as :class:`~common.transport.amqp.AmqpTransport` (see the port's docstring):
messages are stored as their encoded bytes, so the codec runs exactly as on the wire.

What it models, as RabbitMQ does:

* queue arguments ``x-message-ttl``, ``x-max-length`` and ``x-max-length-bytes`` (the bodies of
  the ready messages) with ``x-overflow`` ``drop-head``
  (the dropped head is dead-lettered, reason ``maxlen``), ``reject-publish`` (the publisher gets
  :class:`~common.transport.port.Refused`, nothing is dead-lettered) and ``reject-publish-dlx``,
  ``x-dead-letter-exchange`` and ``x-dead-letter-routing-key``; per-message expiration; dead
  letters carry ``x-death`` and ``x-first-death-*`` headers;
* ``x-queue-type`` ``classic`` or ``quorum``: a quorum queue must be durable, neither exclusive
  nor auto-delete, and refuses ``x-overflow: reject-publish-dlx`` (as RabbitMQ does); its
  ``x-delivery-limit`` dead-letters (reason ``delivery_limit``) a message returned to the queue
  more often than the limit (requeued by a nack or by its consumer's connection closing);
* re-declaring a queue or an exchange with other properties fails like a ``406
  PRECONDITION_FAILED`` (and a ``disposable`` queue is then deleted and declared again);
* exclusive (owned by one connection) and auto-delete queues, per-consumer prefetch,
  ack / reject, redelivery (``redelivered=True``) of what a consumer held when its connection
  closed, consumer counts, the AMQP ``user_id`` (the transport's user).

What it does differently, on purpose: it refuses queue arguments it does not implement (RabbitMQ
ignores unknown ones) so that a test cannot pass on a feature that is not there; it expires a
message when its time comes wherever it is in the queue (RabbitMQ only at the head); nothing is
persistent. Faults for tests: :meth:`MemoryBroker.kill_connections` (like ``rabbitmqctl
close_connection``: consumers reconnect, calls publish again) and :meth:`MemoryBroker.pause`.

Each consumer and each transport is a *connection* with a name; the broker keeps no state
outside its instances.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from common.errors import NotFound, RequestTimeout, TransportError, VirtfleetError
from common.messages.envelope import Envelope
from common.transport import topology
from common.transport.backoff import backoff_delays
from common.transport.base import PooledConsumer, Replies, check_size
from common.transport.port import Abort, Delivery, Handler, Outcome, Refused, Route, Unroutable
from common.transport.topology import Exchange, ExchangeType, Queue

log = logging.getLogger(__name__)

#: Queue arguments the memory broker implements; others are refused (see the module docstring).
SUPPORTED_ARGUMENTS = frozenset(
    {
        "x-message-ttl",
        "x-max-length",
        "x-max-length-bytes",
        "x-overflow",
        "x-dead-letter-exchange",
        "x-dead-letter-routing-key",
        "x-queue-type",
        "x-delivery-limit",
    }
)
_QUEUE_TYPES = frozenset({"classic", "quorum"})
_OVERFLOWS = frozenset({"drop-head", "reject-publish", "reject-publish-dlx"})
#: The order in which RabbitMQ 3.10 compares queue arguments on a re-declaration (the type and a
#: quorum queue's own arguments first, as measured).
_ARGUMENT_ORDER = (
    "x-queue-type",
    "x-delivery-limit",
    "x-message-ttl",
    "x-dead-letter-exchange",
    "x-dead-letter-routing-key",
    "x-max-length",
    "x-max-length-bytes",
    "x-overflow",
)


class PreconditionFailed(TransportError):
    """An exchange or queue exists with other properties (RabbitMQ's 406 PRECONDITION_FAILED)."""

    retryable_default = False

    def __init__(self, kind: str, name: str, argument: str, received: object, current: object) -> None:
        super().__init__(
            f"{kind} {name} exists with other arguments: {argument!r} is {current!r} on the broker "
            f"but {received!r} here (declared by another release?)",
            details={kind: name, "argument": argument},
        )
        self.kind = kind
        self.name = name
        self.argument = argument


@dataclass(frozen=True, slots=True)
class Message:
    """A message as the broker holds it (what tests inspect, and what a consumer receives)."""

    body: bytes
    exchange: str
    routing_key: str
    message_id: str | None = None
    correlation_id: str | None = None
    reply_to: str | None = None
    user_id: str | None = None
    type: str | None = None
    persistent: bool = False
    expiration_ms: int | None = None
    headers: Mapping[str, Any] = field(default_factory=dict)
    redelivered: bool = False


@dataclass(frozen=True, slots=True)
class QueueState:
    """Counts of one queue, as ``rabbitmqctl list_queues`` shows them."""

    name: str
    ready: int
    unacked: int
    consumers: int


@dataclass(eq=False, slots=True)
class _Stored:
    """A message in one queue (a message routed to two queues is stored twice)."""

    message: Message
    seq: int
    expires_at: float | None
    queue: str
    #: "ready", "unacked" or "gone"; an expiry timer finds out whether it still applies
    state: str = "ready"
    #: how often it came back to its queue unacknowledged (a quorum queue's delivery count)
    returns: int = 0


@dataclass(eq=False, slots=True)
class _Connection:
    name: str
    user: str
    #: told (under the broker lock) that the broker closed this connection, unless the owner did
    on_lost: Callable[[_Connection], None] | None = None
    alive: bool = True
    subscriptions: list[_Subscription] = field(default_factory=list)
    exclusive: set[str] = field(default_factory=set)


@dataclass(eq=False, slots=True)
class _Subscription:
    """One basic.consume: a connection's consumer on a queue."""

    conn: _Connection
    queue: _Queue
    prefetch: int
    #: called under the broker lock with (subscription, delivery tag, message); must not block
    deliver: Callable[[_Subscription, int, Message], None]
    auto_ack: bool = False
    unacked: dict[int, _Stored] = field(default_factory=dict)
    tags: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    active: bool = True

    def has_room(self) -> bool:
        return self.auto_ack or self.prefetch <= 0 or len(self.unacked) < self.prefetch


@dataclass(eq=False, slots=True)
class _Queue:
    name: str
    durable: bool
    auto_delete: bool
    owner: _Connection | None
    arguments: dict[str, Any]
    ready: deque[_Stored] = field(default_factory=deque)
    subscriptions: list[_Subscription] = field(default_factory=list)
    next_subscription: int = 0
    deleted: bool = False

    @property
    def ttl_ms(self) -> int | None:
        value = self.arguments.get("x-message-ttl")
        return int(value) if value is not None else None

    @property
    def max_length(self) -> int | None:
        value = self.arguments.get("x-max-length")
        return int(value) if value is not None else None

    @property
    def max_length_bytes(self) -> int | None:
        value = self.arguments.get("x-max-length-bytes")
        return int(value) if value is not None else None

    def ready_bytes(self) -> int:
        return sum(len(s.message.body) for s in self.ready)

    def over_limits(self, extra: int = 0, extra_bytes: int = 0) -> bool:
        """Whether the ready messages (plus ``extra`` of ``extra_bytes``) exceed a limit."""
        length, size = self.max_length, self.max_length_bytes
        return (length is not None and len(self.ready) + extra > length) or (
            size is not None and self.ready_bytes() + extra_bytes > size
        )

    @property
    def overflow(self) -> str:
        return str(self.arguments.get("x-overflow", "drop-head"))

    @property
    def dead_letter_exchange(self) -> str | None:
        value = self.arguments.get("x-dead-letter-exchange")
        return str(value) if value is not None else None

    @property
    def quorum(self) -> bool:
        return self.arguments.get("x-queue-type") == "quorum"

    @property
    def delivery_limit(self) -> int | None:
        value = self.arguments.get("x-delivery-limit")
        return int(value) if value is not None else None


def topic_matches(pattern: str, key: str) -> bool:
    """AMQP topic matching: ``*`` is exactly one word, ``#`` zero or more (words split on ``.``)."""

    def match(p: list[str], k: list[str]) -> bool:
        if not p:
            return not k
        if p[0] == "#":
            return any(match(p[1:], k[i:]) for i in range(len(k) + 1))
        if not k:
            return False
        return (p[0] == "*" or p[0] == k[0]) and match(p[1:], k[1:])

    return match(pattern.split("."), key.split("."))


class MemoryBroker:
    """An in-process AMQP-like broker; thread-safe; see the module docstring."""

    def __init__(self, name: str = "memory", *, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self._monotonic = monotonic
        # One lock for everything: the broker is small, and one lock makes every operation
        # atomic the way a broker's queue process makes it atomic. Reentrant so that a test's
        # wait_for predicate may call the inspection methods.
        self._lock = threading.RLock()
        #: broadcast on every change anyone may wait for (a reply, an ack, a closed connection)
        self._changed = threading.Condition(self._lock)
        self._expiry_changed = threading.Condition(self._lock)
        self._exchanges: dict[str, ExchangeType] = {}
        self._bindings: dict[str, list[tuple[str, str]]] = {}
        self._queues: dict[str, _Queue] = {}
        self._connections: list[_Connection] = []
        self._seq = itertools.count()
        self._expiries: list[tuple[float, int, _Stored]] = []
        self._expiry_thread: threading.Thread | None = None
        self._paused = False
        self._closed = False

    # ------------------------------------------------------------------ public: transports
    @property
    def url(self) -> str:
        return f"memory://{self.name}"

    def transport(
        self, name: str, user: str = "guest", *, max_message_bytes: int = topology.MAX_MESSAGE_BYTES
    ) -> MemoryTransport:
        """A transport whose connections are named ``name`` and publish as ``user``."""
        return MemoryTransport(self, name, user, max_message_bytes=max_message_bytes)

    # ------------------------------------------------------------------ public: inspection
    def messages(self, queue: str) -> tuple[Message, ...]:
        """The ready messages of ``queue``, oldest first (expired ones already dead-lettered)."""
        with self._lock:
            self._expire_due()
            q = self._queues.get(queue)
            if q is None:
                raise NotFound(f"no queue {queue} on memory broker {self.name}")
            return tuple(s.message for s in q.ready)

    def dead_letters(self) -> tuple[Message, ...]:
        """What ``virtfleet.dead`` holds (empty when nobody declared it)."""
        with self._lock:
            if topology.DEAD_LETTER_QUEUE.name not in self._queues:
                return ()
            return self.messages(topology.DEAD_LETTER_QUEUE.name)

    def queue_state(self, queue: str) -> QueueState | None:
        """Ready, unacknowledged and consumer counts of ``queue``; None when it does not exist."""
        with self._lock:
            self._expire_due()
            q = self._queues.get(queue)
            if q is None:
                return None
            unacked = sum(len(s.unacked) for c in self._connections for s in c.subscriptions if s.queue is q)
            return QueueState(q.name, len(q.ready), unacked, len(q.subscriptions))

    def get(self, queue: str) -> Message | None:
        """Take the oldest ready message of ``queue`` (AMQP basic.get with auto-ack), or None."""
        with self._lock:
            self._expire_due()
            q = self._queues.get(queue)
            if q is None:
                raise NotFound(f"no queue {queue} on memory broker {self.name}")
            while q.ready:
                stored = q.ready.popleft()
                stored.state = "gone"
                if stored.expires_at is not None and stored.expires_at <= self._monotonic():
                    self._dead_letter(q, stored.message, "expired")
                    continue
                self._changed.notify_all()
                return stored.message
            return None

    def queues(self) -> tuple[str, ...]:
        """Names of the existing queues."""
        with self._lock:
            return tuple(self._queues)

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait until ``predicate()`` (evaluated under the broker lock) holds; False on timeout."""
        with self._changed:
            return self._changed.wait_for(predicate, timeout)

    # ------------------------------------------------------------------ public: test faults
    def publish_raw(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        *,
        user: str | None = None,
        reply_to: str | None = None,
        mandatory: bool = False,
        expiration_ms: int | None = None,
    ) -> None:
        """Publish arbitrary bytes (a test's malformed message), from no particular connection."""
        message = Message(
            body, exchange, routing_key, reply_to=reply_to, user_id=user, expiration_ms=expiration_ms
        )
        with self._lock:
            self._publish(message, mandatory=mandatory)

    def wake(self) -> None:
        """Wake every wait on the broker (a call's :class:`~common.transport.port.Abort` was set)."""
        with self._changed:
            self._changed.notify_all()

    def kill_connections(self, name_prefix: str) -> int:
        """Drop every connection whose name starts with ``name_prefix``, like the broker would.

        Consumers lose their unacknowledged deliveries (requeued, redelivered) and reconnect;
        transports lose their reply queues and publish a pending call again. Returns how many.
        """
        with self._lock:
            doomed = [c for c in self._connections if c.name.startswith(name_prefix)]
            for conn in doomed:
                self._close_connection(conn, by_broker=True)
            return len(doomed)

    def pause(self) -> None:
        """Stop delivering (messages still queue up) until :meth:`resume`."""
        with self._lock:
            self._paused = True

    def resume(self) -> None:
        """Deliver again what queued up during :meth:`pause`."""
        with self._lock:
            self._paused = False
            for q in list(self._queues.values()):
                self._dispatch(q)

    def delete_queue(self, queue: str) -> None:
        """Delete ``queue`` and its messages (its consumers are cancelled and re-subscribe)."""
        with self._lock:
            self._delete_queue(queue)

    def close(self) -> None:
        """Close every connection and stop the expiry timer."""
        with self._lock:
            self._closed = True
            for conn in list(self._connections):
                self._close_connection(conn, by_broker=True)
            self._expiry_changed.notify_all()
            expiry = self._expiry_thread
        if expiry is not None:
            expiry.join(5)

    # ------------------------------------------------------------------ connections (locked)
    def _connect(
        self, name: str, user: str, on_lost: Callable[[_Connection], None] | None = None
    ) -> _Connection:
        with self._lock:
            if self._closed:
                raise TransportError(f"memory broker {self.name} is closed")
            conn = _Connection(name, user, on_lost)
            self._connections.append(conn)
            return conn

    def _close_connection(self, conn: _Connection, *, by_broker: bool = False) -> None:
        """Close ``conn``: its deliveries go back to their queues, its exclusive queues go away."""
        with self._lock:
            if not conn.alive:
                return
            conn.alive = False
            self._connections.remove(conn)
            for sub in list(conn.subscriptions):
                self._cancel(sub)
            for name in list(conn.exclusive):
                self._delete_queue(name)
            if by_broker and conn.on_lost is not None:
                conn.on_lost(conn)
            self._changed.notify_all()

    def _check(self, conn: _Connection) -> None:
        if not conn.alive:
            raise TransportError(f"connection {conn.name} to {self.url} is closed")

    # ------------------------------------------------------------------ declarations (locked)
    def _exchange_declare(self, conn: _Connection, name: str, kind: str, *, passive: bool = False) -> None:
        with self._lock:
            self._check(conn)
            if passive:
                if name not in self._exchanges:
                    raise topology.Missing(f"no exchange {name} (404 NOT_FOUND)")
                return
            if not name or name.startswith("amq."):
                raise TransportError(f"exchange name {name!r} is reserved", retryable=False)
            try:
                wanted = ExchangeType(kind)
            except ValueError:
                raise TransportError(f"unknown exchange type {kind!r}", retryable=False) from None
            current = self._exchanges.get(name)
            if current is not None and current is not wanted:
                raise PreconditionFailed("exchange", name, "type", wanted.value, current.value)
            if current is None:
                self._exchanges[name] = wanted
                self._bindings[name] = []
                self._changed.notify_all()

    def _queue_declare(
        self,
        conn: _Connection,
        name: str,
        *,
        passive: bool = False,
        durable: bool = False,
        exclusive: bool = False,
        auto_delete: bool = False,
        arguments: Mapping[str, Any] | None = None,
    ) -> QueueState:
        with self._lock:
            self._check(conn)
            args = dict(arguments or {})
            q = self._queues.get(name) if name else None
            if q is not None and q.owner is not None and q.owner is not conn:
                raise TransportError(f"queue {name} is exclusive to another connection", retryable=False)
            if passive:
                if q is None:
                    raise NotFound(f"no queue {name} (404 NOT_FOUND)")
            elif q is None:
                _validate(args, durable=durable, exclusive=exclusive, auto_delete=auto_delete)
                name = name or f"amq.gen-{uuid.uuid4().hex}"
                q = _Queue(name, durable, auto_delete, conn if exclusive else None, args)
                self._queues[name] = q
                if exclusive:
                    conn.exclusive.add(name)
                self._changed.notify_all()
            else:
                _compare(q, durable=durable, exclusive=exclusive, auto_delete=auto_delete, arguments=args)
            self._expire_due()
            return QueueState(q.name, len(q.ready), 0, len(q.subscriptions))

    def _queue_bind(self, conn: _Connection, queue: str, exchange: str, routing_key: str) -> None:
        with self._lock:
            self._check(conn)
            if queue not in self._queues:
                raise TransportError(f"no queue {queue} to bind", retryable=False)
            if exchange not in self._exchanges:
                raise TransportError(f"no exchange {exchange} to bind {queue} to", retryable=False)
            binding = (queue, routing_key)
            if binding not in self._bindings[exchange]:
                self._bindings[exchange].append(binding)
                self._changed.notify_all()

    def _delete_queue(self, name: str) -> None:
        with self._lock:
            q = self._queues.pop(name, None)
            if q is None:
                return
            q.deleted = True
            q.ready.clear()
            for bindings in self._bindings.values():
                bindings[:] = [b for b in bindings if b[0] != name]
            if q.owner is not None:
                q.owner.exclusive.discard(name)
            # Like RabbitMQ's basic.cancel to consumers of a deleted queue: their connection
            # is closed (AmqpTransport's consumer reconnects, and so does ours).
            for sub in list(q.subscriptions):
                self._close_connection(sub.conn, by_broker=True)
            self._changed.notify_all()

    # ------------------------------------------------------------------ publishing (locked)
    def _publish(self, message: Message, *, mandatory: bool) -> None:
        """Route ``message``; Unroutable, Refused or TransportError (no such exchange)."""
        with self._lock:
            targets = self._route(message.exchange, message.routing_key)
            if targets is None:
                raise TransportError(
                    f"no exchange {message.exchange} on {self.url} (404 NOT_FOUND)", retryable=False
                )
            if not targets:
                if mandatory:
                    raise Unroutable(
                        f"no queue is bound for {message.exchange or '(default exchange)'}/{message.routing_key}"
                    )
                return
            refused = [q.name for q in targets if not self._enqueue(q, message)]
            self._changed.notify_all()
            if refused:
                raise Refused(
                    f"queue {', '.join(refused)} is full and refuses new messages "
                    "(x-max-length with x-overflow reject-publish)"
                )

    def _route(self, exchange: str, routing_key: str) -> list[_Queue] | None:
        """The queues ``exchange`` routes ``routing_key`` to; None when the exchange is missing."""
        if exchange == topology.DEFAULT_EXCHANGE:
            q = self._queues.get(routing_key)
            return [q] if q is not None else []
        kind = self._exchanges.get(exchange)
        if kind is None:
            return None
        names: dict[str, None] = {}
        for queue, key in self._bindings[exchange]:
            if (
                kind is ExchangeType.FANOUT
                or (kind is ExchangeType.DIRECT and key == routing_key)
                or (kind is ExchangeType.TOPIC and topic_matches(key, routing_key))
            ):
                names[queue] = None
        return [self._queues[n] for n in names]

    def _enqueue(self, q: _Queue, message: Message) -> bool:
        """Store ``message`` in ``q``; False when the queue refuses it (reject-publish)."""
        # A quorum queue refuses once it is over its limits, so it holds one message more than a
        # classic one (RabbitMQ 3.10, measured).
        extra = (0, 0) if q.quorum else (1, len(message.body))
        if q.overflow != "drop-head" and q.over_limits(*extra):
            if q.overflow == "reject-publish-dlx":
                self._dead_letter(q, message, "maxlen")
            return False
        ttls = [t for t in (q.ttl_ms, message.expiration_ms) if t is not None]
        expires_at = self._monotonic() + min(ttls) / 1000 if ttls else None
        stored = _Stored(message, next(self._seq), expires_at, q.name)
        q.ready.append(stored)
        if expires_at is not None:
            self._schedule_expiry(stored)
        while q.ready and q.overflow == "drop-head" and q.over_limits():
            head = q.ready.popleft()
            head.state = "gone"
            self._dead_letter(q, head.message, "maxlen")
        self._dispatch(q)
        return True

    def _dead_letter(self, q: _Queue, message: Message, reason: str) -> None:
        """Republish ``message`` to ``q``'s dead-letter exchange with RabbitMQ's x-death headers."""
        dlx = q.dead_letter_exchange
        if dlx is None:
            return
        headers = dict(message.headers)
        deaths = [dict(d) for d in headers.get("x-death", [])]
        for i, death in enumerate(deaths):
            if death.get("queue") == q.name and death.get("reason") == reason:
                death["count"] = int(death.get("count", 0)) + 1
                deaths.insert(0, deaths.pop(i))
                break
        else:
            death = {
                "count": 1,
                "reason": reason,
                "queue": q.name,
                "time": int(time.time()),
                "exchange": message.exchange,
                "routing-keys": [message.routing_key],
            }
            if message.expiration_ms is not None:
                death["original-expiration"] = str(message.expiration_ms)
            deaths.insert(0, death)
        headers["x-death"] = deaths
        headers.setdefault("x-first-death-reason", reason)
        headers.setdefault("x-first-death-queue", q.name)
        headers.setdefault("x-first-death-exchange", message.exchange)
        routing_key = str(q.arguments.get("x-dead-letter-routing-key", message.routing_key))
        # RabbitMQ removes the expiration so that the dead letter does not expire again.
        dead = replace(
            message,
            exchange=dlx,
            routing_key=routing_key,
            expiration_ms=None,
            headers=headers,
            redelivered=False,
        )
        targets = self._route(dlx, routing_key) or []
        for target in targets:
            # A message that went round without ever being rejected would cycle forever;
            # RabbitMQ drops it, and so do we.
            if any(d.get("queue") == target.name for d in deaths) and not any(
                d.get("reason") == "rejected" for d in deaths
            ):
                continue
            # Dead-lettering is not confirmed: a full reject-publish queue simply drops it.
            self._enqueue(target, dead)

    # ------------------------------------------------------------------ consuming (locked)
    def _consume(
        self,
        conn: _Connection,
        queue: str,
        deliver: Callable[[_Subscription, int, Message], None],
        *,
        prefetch: int,
        auto_ack: bool = False,
    ) -> _Subscription:
        with self._lock:
            self._check(conn)
            q = self._queues.get(queue)
            if q is None:
                raise TransportError(f"no queue {queue} to consume", retryable=False)
            if q.owner is not None and q.owner is not conn:
                raise TransportError(f"queue {queue} is exclusive to another connection", retryable=False)
            sub = _Subscription(conn, q, prefetch, deliver, auto_ack)
            q.subscriptions.append(sub)
            conn.subscriptions.append(sub)
            self._dispatch(q)
            self._changed.notify_all()
            return sub

    def _cancel(self, sub: _Subscription) -> None:
        """basic.cancel and, once the connection is gone, requeue what it still held."""
        with self._lock:
            q = sub.queue
            if sub.active:
                sub.active = False
                if sub in q.subscriptions:
                    q.subscriptions.remove(sub)
                if q.auto_delete and not q.subscriptions and not q.deleted:
                    self._delete_queue(q.name)
            if not sub.conn.alive:
                self._requeue(q, sub)
            self._changed.notify_all()

    def _requeue(self, q: _Queue, sub: _Subscription) -> None:
        held = sorted(sub.unacked.values(), key=lambda s: s.seq)
        sub.unacked.clear()
        if q.deleted:
            return
        held = [stored for stored in held if self._returned(q, stored)]
        for stored in held:
            stored.state = "ready"
            stored.message = replace(stored.message, redelivered=True)
            if stored.expires_at is not None:
                self._schedule_expiry(stored)
        # Requeued messages go back where they were (RabbitMQ keeps their position).
        q.ready = deque(heapq.merge(held, q.ready, key=lambda s: s.seq))
        self._dispatch(q)

    def _settle(self, sub: _Subscription, tag: int, *, dead_letter: bool, requeue: bool = False) -> bool:
        """Ack (or reject, without requeue or with ``requeue``) one delivery; False when its
        connection is gone."""
        with self._lock:
            if not sub.conn.alive:
                return False
            stored = sub.unacked.pop(tag, None)
            if stored is None:
                return False
            if requeue:  # basic.nack(requeue=True): back to its place, redelivered
                q = sub.queue
                if not self._returned(q, stored):
                    self._dispatch(q)
                    self._changed.notify_all()
                    return True
                stored.state = "ready"
                stored.message = replace(stored.message, redelivered=True)
                if stored.expires_at is not None:
                    self._schedule_expiry(stored)
                if not q.deleted:
                    q.ready = deque(heapq.merge([stored], q.ready, key=lambda s: s.seq))
                self._dispatch(q)
                self._changed.notify_all()
                return True
            stored.state = "gone"
            if dead_letter:
                self._dead_letter(sub.queue, stored.message, "rejected")
            self._dispatch(sub.queue)
            self._changed.notify_all()
            return True

    def _returned(self, q: _Queue, stored: _Stored) -> bool:
        """Count one return of ``stored`` to ``q``; False (and dead-lettered, reason
        ``delivery_limit``) when that is more than the queue's ``x-delivery-limit``."""
        stored.returns += 1
        limit = q.delivery_limit
        if limit is None or stored.returns <= limit:
            return True
        stored.state = "gone"
        self._dead_letter(q, stored.message, "delivery_limit")
        return False

    def _dispatch(self, q: _Queue) -> None:
        """Hand ready messages to consumers with room (round robin), expiring the head first."""
        if self._paused or q.deleted:
            return
        now = self._monotonic()
        while q.ready and q.subscriptions:
            head = q.ready[0]
            if head.expires_at is not None and head.expires_at <= now:
                q.ready.popleft()
                head.state = "gone"
                self._dead_letter(q, head.message, "expired")
                continue
            sub = self._next_subscription(q)
            if sub is None:
                return
            q.ready.popleft()
            tag = next(sub.tags)
            if sub.auto_ack:
                head.state = "gone"
            else:
                head.state = "unacked"
                sub.unacked[tag] = head
            sub.deliver(sub, tag, head.message)
            self._changed.notify_all()

    def _next_subscription(self, q: _Queue) -> _Subscription | None:
        count = len(q.subscriptions)
        for i in range(count):
            index = (q.next_subscription + i) % count
            sub = q.subscriptions[index]
            if sub.has_room():
                q.next_subscription = index + 1
                return sub
        return None

    # ------------------------------------------------------------------ expiry (locked)
    def _schedule_expiry(self, stored: _Stored) -> None:
        assert stored.expires_at is not None
        heapq.heappush(self._expiries, (stored.expires_at, stored.seq, stored))
        if self._expiry_thread is None and not self._closed:
            self._expiry_thread = threading.Thread(
                target=self._expiry_loop, name=f"{self.name}-expiry", daemon=True
            )
            self._expiry_thread.start()
        elif self._expiries[0][2] is stored:
            self._expiry_changed.notify_all()

    def _expire_due(self) -> None:
        """Dead-letter every ready message whose time has come, wherever it is in its queue."""
        now = self._monotonic()
        while self._expiries and self._expiries[0][0] <= now:
            _, _, stored = heapq.heappop(self._expiries)
            q = self._queues.get(stored.queue)
            # An unacked message expires only once it is back in the queue (it is re-scheduled
            # then); one that left already is ignored.
            if stored.state != "ready" or q is None:
                continue
            try:
                q.ready.remove(stored)
            except ValueError:
                continue
            stored.state = "gone"
            self._dead_letter(q, stored.message, "expired")
            self._changed.notify_all()

    def _expiry_loop(self) -> None:
        """Expire messages even when nobody consumes or looks (RabbitMQ's queue timer).

        Runs while something may expire; the next message with a deadline starts it again.
        """
        with self._lock:
            while not self._closed and self._expiries:
                self._expire_due()
                if self._expiries:
                    self._expiry_changed.wait(self._expiries[0][0] - self._monotonic())
            self._expiry_thread = None


def _validate(arguments: Mapping[str, Any], *, durable: bool, exclusive: bool, auto_delete: bool) -> None:
    unknown = sorted(set(arguments) - SUPPORTED_ARGUMENTS)
    if unknown:
        raise TransportError(
            f"the memory broker does not implement queue argument(s) {', '.join(unknown)}",
            retryable=False,
        )
    kind = arguments.get("x-queue-type", "classic")
    if kind not in _QUEUE_TYPES:
        raise TransportError(f"x-queue-type must be one of {sorted(_QUEUE_TYPES)}, not {kind!r}")
    if kind == "quorum" and (not durable or exclusive or auto_delete):
        raise TransportError("a quorum queue is durable, neither exclusive nor auto-delete", retryable=False)
    if kind == "quorum" and arguments.get("x-overflow") == "reject-publish-dlx":
        raise TransportError("a quorum queue does not support x-overflow reject-publish-dlx", retryable=False)
    if kind != "quorum" and "x-delivery-limit" in arguments:
        raise TransportError("x-delivery-limit applies to quorum queues only", retryable=False)
    for key in ("x-message-ttl", "x-max-length", "x-max-length-bytes", "x-delivery-limit"):
        value = arguments.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise TransportError(f"{key} must be a non-negative integer, not {value!r}", retryable=False)
    overflow = arguments.get("x-overflow")
    if overflow is not None and overflow not in _OVERFLOWS:
        raise TransportError(f"x-overflow must be one of {sorted(_OVERFLOWS)}, not {overflow!r}")


def _compare(
    q: _Queue, *, durable: bool, exclusive: bool, auto_delete: bool, arguments: Mapping[str, Any]
) -> None:
    """Raise PreconditionFailed naming the first property that differs, like RabbitMQ."""
    for prop, received, current in (
        ("durable", durable, q.durable),
        ("exclusive", exclusive, q.owner is not None),
        ("auto_delete", auto_delete, q.auto_delete),
    ):
        if received != current:
            raise PreconditionFailed("queue", q.name, prop, received, current)
    # In RabbitMQ's order, so that both transports name the same argument first.
    for key in sorted(set(arguments) | set(q.arguments), key=_ARGUMENT_ORDER.index):
        if arguments.get(key) != q.arguments.get(key):
            raise PreconditionFailed("queue", q.name, key, arguments.get(key), q.arguments.get(key))


class _Channel:
    """:class:`topology.Channel` over one memory connection, so both transports declare alike."""

    def __init__(self, broker: MemoryBroker, conn: _Connection) -> None:
        self._broker = broker
        self._conn = conn

    def exchange_declare(
        self, exchange: str, exchange_type: str, durable: bool = True, *, passive: bool = False
    ) -> None:
        del durable  # every virtfleet exchange is durable; nothing survives this broker anyway
        self._broker._exchange_declare(self._conn, exchange, exchange_type, passive=passive)

    def queue_declare(
        self,
        queue: str,
        *,
        passive: bool = False,
        durable: bool = False,
        exclusive: bool = False,
        auto_delete: bool = False,
        arguments: dict[str, Any] | None = None,
    ) -> QueueState:
        try:
            return self._broker._queue_declare(
                self._conn,
                queue,
                passive=passive,
                durable=durable,
                exclusive=exclusive,
                auto_delete=auto_delete,
                arguments=arguments,
            )
        except NotFound as exc:
            raise topology.Missing(exc.message) from None

    def queue_bind(self, queue: str, exchange: str, routing_key: str | None = None) -> None:
        self._broker._queue_bind(self._conn, queue, exchange, routing_key or "")


def _declare(broker: MemoryBroker, conn: _Connection, queue: Queue) -> None:
    """topology.declare, with the disposable rule: a refused disposable queue is re-created."""
    ch = _Channel(broker, conn)
    try:
        topology.declare(ch, queue)
    except PreconditionFailed as exc:
        if not (exc.kind == "queue" and exc.name == queue.name and queue.disposable):
            raise
        log.warning(
            "queue %s exists with other arguments (%s); its messages are disposable: "
            "deleting it and declaring it again",
            queue.name,
            exc.message,
        )
        broker.delete_queue(queue.name)
        topology.declare(ch, queue)


def _message(
    env: Envelope,
    exchange: str,
    routing_key: str,
    *,
    user: str,
    persistent: bool,
    reply_to: str | None = None,
    expiration_ms: int | None = None,
) -> Message:
    return Message(
        body=env.encode(),
        exchange=exchange,
        routing_key=routing_key,
        message_id=env.id,
        correlation_id=env.correlation_id,
        reply_to=reply_to,
        user_id=user,
        type=env.kind,
        persistent=persistent,
        expiration_ms=expiration_ms,
    )


def _answered_lost_or_aborted(
    replies: Replies, msg_id: str, conn: _Connection, abort: Abort | None
) -> Callable[[], bool]:
    return lambda: (
        replies.arrived(msg_id) or not conn.alive or (abort is not None and abort.error is not None)
    )


def _raise_if_aborted(abort: Abort | None) -> None:
    error = None if abort is None else abort.error
    if error is not None:
        raise error


class MemoryTransport:
    """:class:`~common.transport.port.Transport` on a :class:`MemoryBroker`; shareable by threads."""

    def __init__(
        self,
        broker: MemoryBroker,
        name: str,
        user: str = "guest",
        *,
        max_message_bytes: int = topology.MAX_MESSAGE_BYTES,
    ) -> None:
        self._broker = broker
        self.name = name
        self.user = user
        self.max_message_bytes = max_message_bytes
        self._conn: _Connection | None = None
        self._reply_queue: str | None = None
        #: the replies the calls wait for (under the broker lock)
        self._replies = Replies(name)
        self._consumers: weakref.WeakSet[MemoryConsumer] = weakref.WeakSet()
        self._closed = False

    @property
    def url(self) -> str:
        """``memory://<broker name>``."""
        return self._broker.url

    @property
    def broker(self) -> MemoryBroker:
        return self._broker

    def _connection(self) -> _Connection:
        """This transport's client connection, opened again after the broker dropped it."""
        with self._broker._lock:
            if self._closed:
                raise TransportError(f"transport {self.name} is closed", retryable=False)
            if self._conn is None or not self._conn.alive:
                self._conn = self._broker._connect(self.name, self.user)
                self._reply_queue = None
            return self._conn

    def declare(self, queue: Queue) -> None:
        """Declare ``queue`` with its exchanges and bindings (see the port; disposable rule)."""
        _declare(self._broker, self._connection(), queue)

    def declare_exchange(self, exchange: Exchange) -> None:
        """Make sure ``exchange`` exists: checked, declared only when missing (see the port)."""
        topology.run_step(_Channel(self._broker, self._connection()), topology.ensure_exchange(exchange))

    def publish(
        self,
        exchange: str,
        routing_key: str,
        env: Envelope,
        *,
        persistent: bool = False,
        mandatory: bool = False,
        expiration_ms: int | None = None,
    ) -> None:
        """Route ``env`` now: Unroutable, Refused or TransportError as RabbitMQ's confirm would say
        (InvalidRequest when it is over ``max_message_bytes``)."""
        message = _message(
            env, exchange, routing_key, user=self.user, persistent=persistent, expiration_ms=expiration_ms
        )
        check_size(message.body, self.max_message_bytes, f"{exchange or '(default exchange)'}/{routing_key}")
        with self._broker._lock:
            self._connection()
            self._broker._publish(message, mandatory=mandatory)

    def call(
        self,
        exchange: str,
        routing_key: str,
        env: Envelope,
        timeout: float,
        *,
        persistent: bool = True,
        expiration_ms: int | None = None,
        unroutable: Callable[[], VirtfleetError] | None = None,
        abort: Abort | None = None,
    ) -> Envelope:
        """Publish ``env`` (mandatory) with this transport's reply queue and wait for its reply.

        When the broker drops the connection meanwhile, the same envelope is published again
        on a new one, as on AMQP. Setting ``abort`` wakes the wait, which raises its error.
        """
        deadline = self._broker._monotonic() + timeout
        broker = self._broker
        request = _message(
            env, exchange, routing_key, user=self.user, persistent=persistent, expiration_ms=expiration_ms
        )
        check_size(request.body, self.max_message_bytes, f"{exchange or '(default exchange)'}/{routing_key}")
        unsubscribe = None if abort is None else abort.subscribe(broker.wake)
        with broker._changed:
            self._replies.expect(env.id)
            try:
                while True:
                    _raise_if_aborted(abort)
                    conn = self._connection()
                    try:
                        broker._publish(
                            replace(request, reply_to=self._reply_queue_name(conn)), mandatory=True
                        )
                    except Unroutable:
                        if unroutable is not None:
                            raise unroutable() from None
                        raise
                    broker._changed.wait_for(
                        _answered_lost_or_aborted(self._replies, env.id, conn, abort),
                        max(0.0, deadline - broker._monotonic()),
                    )
                    reply = self._replies.take(env.id)
                    if reply is not None:
                        return reply
                    _raise_if_aborted(abort)
                    if self._closed:
                        raise TransportError(f"transport {self.name} closed during a call", retryable=False)
                    if conn.alive or broker._monotonic() >= deadline:
                        raise RequestTimeout("no reply within the timeout; the operation may still complete")
                    # The connection (and its reply queue) was lost: publish the same envelope
                    # again, as AmqpTransport does; receivers are idempotent by message id.
                    log.warning("%s: connection lost during a call; publishing %s again", self.name, env.id)
            finally:
                self._replies.forget(env.id)
                if unsubscribe is not None:
                    unsubscribe()

    def _reply_queue_name(self, conn: _Connection) -> str:
        """The exclusive reply queue of this connection, declared on first use."""
        if self._reply_queue is None:
            queue = topology.reply_queue(self.user, uuid.uuid4().hex)
            _declare(self._broker, conn, queue)
            self._broker._consume(conn, queue.name, self._on_reply, prefetch=0, auto_ack=True)
            self._reply_queue = queue.name
        return self._reply_queue

    def _on_reply(self, _sub: _Subscription, _tag: int, message: Message) -> None:
        """Called under the broker lock: keep a reply someone waits for, drop the rest."""
        if self._replies.offer(message.body):
            self._broker._changed.notify_all()

    def consumer(
        self, queue: Queue, handler: Handler, *, name: str, prefetch: int = 8, workers: int = 4
    ) -> MemoryConsumer:
        """A consumer of ``queue`` on its own connection named ``name``; ``start()`` runs it."""
        return self.multi_consumer([Route(queue, handler)], name=name, prefetch=prefetch, workers=workers)

    def multi_consumer(
        self, routes: Sequence[Route], *, name: str, prefetch: int = 8, workers: int = 4
    ) -> MemoryConsumer:
        """A consumer of every route's queue on one connection named ``name``."""
        consumer = MemoryConsumer(
            self,
            routes,
            name=name,
            prefetch=prefetch,
            workers=workers,
            max_message_bytes=self.max_message_bytes,
        )
        self._consumers.add(consumer)
        return consumer

    def consumer_count(self, queue: str) -> int | None:
        """Consumers on ``queue``, or None when the queue does not exist."""
        state = self._broker.queue_state(queue)
        return None if state is None else state.consumers

    def close(self) -> None:
        """Close the client connection; consumers still running lose theirs (deliveries requeued)."""
        with self._broker._lock:
            self._closed = True
            if self._conn is not None:
                self._broker._close_connection(self._conn)
            consumers = list(self._consumers)
        for consumer in consumers:
            consumer.stop(timeout=0)


class MemoryConsumer(PooledConsumer):
    """:class:`~common.transport.port.Consumer` on a :class:`MemoryBroker`.

    The broker pushes deliveries (at most ``prefetch`` unacknowledged per queue) into a worker
    pool shared by its routes; the worker runs the route's handler, publishes the reply and only then acknowledges. When the broker
    drops the connection it reconnects, declaring the queue again, as the AMQP consumer does.
    """

    def __init__(
        self,
        transport: MemoryTransport,
        routes: Sequence[Route],
        *,
        name: str,
        prefetch: int = 8,
        workers: int = 4,
        max_message_bytes: int = topology.MAX_MESSAGE_BYTES,
    ) -> None:
        super().__init__(
            name, routes, prefetch=prefetch, workers=workers, max_message_bytes=max_message_bytes
        )
        self._transport = transport
        self._broker = transport.broker
        self._conn: _Connection | None = None
        self._subs: list[_Subscription] = []

    def start(self) -> None:
        """Declare and consume now; if that fails, keep trying in the background (logged)."""
        try:
            self._connect()
        except TransportError as exc:
            self._retry_later(exc)

    def stop(self, timeout: float = 30.0) -> None:
        """No new deliveries; wait up to ``timeout`` for in-flight ones to be acknowledged, then
        close (what is still unacknowledged is redelivered to another consumer)."""
        broker = self._broker
        with broker._changed:
            self._stop.set()
            subs, conn = self._subs, self._conn
            for sub in subs:
                broker._cancel(sub)
            broker._changed.wait_for(lambda: all(not s.unacked or not s.conn.alive for s in subs), timeout)
            if conn is not None:
                broker._close_connection(conn)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def healthy(self, max_age: float = 10.0) -> bool:
        """Connected and consuming (there is no loop to go stale in memory)."""
        del max_age
        conn = self._conn
        return conn is not None and conn.alive and not self._stop.is_set()

    # -- connection ---------------------------------------------------------------------------
    def _connect(self) -> None:
        broker = self._broker
        with broker._lock:
            if self._stop.is_set():
                return
            conn = broker._connect(self.name, self._transport.user, on_lost=self._on_lost)
            try:
                subs = []
                for route in self._routes:
                    _declare(broker, conn, route.queue)
                    subs.append(
                        broker._consume(
                            conn, route.queue.name, self._deliver_to(route.handler), prefetch=self._prefetch
                        )
                    )
            except BaseException:
                broker._close_connection(conn)
                raise
            self._conn, self._subs = conn, subs
            self.ready.set()

    def _on_lost(self, conn: _Connection) -> None:
        """Under the broker lock: the broker closed our connection; reconnect from a thread."""
        if self._stop.is_set() or conn is not self._conn or self._broker._closed:
            return
        self.reconnects += 1
        log.warning("%s: connection closed by the broker; reconnecting", self.name)
        threading.Thread(target=self._reconnect, name=f"{self.name}-reconnect", daemon=True).start()

    def _reconnect(self) -> None:
        try:
            self._connect()
        except TransportError as exc:
            self._retry_later(exc)

    def _retry_later(self, exc: TransportError) -> None:
        log.error("%s: cannot consume %s: %s; retrying", self.name, self._what(), exc.message)

        def loop() -> None:
            for delay in backoff_delays():
                if self._stop.wait(delay) or self._broker._closed:
                    return
                try:
                    self._connect()
                except TransportError as again:
                    log.warning("%s: still cannot consume %s: %s", self.name, self._what(), again)
                else:
                    return

        threading.Thread(target=loop, name=f"{self.name}-retry", daemon=True).start()

    # -- per message --------------------------------------------------------------------------
    def _deliver_to(self, handler: Handler) -> Callable[[_Subscription, int, Message], None]:
        """The broker's delivery callback for one queue: its deliveries go to ``handler``."""

        def deliver(sub: _Subscription, tag: int, message: Message) -> None:
            """Under the broker lock: hand one delivery to the worker pool."""
            self._pool.submit(self._work, sub, tag, message, handler)

        return deliver

    def _work(self, sub: _Subscription, tag: int, message: Message, handler: Handler) -> None:
        delivery = self._delivery(
            message.body, message.routing_key, message.redelivered, message.reply_to, message.user_id
        )
        if delivery is None:
            self._broker._settle(sub, tag, dead_letter=True)
            return
        self._finish(sub, tag, delivery, self._outcome(handler, delivery))

    def _finish(self, sub: _Subscription, tag: int, delivery: Delivery, outcome: Outcome) -> None:
        """Reply, then acknowledge, atomically: both are dropped when the connection is gone."""
        broker = self._broker
        with broker._lock:
            if not sub.conn.alive:
                log.warning(
                    "%s: connection gone before ack; %s will be redelivered",
                    self.name,
                    delivery.envelope.id,
                )
                return
            if outcome.requeue:  # handed back unanswered (a stopping process): no reply
                broker._settle(sub, tag, dead_letter=False, requeue=True)
                return
            if outcome.reply is not None and delivery.reply_to:
                reply = _message(
                    outcome.reply,
                    topology.REPLIES_EXCHANGE.name,
                    delivery.reply_to,
                    user=self._transport.user,
                    persistent=False,
                )
                try:
                    broker._publish(reply, mandatory=False)
                except TransportError as exc:  # a full reply queue, say: the caller times out
                    log.warning("%s: reply to %s refused: %s", self.name, delivery.reply_to, exc)
            broker._settle(sub, tag, dead_letter=outcome.dead_letter)


__all__ = [
    "SUPPORTED_ARGUMENTS",
    "MemoryBroker",
    "MemoryConsumer",
    "MemoryTransport",
    "Message",
    "PreconditionFailed",
    "QueueState",
    "topic_matches",
]
