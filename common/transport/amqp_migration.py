"""Move an older release's classic queues to quorum queues, without losing a message.

RabbitMQ cannot change a queue's type in place (redeclaring a classic queue with
``x-queue-type: quorum`` is refused, ``406 PRECONDITION_FAILED``), so each classic queue ``Q``
is moved through a temporary quorum queue ``Q.migrating``:

1. declare ``Q.migrating`` (quorum, ``Q``'s arguments and bindings), then unbind ``Q``: what is
   published from now on goes to ``Q.migrating``;
2. move ``Q``'s messages there, each published with its properties and confirmed before it is
   acknowledged on ``Q`` (a crash puts the unacknowledged one back in ``Q``);
3. delete ``Q`` (only when empty), declare it as a quorum queue with its bindings, unbind
   ``Q.migrating``, move its messages back the same way and delete it.

Messages travel through an exchange of the migration's own (``virtfleet.migrate``: the
controller's login may write ``virtfleet.*`` but not AMQP's default exchange) and keep their
properties, ``user_id`` included: RabbitMQ lets a login publish another login's ``user_id`` only
when it has the ``impersonator`` tag, so messages of other logins (API calls waiting in the API
queue, reports) need a login with that tag (the refusal says so; nothing is lost).

Safe to run twice, and after an interruption at any step: a queue that is quorum already with no
``Q.migrating`` left is skipped; a ``Q.migrating`` that is left is finished. The queue's consumers
must be stopped first (a queue with consumers is refused): stop the controllers and agents.
Publishers may keep running: a message published during step 3 between binding ``Q`` and
unbinding ``Q.migrating`` may arrive twice, which the receivers' journals answer (message ids).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from collections.abc import Callable, Sequence
from enum import StrEnum

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection

from common.errors import TransportError
from common.transport.amqp import connect, declare_queue, safe_url
from common.transport.topology import Binding, Exchange, ExchangeType, Queue

log = logging.getLogger(__name__)

#: The exchange messages are moved through (deleted at the end).
MOVE_EXCHANGE = Exchange("virtfleet.migrate", ExchangeType.DIRECT, "moves messages between queues")
#: The temporary queue of ``queue``.
MIGRATING_SUFFIX = ".migrating"


class Result(StrEnum):
    """What the migration did to one queue."""

    MIGRATED = "migrated"
    FINISHED = "finished an interrupted migration"
    QUORUM = "quorum already"
    CREATED = "absent; declared as a quorum queue"


@dataclasses.dataclass(frozen=True, slots=True)
class Migrated:
    """One queue's result and how many messages were moved (there and back count once)."""

    queue: str
    result: Result
    messages: int


def migrate(url: str, queues: Sequence[Queue], *, name: str = "virtfleet-migrate") -> list[Migrated]:
    """Make every queue of ``queues`` (their quorum definitions from :mod:`topology`) a quorum
    queue on the broker at ``url``; TransportError (nothing lost) when it cannot."""
    conn = connect(url, name)
    try:
        migrations = [_Migration(conn, queue) for queue in queues]
        for migration in migrations:  # all checked before anything moves
            migration.check_consumers()
        return [migration.run() for migration in migrations]
    except pika.exceptions.AMQPError as exc:
        raise TransportError(
            f"the migration on {safe_url(url)} stopped: {type(exc).__name__}: {exc}; "
            "nothing is lost: run it again"
        ) from exc
    finally:
        if conn.is_open:
            with contextlib.suppress(pika.exceptions.AMQPError, OSError):
                conn.close()


class _Migration:
    """The steps of the module docstring for one queue, on one connection."""

    def __init__(self, conn: BlockingConnection, queue: Queue) -> None:
        self.conn = conn
        # Never the disposable rule here (delete and declare again): its messages are moved too.
        # Its exchanges and dead-letter queue only when missing: they are the controller's, and
        # an older release's dead-letter queue (classic, like this release's) may differ.
        self.queue = dataclasses.replace(queue, disposable=False, owns_dependencies=False)
        self.temp = dataclasses.replace(self.queue, name=migrating_queue(queue.name))
        self.ch = self._channel()

    def _channel(self) -> BlockingChannel:
        ch = self.conn.channel()
        ch.confirm_delivery()
        return ch

    def _exists(self, name: str) -> tuple[bool, int]:
        """Whether queue ``name`` exists, and its consumers."""
        try:
            ok = self.ch.queue_declare(name, passive=True)
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code != 404:
                raise
            self.ch = self._channel()
            return False, 0
        return True, int(ok.method.consumer_count)

    def _is_quorum(self) -> bool:
        """Declare the queue as quorum; False when the broker says it is classic."""
        try:
            self.ch = declare_queue(self.ch, self.queue, self._channel)
        except TransportError as exc:
            self.ch = self._channel()
            if exc.details.get("argument") != "x-queue-type":
                raise
            return False
        return True

    def check_consumers(self) -> None:
        """TransportError when something still consumes the queue."""
        name = self.queue.name
        _exists, consumers = self._exists(name)
        if consumers:
            raise TransportError(
                f"queue {name} has {consumers} consumer(s): stop the controllers and agents first",
                retryable=False,
                details={"queue": name},
            )

    def run(self) -> Migrated:
        name = self.queue.name
        exists, _consumers = self._exists(name)
        temp_left, _ = self._exists(self.temp.name)
        if exists and self._is_quorum():
            if not temp_left:
                return Migrated(name, Result.QUORUM, 0)
            return Migrated(name, Result.FINISHED, self._back())
        if not exists:
            self.ch = declare_queue(self.ch, self.queue, self._channel)
            if not temp_left:
                return Migrated(name, Result.CREATED, 0)
            return Migrated(name, Result.FINISHED, self._back())
        # A classic queue: to the temporary queue, and back once it is a quorum queue.
        self.ch = declare_queue(self.ch, self.temp, self._channel)
        self._unbind(name, self.queue.bindings)
        moved = self._move(name, self.temp.name)
        self.ch.queue_delete(name, if_empty=True)
        log.info("%s: %d message(s) moved to %s; the classic queue is deleted", name, moved, self.temp.name)
        # A new channel for the quorum queue of the same name: RabbitMQ 3.10's channel keeps the
        # deleted classic queue's state under that name, and its next publish there crashes the
        # channel (541 INTERNAL_ERROR, measured).
        self.ch.close()
        self.ch = declare_queue(self._channel(), self.queue, self._channel)
        self._back()
        return Migrated(name, Result.MIGRATED, moved)

    def _back(self) -> int:
        """The quorum queue is declared and bound: unbind the temporary one, empty and delete it."""
        self._unbind(self.temp.name, self.temp.bindings)
        moved = self._move(self.temp.name, self.queue.name)
        # Unbound, so nothing arrives any more; quorum queues have no if-empty delete: count.
        left = int(self.ch.queue_declare(self.temp.name, passive=True).method.message_count)
        if left:
            moved += self._move(self.temp.name, self.queue.name)
        self.ch.queue_delete(self.temp.name)
        return moved

    def _unbind(self, queue: str, bindings: tuple[Binding, ...]) -> None:
        for binding in bindings:
            self.ch.queue_unbind(queue, binding.exchange.name, binding.routing_key)

    def _move(self, source: str, target: str) -> int:
        """Every message of ``source`` to ``target``: published, confirmed, then acknowledged."""
        self.ch.exchange_declare(
            MOVE_EXCHANGE.name, MOVE_EXCHANGE.type.value, durable=False, auto_delete=False
        )
        self.ch.queue_bind(target, MOVE_EXCHANGE.name, target)
        moved = 0
        try:
            while True:
                method, props, body = self.ch.basic_get(source, auto_ack=False)
                if method is None:
                    return moved
                tag: int = method.delivery_tag
                self._publish(target, props, body, functools.partial(self.ch.basic_nack, tag))
                self.ch.basic_ack(tag)
                moved += 1
        finally:
            if self.ch.is_open:
                self.ch.queue_unbind(target, MOVE_EXCHANGE.name, target)
                self.ch.exchange_delete(MOVE_EXCHANGE.name)

    def _publish(
        self, target: str, props: pika.BasicProperties, body: bytes, give_back: Callable[[], None]
    ) -> None:
        try:
            self.ch.basic_publish(MOVE_EXCHANGE.name, target, body, props, mandatory=True)
        except pika.exceptions.NackError:
            give_back()
            raise TransportError(
                f"queue {target} refused a message (full?); nothing is lost: run the migration again",
                retryable=False,
            ) from None
        except pika.exceptions.ChannelClosedByBroker as exc:
            hint = (
                ": the message carries another login's user_id; run the migration as a login with the"
                " impersonator tag (rabbitmqctl set_user_tags LOGIN administrator impersonator)"
                if "user_id" in (exc.reply_text or "")
                else ""
            )
            raise TransportError(
                f"the broker refused to move a message to {target}: {exc.reply_code} {exc.reply_text}{hint};"
                " nothing is lost: run the migration again",
                retryable=False,
            ) from None


def migrating_queue(queue: str) -> str:
    """The temporary queue of ``queue`` while it is migrated."""
    return queue + MIGRATING_SUFFIX
