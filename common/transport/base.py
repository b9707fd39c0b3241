"""What both transports do the same way, written once.

:class:`PooledConsumer` is the part of a :class:`~common.transport.port.Consumer` that does not
depend on the broker: its name, its routes (queue and handler; one for :meth:`consumer`, many
for :meth:`multi_consumer`), the worker pool the handlers run in, and the
handling of one delivery (decode it, run the handler, turn a crash into a dead letter). Each
transport's consumer adds how it connects, how a delivery reaches the pool and how the reply and
the acknowledgement go back. :class:`Replies` is what a transport's calls wait on: the replies
to the requests in flight, by correlation id.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from common.errors import InvalidRequest, VirtfleetError
from common.messages.envelope import Envelope, decode_envelope
from common.transport.port import Delivery, Handler, Outcome, Route
from common.transport.topology import MAX_MESSAGE_BYTES

log = logging.getLogger(__name__)


def check_size(body: bytes, limit: int, where: str) -> bytes:
    """``body`` when it is at most ``limit`` bytes (``max_message_bytes``), else InvalidRequest:
    nothing larger is published, and the broker would refuse it too (``max_message_size``)."""
    if len(body) > limit:
        raise InvalidRequest(
            f"a message of {len(body)} bytes for {where} exceeds max_message_bytes ({limit}); nothing was sent",
            details={"bytes": len(body), "max_message_bytes": limit},
        )
    return body


class PooledConsumer:
    """A consumer's broker-independent half: each route's handler runs in one pool of
    ``workers`` threads shared by all routes.

    ``ready`` is set once every queue is declared and consumed; ``reconnects`` counts the times
    the connection was lost and made again.
    """

    def __init__(
        self,
        name: str,
        routes: Sequence[Route],
        *,
        prefetch: int,
        workers: int,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
    ) -> None:
        if not routes:
            raise ValueError(f"consumer {name}: no queue to consume")
        queues = [r.queue.name for r in routes]
        if len(set(queues)) != len(queues):
            raise ValueError(f"consumer {name}: a queue appears twice")
        self.name = name
        self._routes = tuple(routes)
        self._prefetch = prefetch
        self._max_message_bytes = max_message_bytes
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"{name}-worker")
        self._stop = threading.Event()
        self.ready = threading.Event()
        self.reconnects = 0

    def _delivery(
        self, body: bytes, routing_key: str, redelivered: bool, reply_to: str | None, user_id: str | None
    ) -> Delivery | None:
        """The delivery of a message, or None (logged) when it cannot be read or is larger than
        ``max_message_bytes`` (not even decoded): the caller dead-letters it, never requeues it."""
        if len(body) > self._max_message_bytes:
            log.warning(
                "%s: rejecting a message of %d bytes (over max_message_bytes %d, from login %r) to the "
                "dead-letter queue",
                self.name,
                len(body),
                self._max_message_bytes,
                user_id,
            )
            return None
        try:
            env = decode_envelope(body)
        except VirtfleetError as exc:
            log.warning("%s: rejecting malformed message to the dead-letter queue: %s", self.name, exc)
            return None
        return Delivery(env, routing_key, redelivered, reply_to, user_id)

    def _what(self) -> str:
        """The queue(s) consumed, for messages."""
        first = self._routes[0].queue.name
        return first if len(self._routes) == 1 else f"{first} and {len(self._routes) - 1} more queue(s)"

    def _outcome(self, handler: Handler, delivery: Delivery) -> Outcome:
        """What ``handler`` makes of ``delivery``; a handler that raises dead-letters it."""
        try:
            return handler(delivery)
        except Exception:  # the handler should not raise; if it does, keep the consumer alive
            log.exception("%s: handler crashed on %s", self.name, delivery.envelope.kind)
            return Outcome(dead_letter=True)


class Replies:
    """The replies a connection's calls wait for, by the request's id (the reply's correlation id).

    Not locked: each transport uses it from one thread at a time (AMQP: the session's thread;
    memory: under the broker lock).
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._waiting: set[str] = set()
        self._replies: dict[str, Envelope] = {}

    def expect(self, msg_id: str) -> None:
        """A call is about to wait for the reply to ``msg_id``."""
        self._waiting.add(msg_id)

    def forget(self, msg_id: str) -> None:
        """The call for ``msg_id`` is over: a reply arriving from now on is dropped."""
        self._waiting.discard(msg_id)
        self._replies.pop(msg_id, None)

    def offer(self, body: bytes) -> bool:
        """Keep a reply someone waits for (True); drop an undecodable or late one (logged)."""
        try:
            env = decode_envelope(body)
        except VirtfleetError as exc:
            log.warning("%s: dropping undecodable reply: %s", self._name, exc)
            return False
        if env.correlation_id not in self._waiting:
            log.debug("%s: dropping late reply %s (%s)", self._name, env.correlation_id, env.kind)
            return False
        self._replies[env.correlation_id] = env
        return True

    def arrived(self, msg_id: str) -> bool:
        return msg_id in self._replies

    def take(self, msg_id: str) -> Envelope | None:
        """The reply to ``msg_id`` if it arrived (taken out), else None."""
        return self._replies.pop(msg_id, None)


__all__ = ["PooledConsumer", "Replies", "check_size"]
