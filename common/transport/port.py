"""The transport port: what the controller, the agents and the CLI need from a message broker.

Two implementations, chosen by URL (:func:`common.transport.open_transport`):

* ``amqp://user:pass@host:port/vhost`` -- RabbitMQ through pika (:mod:`common.transport.amqp`).
* ``memory://name`` -- an in-process broker with the same semantics
  (:mod:`common.transport.memory`), so a controller, many agents and the CLI run in one test
  process with no broker, no root and no QEMU.

Semantics both implementations guarantee (and the contract tests in ``tests/contract`` check):

* **Publish** is confirmed: when :meth:`Transport.publish` returns, the broker has the message
  (persistent ones survive a broker restart on AMQP). ``mandatory`` publishes to a routing key no
  queue is bound to raise :class:`Unroutable`; a queue over its ``x-max-length`` with
  ``x-overflow: reject-publish`` makes publish raise :class:`Refused`.
* **Consume, ack after reply**: a :class:`Consumer` runs the handler in a worker pool (at most
  ``prefetch`` unacknowledged deliveries), publishes the handler's reply to the request's
  ``reply_to`` and only then acknowledges. A consumer that stops or dies before acknowledging
  leaves the message to be delivered again with ``redelivered=True``.
* **Several queues, one consumer**: :meth:`Transport.multi_consumer` consumes many queues on one
  connection and one worker pool, each queue's deliveries going to that queue's own handler
  (:class:`Route`); ``prefetch`` bounds each queue separately. It is how one process serves many
  simulated hosts without a connection and a thread per host.
* **Dead letters**: an :class:`Outcome` with ``dead_letter`` (and an undecodable message) is
  rejected without requeue: the queue's dead-letter exchange receives it.
* **Expiry**: a per-message ``expiration_ms`` drops (dead-letters) the message when it waits
  longer than that in a queue.
* **Call** (request/reply): :meth:`Transport.call` publishes ``mandatory`` and persistent (or
  not), waits for the reply whose ``correlation_id`` is the request's id and returns it;
  :class:`~common.errors.RequestTimeout` after ``timeout`` seconds. On a lost connection it
  publishes the *same* envelope again (receivers are idempotent by message id). A call given
  an :class:`Abort` ends as soon as the abort is set, raising the abort's error (the wait is
  woken, never polled: a host declared down or a stopping process ends its calls at once).
* **Hand back**: an :class:`Outcome` with ``requeue`` sends no reply and rejects the delivery
  *with* requeue: the queue delivers it again (``redelivered=True``), to this or another
  consumer. It is how a stopping process gives back requests it did not finish.

Every broker-specific exception is translated into :class:`~common.errors.TransportError` (or a
subclass) inside the implementation, once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from common.errors import TransportError, VirtfleetError
from common.messages.envelope import Envelope
from common.transport.topology import Exchange, Queue


class Unroutable(TransportError):
    """A mandatory publish found no queue bound for its routing key."""

    retryable_default = False


class Refused(TransportError):
    """The broker refused a publish (the queue is full and rejects new messages)."""


class Interrupted(TransportError):
    """This process is stopping: a call it waited on was given up. A handler that raises it
    gets its delivery handed back to the queue unanswered (see :class:`Outcome`), so another
    (or the next) process answers the request."""

    retryable_default = True


@dataclass(frozen=True, slots=True)
class Delivery:
    """A decoded message handed to a handler."""

    envelope: Envelope
    routing_key: str
    redelivered: bool
    reply_to: str | None
    #: the login the broker authenticated for the publisher (AMQP ``user_id``), when it said
    user_id: str | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a handler wants done: an optional reply, and whether to dead-letter the message or
    hand it back to its queue unanswered (``requeue``, for a process that is stopping)."""

    reply: Envelope | None = None
    dead_letter: bool = False
    requeue: bool = False


class Abort:
    """Ends a :meth:`Transport.call` early: :meth:`set` it with the error the call must raise.

    Setting it runs the callbacks the waiting transport subscribed (they wake its wait), so a
    waiting call ends at once without polling. Setting it twice keeps the first error.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._error: VirtfleetError | None = None
        self._wakers: list[Callable[[], None]] = []

    @property
    def error(self) -> VirtfleetError | None:
        """The error the call must raise, once set."""
        with self._lock:
            return self._error

    def set(self, error: VirtfleetError) -> None:
        """Abort with ``error`` (the first one wins) and wake the waiting call."""
        with self._lock:
            if self._error is not None:
                return
            self._error = error
            wakers = list(self._wakers)
        for wake in wakers:
            wake()

    def subscribe(self, wake: Callable[[], None]) -> Callable[[], None]:
        """Run ``wake`` when the abort is set (at once if it is); returns the unsubscribe."""
        with self._lock:
            already = self._error is not None
            if not already:
                self._wakers.append(wake)
        if already:
            wake()

        def unsubscribe() -> None:
            with self._lock:
                if wake in self._wakers:
                    self._wakers.remove(wake)

        return unsubscribe


Handler = Callable[[Delivery], Outcome]


@dataclass(frozen=True, slots=True)
class Route:
    """One queue of a :meth:`Transport.multi_consumer` and the handler its deliveries go to."""

    queue: Queue
    handler: Handler


class Consumer(Protocol):
    """One queue consumed in the background until stopped (reconnecting on AMQP)."""

    @property
    def name(self) -> str: ...

    @property
    def ready(self) -> threading.Event:
        """Set once the queue is declared and consumed."""
        ...

    def start(self) -> None: ...

    def stop(self, timeout: float = 30.0) -> None:
        """Stop taking deliveries, let in-flight ones finish and be acknowledged, then close."""
        ...

    def healthy(self, max_age: float = 10.0) -> bool:
        """Connected, and the consuming loop ran within ``max_age`` seconds (a wedged consumer is not)."""
        ...


class Transport(Protocol):
    """A connection to the fleet's broker, shareable by every thread of a process."""

    @property
    def url(self) -> str:
        """The broker URL without its password, for messages."""
        ...

    def declare(self, queue: Queue) -> None:
        """Declare ``queue`` with its exchanges, dead-letter exchange and bindings (idempotent)."""
        ...

    def declare_exchange(self, exchange: Exchange) -> None:
        """Make sure an exchange exists: what a publisher needs before its first publish. Checked
        with a passive declaration and declared only when missing (a publisher's broker user, an
        agent's, may not configure the controller's exchanges)."""
        ...

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
        """Publish and wait for the broker's confirm (Unroutable, Refused, TransportError)."""
        ...

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
        """Send a request and return the reply envelope (RequestTimeout, TransportError).

        ``unroutable()`` builds the error raised when no queue is bound for ``routing_key``
        (default: :class:`Unroutable`). When ``abort`` is set before the reply comes (or before
        the call starts), the call raises ``abort.error`` at once; a reply that comes later is
        dropped.
        """
        ...

    def consumer(
        self, queue: Queue, handler: Handler, *, name: str, prefetch: int = 8, workers: int = 4
    ) -> Consumer:
        """A consumer of ``queue`` (declared when it connects); call ``start()`` to run it."""
        ...

    def multi_consumer(
        self, routes: Sequence[Route], *, name: str, prefetch: int = 8, workers: int = 4
    ) -> Consumer:
        """One consumer of every route's queue on one connection (declared when it connects):
        a delivery from ``route.queue`` runs ``route.handler``; at most ``prefetch``
        unacknowledged deliveries per queue; ``workers`` threads shared by all queues.
        Semantics per queue are those of :meth:`consumer`; losing the connection (or one queue)
        reconnects and consumes all of them again. Call ``start()`` to run it."""
        ...

    def consumer_count(self, queue: str) -> int | None:
        """Consumers on ``queue``, or None when the queue does not exist."""
        ...

    def close(self) -> None:
        """Close this process's connections.

        Stop consumers first (``Consumer.stop``) to let in-flight work finish: a consumer still
        running when its transport closes loses its connection, so its unacknowledged
        deliveries are redelivered.
        """
        ...


__all__ = [
    "Abort",
    "Consumer",
    "Delivery",
    "Handler",
    "Interrupted",
    "Outcome",
    "Refused",
    "Route",
    "Transport",
    "Unroutable",
]
