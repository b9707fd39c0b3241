"""AMQP transport over pika: the only module that imports pika.

Three building blocks, each owning one BlockingConnection (pika connections are not
thread-safe, so every thread that talks to the broker has its own):

* :class:`RpcClient` publishes a request (persistent, mandatory, publisher-confirmed) and
  waits on a private reply queue. When the connection drops it reconnects with jittered
  backoff and publishes the *same* envelope again; receivers are idempotent by message id.
* :class:`Publisher` publishes fire-and-forget messages (reports) with confirms.
* :class:`ConsumerServer` consumes a queue in its own thread, runs the handler in a worker
  pool and, from the connection's thread, publishes the reply and only then acknowledges
  (``add_callback_threadsafe``), so a crash mid-command means redelivery, not loss. It
  reconnects forever with backoff and exposes :attr:`ConsumerServer.last_tick` so a health
  check can prove the loop is alive.

Every pika exception is translated here into :class:`~common.errors.TransportError` (or a
subclass), once.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection

from common.errors import (
    RequestTimeout,
    TransportError,
    VirtfleetError,
)
from common.messages.envelope import Envelope, decode_envelope
from common.transport.port import Delivery, Handler, Outcome

log = logging.getLogger(__name__)

CONTENT_TYPE = "application/x-msgpack"
DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"

#: Everything pika raises when the connection or channel is gone.
_PIKA_ERRORS: tuple[type[Exception], ...] = (
    pika.exceptions.AMQPError,
    ConnectionError,
    OSError,
)
_RECONNECT_ERRORS: tuple[type[Exception], ...] = (TransportError, *_PIKA_ERRORS)


def backoff_delays(base: float = 0.2, cap: float = 10.0) -> Any:
    """Yield 'full jitter' backoff delays: random in [0, min(cap, base * 2**n)]."""
    attempt = 0
    while True:
        yield random.uniform(0, min(cap, base * (2**attempt)))  # noqa: S311 - jitter, not crypto
        attempt += 1


def connect(url: str, name: str, *, heartbeat: int = 30, timeout: float = 5.0) -> BlockingConnection:
    """Open a BlockingConnection; TransportError when the broker cannot be reached."""
    params = pika.URLParameters(url)
    params.heartbeat = heartbeat
    params.blocked_connection_timeout = 30
    params.socket_timeout = timeout
    params.stack_timeout = timeout + 5
    params.connection_attempts = 1
    params.client_properties = {"connection_name": name}
    try:
        return BlockingConnection(params)
    except _PIKA_ERRORS as exc:
        raise TransportError(
            f"cannot connect to the message broker at {_safe_url(url)}: {_describe(exc)}"
        ) from exc


def _safe_url(url: str) -> str:
    """The URL without its password, for messages."""
    params = pika.URLParameters(url)
    return f"amqp://{params.host}:{params.port}{params.virtual_host if params.virtual_host != '/' else '/'}"


def _describe(exc: BaseException) -> str:
    text = str(exc) or repr(exc)
    return f"{type(exc).__name__}: {text}"


def _properties(
    env: Envelope, *, persistent: bool, reply_to: str | None = None, expiration_ms: int | None = None
) -> pika.BasicProperties:
    return pika.BasicProperties(
        content_type=CONTENT_TYPE,
        delivery_mode=pika.DeliveryMode.Persistent if persistent else pika.DeliveryMode.Transient,
        message_id=env.id,
        correlation_id=env.correlation_id,
        reply_to=reply_to,
        type=env.kind,
        timestamp=int(env.sent_at),
        expiration=str(expiration_ms) if expiration_ms is not None else None,
    )


class _Session:
    """One connection + one confirm-mode channel, reopened on demand."""

    def __init__(self, url: str, name: str) -> None:
        self.url = url
        self.name = name
        self.conn: BlockingConnection | None = None
        self.ch: BlockingChannel | None = None

    def ensure(self) -> BlockingChannel:
        if self.conn is not None and self.conn.is_open and self.ch is not None and self.ch.is_open:
            return self.ch
        self.close()
        self.conn = connect(self.url, self.name)
        try:
            self.ch = self.conn.channel()
            self.ch.confirm_delivery()
        except _PIKA_ERRORS as exc:
            self.close()
            raise TransportError(f"cannot open a channel: {_describe(exc)}") from exc
        self.on_open(self.ch)
        return self.ch

    def on_open(self, ch: BlockingChannel) -> None:
        """Hook for subclasses: declare what this session needs."""

    def close(self) -> None:
        conn, self.conn, self.ch = self.conn, None, None
        if conn is not None and conn.is_open:
            with contextlib.suppress(*_PIKA_ERRORS):
                conn.close()


class Publisher(_Session):
    """Publishes persistent or transient messages with publisher confirms; reconnects on failure."""

    def __init__(self, url: str, name: str, declare: Callable[[BlockingChannel], None] | None = None) -> None:
        super().__init__(url, name)
        self._declare = declare

    def on_open(self, ch: BlockingChannel) -> None:
        if self._declare is not None:
            self._declare(ch)

    def publish(
        self, exchange: str, routing_key: str, env: Envelope, *, persistent: bool = False, retries: int = 3
    ) -> None:
        """Publish and wait for the broker's confirm; TransportError after ``retries`` reconnects."""
        delays = backoff_delays()
        for attempt in range(retries + 1):
            try:
                ch = self.ensure()
                ch.basic_publish(exchange, routing_key, env.encode(), _properties(env, persistent=persistent))
                return
            except TransportError:
                if attempt == retries:
                    raise
            except _PIKA_ERRORS as exc:
                self.close()
                if attempt == retries:
                    raise TransportError(
                        f"publish to {exchange}/{routing_key} failed: {_describe(exc)}"
                    ) from exc
            time.sleep(next(delays))

    def process_events(self) -> None:
        """Service heartbeats on an idle connection (call now and then from the owning thread)."""
        if self.conn is not None and self.conn.is_open:
            try:
                self.conn.process_data_events(time_limit=0)
            except _PIKA_ERRORS:
                self.close()


class RpcClient(_Session):
    """Request/reply over the broker, with at-least-once publishing of the same envelope."""

    def __init__(self, url: str, name: str) -> None:
        super().__init__(url, name)
        self._reply_queue = ""
        self._replies: dict[str, Envelope] = {}
        self._waiting: set[str] = set()

    def on_open(self, ch: BlockingChannel) -> None:
        result = ch.queue_declare("", exclusive=True, auto_delete=True)
        self._reply_queue = result.method.queue
        ch.basic_consume(self._reply_queue, self._on_reply, auto_ack=True)

    def _on_reply(self, _ch: Any, _method: Any, props: pika.BasicProperties, body: bytes) -> None:
        try:
            env = decode_envelope(body)
        except VirtfleetError as exc:
            log.warning("dropping undecodable reply: %s", exc)
            return
        if env.correlation_id in self._waiting:
            self._replies[env.correlation_id] = env
        else:
            log.debug("dropping late reply %s (%s)", env.correlation_id, props.type)

    def consumer_count(self, queue: str) -> int | None:
        """Consumers on ``queue``, or None when the queue does not exist."""
        ch = self.ensure()
        try:
            result = ch.queue_declare(queue, passive=True)
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code == 404:
                self.ch = None  # the channel is closed; reopen on next use
                self.close()
                return None
            raise TransportError(f"cannot inspect queue {queue}: {_describe(exc)}") from exc
        except _PIKA_ERRORS as exc:
            self.close()
            raise TransportError(f"cannot inspect queue {queue}: {_describe(exc)}") from exc
        return int(result.method.consumer_count)

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
    ) -> Envelope:
        """Send ``env`` and return the reply envelope.

        Raises RequestTimeout when no reply came within ``timeout`` seconds, TransportError
        when the broker stayed unreachable, and ``unroutable()`` (default TransportError)
        when no queue is bound for ``routing_key``.
        """
        deadline = time.monotonic() + timeout
        delays = backoff_delays()
        self._waiting.add(env.id)
        try:
            while True:
                try:
                    ch = self.ensure()
                    props = _properties(
                        env, persistent=persistent, reply_to=self._reply_queue, expiration_ms=expiration_ms
                    )
                    ch.basic_publish(exchange, routing_key, env.encode(), props, mandatory=True)
                    return self._wait(env.id, deadline)
                except pika.exceptions.UnroutableError:
                    if unroutable is not None:
                        raise unroutable() from None
                    raise TransportError(
                        f"no queue is bound for {exchange}/{routing_key}", retryable=False
                    ) from None
                except _RECONNECT_ERRORS as exc:
                    self.close()
                    delay = next(delays)
                    if time.monotonic() + delay >= deadline:
                        if isinstance(exc, TransportError):
                            raise
                        raise TransportError(f"lost the broker connection: {_describe(exc)}") from exc
                    log.warning(
                        "broker connection lost during a call (%s); retrying in %.1fs", _describe(exc), delay
                    )
                    time.sleep(delay)
        finally:
            self._waiting.discard(env.id)
            self._replies.pop(env.id, None)

    def _wait(self, msg_id: str, deadline: float) -> Envelope:
        assert self.conn is not None
        while True:
            reply = self._replies.pop(msg_id, None)
            if reply is not None:
                return reply
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RequestTimeout("no reply within the timeout; the operation may still complete")
            self.conn.process_data_events(time_limit=min(remaining, 0.5))


class ConsumerServer:
    """Consumes one queue forever: reconnects, bounds concurrency, acks after the reply."""

    def __init__(
        self,
        url: str,
        name: str,
        declare: Callable[[BlockingChannel], str],
        handler: Handler,
        *,
        prefetch: int = 8,
        workers: int = 4,
        tick: float = 0.2,
    ) -> None:
        self.url = url
        self.name = name
        self._declare = declare
        self._handler = handler
        self._prefetch = prefetch
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"{name}-worker")
        self._tick = tick
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._inflight: set[Future[None]] = set()
        self._lock = threading.Lock()
        self.ready = threading.Event()
        #: monotonic time of the last loop iteration; a stale value means a wedged consumer.
        self.last_tick = time.monotonic()
        self.connected = False
        self.reconnects = 0

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        """Run the consumer loop in a daemon thread."""
        self._thread = threading.Thread(target=self.run, name=f"{self.name}-consumer", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop consuming, let in-flight work finish and be acknowledged, then close."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def healthy(self, max_age: float = 10.0) -> bool:
        """True when connected and the loop ran within ``max_age`` seconds."""
        return self.connected and time.monotonic() - self.last_tick < max_age

    def run(self) -> None:
        """The loop: connect, consume, and on any failure back off and start over."""
        delays = backoff_delays()
        while not self._stop.is_set():
            try:
                self._consume_once()
                delays = backoff_delays()
            except _RECONNECT_ERRORS as exc:
                self.connected = False
                delay = next(delays)
                self.reconnects += 1
                log.warning(
                    "%s: broker connection lost (%s); reconnecting in %.1fs", self.name, _describe(exc), delay
                )
                self._stop.wait(delay)

    def _consume_once(self) -> None:
        conn = connect(self.url, self.name)
        try:
            ch = conn.channel()
            ch.basic_qos(prefetch_count=self._prefetch)
            queue = self._declare(ch)
            tag = ch.basic_consume(queue, lambda c, m, p, b: self._on_message(conn, c, m, p, b))
            self.connected = True
            self.ready.set()
            log.info("%s: consuming %s", self.name, queue)
            while not self._stop.is_set():
                conn.process_data_events(time_limit=self._tick)
                self.last_tick = time.monotonic()
            # Graceful stop: no new deliveries; finish and acknowledge what is in flight.
            ch.basic_cancel(tag)
            while self._pending():
                conn.process_data_events(time_limit=self._tick)
            conn.process_data_events(time_limit=0)
        finally:
            self.connected = False
            if conn.is_open:
                with contextlib.suppress(*_PIKA_ERRORS):
                    conn.close()

    def _pending(self) -> bool:
        with self._lock:
            return any(not f.done() for f in self._inflight)

    # -- per message -----------------------------------------------------------------
    def _on_message(
        self,
        conn: BlockingConnection,
        ch: BlockingChannel,
        method: Any,
        props: pika.BasicProperties,
        body: bytes,
    ) -> None:
        try:
            env = decode_envelope(body)
        except VirtfleetError as exc:
            # Never requeue what we cannot read: to the dead-letter queue, once.
            log.warning("%s: rejecting malformed message to the dead-letter queue: %s", self.name, exc)
            ch.basic_nack(method.delivery_tag, requeue=False)
            return
        delivery = Delivery(env, method.routing_key, bool(method.redelivered), props.reply_to)
        future = self._pool.submit(self._work, conn, ch, method.delivery_tag, delivery)
        with self._lock:
            self._inflight = {f for f in self._inflight if not f.done()}
            self._inflight.add(future)

    def _work(self, conn: BlockingConnection, ch: BlockingChannel, tag: int, delivery: Delivery) -> None:
        try:
            outcome = self._handler(delivery)
        except Exception:  # the handler should not raise; if it does, keep the consumer alive
            log.exception("%s: handler crashed on %s", self.name, delivery.envelope.kind)
            outcome = Outcome(dead_letter=True)

        def finish() -> None:
            try:
                if outcome.reply is not None and delivery.reply_to:
                    ch.basic_publish(
                        "",
                        delivery.reply_to,
                        outcome.reply.encode(),
                        _properties(outcome.reply, persistent=False),
                    )
                if outcome.dead_letter:
                    ch.basic_nack(tag, requeue=False)
                else:
                    ch.basic_ack(tag)
            except _PIKA_ERRORS as exc:
                # The broker will redeliver; the receiver's journal answers the duplicate.
                log.warning(
                    "%s: could not reply/ack (%s); the message will be redelivered", self.name, _describe(exc)
                )

        try:
            conn.add_callback_threadsafe(finish)
        except _PIKA_ERRORS as exc:
            log.warning(
                "%s: connection gone before ack (%s); the message will be redelivered",
                self.name,
                _describe(exc),
            )


__all__ = [
    "CONTENT_TYPE",
    "DEFAULT_URL",
    "ConsumerServer",
    "Delivery",
    "Handler",
    "Outcome",
    "Publisher",
    "RpcClient",
    "backoff_delays",
    "connect",
]
