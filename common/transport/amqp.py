"""AMQP transport over pika: the only module that imports pika (with its offline tool,
:mod:`common.transport.amqp_migration`).

:class:`AmqpTransport` implements :class:`~common.transport.port.Transport` (see the port's
docstring for the semantics) on top of two building blocks:

* :class:`_Session`: one BlockingConnection with one confirm-mode channel. pika connections are
  not thread-safe, so the transport keeps one session per thread. It publishes persistent or
  transient messages and waits for the broker's confirm (a nack is :class:`Refused`, a returned
  mandatory message :class:`Unroutable`), makes calls (publish ``mandatory`` and wait on a
  private reply queue; on a lost connection it reconnects with jittered backoff and publishes the
  *same* envelope again, receivers being idempotent by message id), declares and inspects queues.
* :class:`ConsumerServer`: consumes one queue (or several, each with its own handler, on one
  channel: :meth:`AmqpTransport.multi_consumer`) in its own thread and connection, runs the
  handlers in a worker pool and, from the connection's thread, publishes the reply and only then
  acknowledges (``add_callback_threadsafe``), so a crash mid-command means redelivery, not loss.
  It declares its queues on every (re)connect, reconnects forever with backoff (also when the
  broker cancels it because a queue was deleted) and exposes :attr:`ConsumerServer.last_tick`
  so a health check can prove the loop is alive.

Every pika exception is translated here into :class:`~common.errors.TransportError` (or a
subclass), once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import re
import ssl
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from typing import Any, Concatenate, ParamSpec, TypeVar

import pika
import pika.credentials
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection

from common import broker_url
from common.errors import RequestTimeout, TransportError, VirtfleetError
from common.messages.envelope import Envelope
from common.transport import topology
from common.transport.backoff import backoff_delays
from common.transport.base import PooledConsumer, Replies, check_size
from common.transport.port import Abort, Delivery, Handler, Outcome, Refused, Route, Unroutable
from common.transport.topology import Exchange, Queue

log = logging.getLogger(__name__)

CONTENT_TYPE = "application/x-msgpack"
DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"

#: Everything pika raises when the connection or channel is gone.
_PIKA_ERRORS: tuple[type[Exception], ...] = (
    pika.exceptions.AMQPError,
    ConnectionError,
    OSError,
)
#: What makes a consumer reconnect.
_RECONNECT_ERRORS: tuple[type[Exception], ...] = (TransportError, *_PIKA_ERRORS)
#: The pauses before a call publishes a request the broker refused (nacked) again: a quorum queue
#: refuses while it elects a new leader, which took about 0.5 s after a node was killed
#: (tests/chaos/test_broker_cluster.py); a full queue still refuses after them.
_REFUSAL_DELAYS = (0.25, 0.5, 1.0, 2.0)
#: How often a waiting call looks at its transport's state (closed?) between reply checks.
_WAIT_SLICE = 0.2


class _ConnectionLost(TransportError):
    """The connection or channel went away: the operation may be retried on a new one.

    Internal to this module: callers see a plain TransportError once retries are exhausted.
    """


def connect(
    url: str, name: str, *, heartbeat: int = 30, timeout: float = 5.0, first: int = 0
) -> BlockingConnection:
    """Open a BlockingConnection; TransportError when the broker cannot be reached (or, over
    TLS, when its certificate is not signed by the CA or not issued for its name).

    ``url`` may name several brokers (the nodes of a cluster, comma-separated:
    :func:`common.broker_url.split_urls`): pika tries them in turn, starting with the one at
    index ``first`` (modulo their number), and connects to the first that answers. Callers that
    reconnect after a loss pass a growing ``first``, so the next attempt starts with the next node
    rather than with the one that just failed.
    """
    every = []
    for one in _rotated(broker_url.split_urls(url), first):
        params = connection_parameters(one)
        params.heartbeat = heartbeat
        params.blocked_connection_timeout = 30
        params.socket_timeout = timeout
        params.stack_timeout = timeout + 5
        params.connection_attempts = 1
        params.client_properties = {"connection_name": name}
        every.append(params)
    try:
        return BlockingConnection(every)
    except _PIKA_ERRORS as exc:
        raise TransportError(
            f"cannot connect to the message broker at {safe_url(url)}: {_describe(exc)}"
        ) from exc


def _rotated(urls: list[str], first: int) -> list[str]:
    start = first % len(urls)
    return urls[start:] + urls[:start]


def connection_parameters(url: str) -> pika.URLParameters:
    """pika's parameters for ``url``, with the TLS options of :mod:`common.broker_url` applied.

    ``amqps://`` verifies the broker's certificate chain and that it was issued for the host
    name (or ``server_name``): against ``cafile`` when given, else the system's CAs. ``certfile``
    and ``keyfile`` are the client certificate the broker may require. pika's own
    ``ssl_options=`` query option is passed through as it is.
    """
    plain, tls = broker_url.split_tls_options(url)
    params = pika.URLParameters(plain)
    if not tls:
        return params
    if params.ssl_options is None:
        raise TransportError(
            f"{safe_url(url)}: {', '.join(sorted(tls))} need an amqps:// URL", retryable=False
        )
    try:
        context = ssl.create_default_context(cafile=tls.get(broker_url.CA_FILE))
        if broker_url.CERT_FILE in tls:
            context.load_cert_chain(tls[broker_url.CERT_FILE], tls.get(broker_url.KEY_FILE))
    except (OSError, ssl.SSLError) as exc:
        raise TransportError(
            f"cannot set up TLS to {safe_url(url)}: {_describe(exc)}", retryable=False
        ) from exc
    params.ssl_options = pika.SSLOptions(
        context, server_hostname=tls.get(broker_url.SERVER_NAME) or params.host
    )
    return params


def safe_url(url: str) -> str:
    """The URL (or each of several, comma-separated) without credentials and options, for messages."""
    if broker_url.SEPARATOR in url:
        return broker_url.join_urls([safe_url(one) for one in broker_url.split_urls(url)])
    params = pika.URLParameters(broker_url.split_tls_options(url)[0])
    vhost = params.virtual_host
    scheme = "amqps" if params.ssl_options is not None else "amqp"
    return f"{scheme}://{params.host}:{params.port}/{'' if vhost == '/' else vhost}"


def _user(url: str) -> str | None:
    """The login in ``url`` (the first URL's, which the others take unless they name their own):
    what the broker will authenticate, so what ``user_id`` may say."""
    first = broker_url.split_urls(url)[0]
    credentials = pika.URLParameters(broker_url.split_tls_options(first)[0]).credentials
    return credentials.username if isinstance(credentials, pika.credentials.PlainCredentials) else None


def _describe(exc: BaseException) -> str:
    text = str(exc) or repr(exc)
    return f"{type(exc).__name__}: {text}"


def _properties(
    env: Envelope,
    *,
    persistent: bool,
    reply_to: str | None = None,
    expiration_ms: int | None = None,
    user_id: str | None = None,
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
        # RabbitMQ refuses a user_id that is not the connection's login, so a consumer can
        # trust it (the trust model's broker-authenticated identity).
        user_id=user_id,
    )


# ------------------------------------------------------------------------------ declarations


_INEQUIVALENT = re.compile(r"inequivalent arg '([^']+)'")


def declare_queue(
    ch: BlockingChannel, queue: Queue, reopen: Callable[[], BlockingChannel]
) -> BlockingChannel:
    """``topology.declare`` on ``ch``; returns the channel to go on with.

    A dependency the queue does not own is checked with a passive declaration first and declared
    only when missing (a 404 closes the channel: ``reopen`` gives another). A ``406
    PRECONDITION_FAILED`` (the queue exists with other arguments, declared by another release)
    closes the channel: for a ``disposable`` queue, a new channel from ``reopen`` deletes the
    queue and declares it again; otherwise a non-retryable TransportError names the queue and the
    argument. Connection failures propagate as pika exceptions.
    """
    for step in topology.declarations(queue):
        try:
            ch = _run_step(ch, step, reopen)
        except pika.exceptions.ChannelClosedByBroker as exc:
            if _dead_letters_unavailable(exc, step):
                ch = reopen()
                continue
            return _refused(exc, step, ch, queue, reopen)
    return ch


def _dead_letters_unavailable(exc: pika.exceptions.ChannelClosedByBroker, step: topology.Declaration) -> bool:
    """Whether the broker refused only because ``virtfleet.dead`` (a classic queue, see
    topology.py) lives on a cluster node that is down (404, "home node ... is down"). Tolerated,
    with a warning: the queue is no request's path, and a consumer must come back on the live
    nodes; dead letters are dropped until that node returns."""
    if exc.reply_code != 404 or step.name != topology.DEAD_LETTER_QUEUE.name or step.what == "exchange":
        return False
    log.warning(
        "dead-letter queue %s unavailable (%s); going on without it: dead letters are dropped until its node is back",
        step.name,
        exc.reply_text,
    )
    return True


def _run_step(
    ch: BlockingChannel, step: topology.Declaration, reopen: Callable[[], BlockingChannel]
) -> BlockingChannel:
    """``topology.run_step`` with pika's way of saying "missing": a passive declaration's 404,
    which closes the channel."""
    if step.exists is not None:
        try:
            step.exists(ch)
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code != 404:
                raise
            ch = reopen()
        else:
            return ch
    step.run(ch)
    return ch


def _refused(
    exc: pika.exceptions.ChannelClosedByBroker,
    step: topology.Declaration,
    ch: BlockingChannel,
    queue: Queue,
    reopen: Callable[[], BlockingChannel],
) -> BlockingChannel:
    """What :func:`declare_queue` does when the broker refuses ``step`` of declaring ``queue``."""
    match = _INEQUIVALENT.search(exc.reply_text or "")
    argument = match.group(1) if match else None
    if exc.reply_code == 406 and step.what == "queue" and step.name == queue.name and queue.disposable:
        log.warning(
            "queue %s exists with other arguments (%s); its messages are disposable: "
            "deleting it and declaring it again",
            queue.name,
            exc.reply_text,
        )
        ch = reopen()
        ch.queue_delete(queue.name)
        # Once only: should the broker refuse again, the error is the plain one.
        return declare_queue(ch, dataclasses.replace(queue, disposable=False), reopen)
    if exc.reply_code == 406 and argument == "x-queue-type" and step.what == "queue":
        raise TransportError(
            topology.queue_type_refused(step.name),
            retryable=False,
            details={step.what: step.name, "argument": argument},
        ) from None
    if exc.reply_code == 406:
        raise TransportError(
            f"{step.what} {step.name} exists with other arguments"
            f"{f' ({argument!r} differs)' if argument else ''}, declared by another release? "
            f"The broker said: {exc.reply_text}",
            retryable=False,
            details={step.what: step.name, "argument": argument},
        ) from None
    raise TransportError(
        f"cannot declare {step.what} {step.name}: {exc.reply_code} {exc.reply_text}",
        retryable=False,
    ) from None


# ------------------------------------------------------------------------------ client session


class _Session:
    """One connection + one confirm-mode channel, reopened on demand; used by one thread at a time.

    ``closing`` (the owning transport's) makes a waiting call give up.
    """

    def __init__(
        self,
        url: str,
        name: str,
        *,
        closing: threading.Event | None = None,
        max_message_bytes: int = topology.MAX_MESSAGE_BYTES,
    ) -> None:
        self.url = url
        self.name = name
        self.max_message_bytes = max_message_bytes
        self.user_id = _user(url)
        self.conn: BlockingConnection | None = None
        self.ch: BlockingChannel | None = None
        #: held by the thread using the session, so that another thread may close it safely
        self.lock = threading.Lock()
        self._closing = closing or threading.Event()
        self._reply_queue = ""
        self._replies = Replies(name)
        #: connections lost so far: where the next connection starts in a list of broker URLs
        self._losses = 0

    # -- connection -----------------------------------------------------------------------
    def ensure(self) -> BlockingChannel:
        """The open channel; reconnects (or reopens only the channel); _ConnectionLost if it cannot."""
        if self.ch is not None and self.ch.is_open:
            return self.ch
        if self.conn is None or not self.conn.is_open:
            self.close()
            try:
                self.conn = connect(self.url, self.name, first=self._losses)
            except TransportError as exc:
                raise _ConnectionLost(exc.message) from exc
        try:
            self.ch = self.conn.channel()
            self.ch.confirm_delivery()
            self._reply_queue = ""  # replies were consumed on the old channel
        except _PIKA_ERRORS as exc:
            self.close()
            raise _ConnectionLost(f"cannot open a channel: {_describe(exc)}") from exc
        return self.ch

    def _drop_channel(self) -> None:
        ch, self.ch = self.ch, None
        self._reply_queue = ""  # it was consumed on that channel
        if ch is not None and ch.is_open:
            with contextlib.suppress(*_PIKA_ERRORS):
                ch.close()

    def lost(self) -> None:
        """Close after a lost connection: the next connection starts with the next broker URL."""
        self._losses += 1
        self.close()

    def close(self) -> None:
        conn, self.conn, self.ch = self.conn, None, None
        self._reply_queue = ""
        if conn is not None and conn.is_open:
            with contextlib.suppress(*_PIKA_ERRORS):
                conn.close()

    def _retrying(self, what: str, op: Callable[[], Any], retries: int) -> Any:
        """Run ``op``, reconnecting with backoff on a lost connection ``retries`` times."""
        delays = backoff_delays()
        for attempt in range(retries + 1):
            try:
                return op()
            except _ConnectionLost as exc:
                self.lost()
                if attempt == retries or self._closing.is_set():
                    raise TransportError(f"{what} failed: {exc.message}") from exc
                delay = next(delays)
                log.warning("%s: %s failed (%s); retrying in %.1fs", self.name, what, exc.message, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    # -- publishing -----------------------------------------------------------------------
    def _publish_once(
        self, exchange: str, routing_key: str, body: bytes, props: pika.BasicProperties, *, mandatory: bool
    ) -> None:
        ch = self.ensure()
        where = f"{exchange or '(default exchange)'}/{routing_key}"
        try:
            ch.basic_publish(exchange, routing_key, body, props, mandatory=mandatory)
        except pika.exceptions.UnroutableError:
            raise Unroutable(f"no queue is bound for {where}") from None
        except pika.exceptions.NackError:
            # A full queue (x-overflow reject-publish), or a quorum queue whose leader was lost:
            # RabbitMQ 3.10 then nacks every later publish on this channel even once a new leader
            # is elected (measured: 16 s and counting, while a new channel publishes 0.5 s after the
            # kill). So the next publish gets a new channel; the connection stays.
            self._drop_channel()
            raise Refused(
                f"the broker refused the message for {where} (a full queue, or a queue whose "
                "broker node was lost and is failing over); retry"
            ) from None
        except pika.exceptions.ChannelClosedByBroker as exc:
            # No such exchange (404), no permission (403), a forged user_id (406): retrying
            # cannot help. ensure() opens a new channel next time.
            raise TransportError(
                f"the broker refused the publish to {where}: {exc.reply_code} {exc.reply_text}",
                retryable=False,
            ) from None
        except _PIKA_ERRORS as exc:
            raise _ConnectionLost(_describe(exc)) from exc

    def publish(
        self,
        exchange: str,
        routing_key: str,
        env: Envelope,
        *,
        persistent: bool = False,
        mandatory: bool = False,
        expiration_ms: int | None = None,
        retries: int = 3,
    ) -> None:
        """Publish and wait for the broker's confirm; TransportError after ``retries`` reconnects
        (InvalidRequest, nothing sent, when it is over ``max_message_bytes``)."""
        body = check_size(
            env.encode(), self.max_message_bytes, f"{exchange or '(default exchange)'}/{routing_key}"
        )
        props = _properties(env, persistent=persistent, expiration_ms=expiration_ms, user_id=self.user_id)
        self._retrying(
            f"publish to {exchange}/{routing_key}",
            lambda: self._publish_once(exchange, routing_key, body, props, mandatory=mandatory),
            retries,
        )

    def process_events(self) -> None:
        """Service heartbeats on an idle connection (call now and then from the owning thread)."""
        if self.conn is not None and self.conn.is_open:
            try:
                self.conn.process_data_events(time_limit=0)
            except _PIKA_ERRORS:
                self.close()

    # -- queues ---------------------------------------------------------------------------
    def declare(self, queue: Queue, *, retries: int = 3) -> None:
        """Declare ``queue`` (see :func:`declare_queue`)."""

        def once() -> None:
            ch = self.ensure()
            try:
                self.ch = declare_queue(ch, queue, self._new_channel)
            except _PIKA_ERRORS as exc:
                raise _ConnectionLost(_describe(exc)) from exc

        self._retrying(f"declaring {queue.name}", once, retries)

    def declare_exchange(self, exchange: Exchange, *, retries: int = 3) -> None:
        """Make sure ``exchange`` exists: checked, declared only when missing."""
        step = topology.ensure_exchange(exchange)

        def once() -> None:
            ch = self.ensure()
            try:
                self.ch = _run_step(ch, step, self._new_channel)
            except pika.exceptions.ChannelClosedByBroker as exc:
                raise TransportError(
                    f"cannot declare exchange {exchange.name}: {exc.reply_code} {exc.reply_text}",
                    retryable=False,
                ) from None
            except _PIKA_ERRORS as exc:
                raise _ConnectionLost(_describe(exc)) from exc

        self._retrying(f"declaring exchange {exchange.name}", once, retries)

    def _new_channel(self) -> BlockingChannel:
        self.ch = None
        return self.ensure()

    def consumer_count(self, queue: str, *, retries: int = 3) -> int | None:
        """Consumers on ``queue``, or None when the queue does not exist."""

        def once() -> int | None:
            ch = self.ensure()
            try:
                result = ch.queue_declare(queue, passive=True)
            except pika.exceptions.ChannelClosedByBroker as exc:
                if exc.reply_code == 404:
                    return None  # the channel is closed; ensure() opens another next time
                raise TransportError(
                    f"cannot inspect queue {queue}: {exc.reply_code} {exc.reply_text}", retryable=False
                ) from None
            except _PIKA_ERRORS as exc:
                raise _ConnectionLost(_describe(exc)) from exc
            return int(result.method.consumer_count)

        count: int | None = self._retrying(f"inspecting queue {queue}", once, retries)
        return count

    # -- calls ----------------------------------------------------------------------------
    def _reply_to(self) -> str:
        """This connection's private reply queue, declared on first use."""
        ch = self.ensure()
        if not self._reply_queue:
            queue = topology.reply_queue(self.user_id or "anonymous", uuid.uuid4().hex)
            try:
                ch = declare_queue(ch, queue, self._new_channel)
                ch.basic_consume(queue.name, self._on_reply, auto_ack=True)
            except TransportError as exc:
                raise TransportError(f"cannot declare a reply queue: {exc.message}", retryable=False) from exc
            except _PIKA_ERRORS as exc:
                raise _ConnectionLost(f"cannot declare a reply queue: {_describe(exc)}") from exc
            self.ch = ch
            self._reply_queue = queue.name
        return self._reply_queue

    def _on_reply(self, _ch: Any, _method: Any, _props: pika.BasicProperties, body: bytes) -> None:
        self._replies.offer(body)

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
        """Send ``env`` and return the reply envelope.

        Raises RequestTimeout when no reply came within ``timeout`` seconds, TransportError
        when the broker stayed unreachable, Refused when the broker still refused the request after
        the pauses of ``_REFUSAL_DELAYS`` (a full queue; a failing-over one accepts it again), and
        ``unroutable()`` (default :class:`Unroutable`) when no queue is bound for ``routing_key``.
        ``abort.error`` when ``abort`` is set: the wait already runs in slices of the connection's
        I/O loop (pika's connection is not thread-safe, so nothing else may wake it), and the
        abort is looked at between slices: at most ``_WAIT_SLICE`` late.
        """
        deadline = time.monotonic() + timeout
        delays = backoff_delays()
        refusal_delays = iter(_REFUSAL_DELAYS)
        body = check_size(
            env.encode(), self.max_message_bytes, f"{exchange or '(default exchange)'}/{routing_key}"
        )
        self._replies.expect(env.id)
        try:
            while True:
                try:
                    props = _properties(
                        env,
                        persistent=persistent,
                        reply_to=self._reply_to(),
                        expiration_ms=expiration_ms,
                        user_id=self.user_id,
                    )
                    _raise_if_aborted(abort)
                    self._publish_once(exchange, routing_key, body, props, mandatory=True)
                    return self._wait(env.id, deadline, abort)
                except Unroutable:
                    if unroutable is not None:
                        raise unroutable() from None
                    raise
                except Refused:
                    # A full queue, or a quorum queue failing over to a new leader (about 0.5 s
                    # after its node is lost, measured): the same message again a few times
                    # (on a new channel) before the refusal is taken as final.
                    delay = next(refusal_delays, None)
                    if delay is None or time.monotonic() + delay >= deadline or self._closing.is_set():
                        raise
                    log.warning(
                        "%s: %s refused by the broker; publishing it again in %.2fs", self.name, env.id, delay
                    )
                    time.sleep(delay)
                except _ConnectionLost as exc:
                    self.lost()
                    delay = next(delays)
                    if time.monotonic() + delay >= deadline or self._closing.is_set():
                        raise TransportError(
                            f"lost the broker connection during a call: {exc.message}"
                        ) from exc
                    log.warning(
                        "%s: broker connection lost during a call (%s); publishing %s again in %.1fs",
                        self.name,
                        exc.message,
                        env.id,
                        delay,
                    )
                    time.sleep(delay)
        finally:
            self._replies.forget(env.id)

    def _wait(self, msg_id: str, deadline: float, abort: Abort | None) -> Envelope:
        while True:
            reply = self._replies.take(msg_id)
            if reply is not None:
                return reply
            _raise_if_aborted(abort)
            if self._closing.is_set():
                raise TransportError("the transport was closed during a call", retryable=False)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RequestTimeout("no reply within the timeout; the operation may still complete")
            if self.conn is None:
                raise _ConnectionLost("connection closed")
            try:
                self.conn.process_data_events(time_limit=min(remaining, _WAIT_SLICE))
            except _PIKA_ERRORS as exc:
                raise _ConnectionLost(_describe(exc)) from exc


def _raise_if_aborted(abort: Abort | None) -> None:
    error = None if abort is None else abort.error
    if error is not None:
        raise error


# ------------------------------------------------------------------------------ consumer


class ConsumerServer(PooledConsumer):
    """Consumes its routes' queues forever: reconnects, bounds concurrency, acks after the reply.

    Every queue is declared on every connect, with the disposable rule of :func:`declare_queue`,
    and consumed on one channel (``prefetch`` applies to each queue's consumer).
    """

    def __init__(
        self,
        url: str,
        name: str,
        routes: Sequence[Route],
        *,
        prefetch: int = 8,
        workers: int = 4,
        tick: float = 0.2,
        max_message_bytes: int = topology.MAX_MESSAGE_BYTES,
    ) -> None:
        super().__init__(
            name, routes, prefetch=prefetch, workers=workers, max_message_bytes=max_message_bytes
        )
        self.url = url
        self._user_id = _user(url)
        self._tick = tick
        self._drain_until = float("inf")
        self._thread: threading.Thread | None = None
        self._inflight: set[Future[None]] = set()
        self._lock = threading.Lock()
        #: monotonic time of the last loop iteration; a stale value means a wedged consumer.
        self.last_tick = time.monotonic()
        self.connected = False
        self._consumed = False
        #: the channel replies are published on (see :meth:`_reply`); per connection
        self._reply_channel: BlockingChannel | None = None

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        """Run the consumer loop in a daemon thread."""
        self._thread = threading.Thread(target=self.run, name=f"{self.name}-consumer", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop consuming, give in-flight work ``timeout`` seconds to finish and be acknowledged,
        then close the connection (what is still unacknowledged is redelivered)."""
        self._drain_until = time.monotonic() + timeout
        self._stop.set()
        if self._thread is not None:
            # The loop closes the connection by the deadline; the margin covers closing it.
            self._thread.join(timeout + 10)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def healthy(self, max_age: float = 10.0) -> bool:
        """True when connected and the loop ran within ``max_age`` seconds."""
        return self.connected and time.monotonic() - self.last_tick < max_age

    def run(self) -> None:
        """The loop: connect, consume, and on any failure back off and start over."""
        delays: Iterator[float] = backoff_delays()
        while not self._stop.is_set():
            try:
                self._consume_once()
            except Exception as exc:
                self.connected = False
                if not isinstance(exc, _RECONNECT_ERRORS):
                    # A defect (ours or pika's): a consumer thread that died here would leave
                    # the process up but deaf to its queues, so it is logged and started over.
                    log.exception("%s: consumer failed; reconnecting", self.name)
                if self._consumed:
                    # It was consuming before this failure: start the backoff over, so that a
                    # consumer that survived many broker restarts does not wait the maximum.
                    delays = backoff_delays()
                    self._consumed = False
                delay = next(delays)
                self.reconnects += 1
                level = (
                    logging.ERROR
                    if isinstance(exc, TransportError) and not exc.retryable
                    else logging.WARNING
                )
                log.log(
                    level,
                    "%s: broker connection lost (%s); reconnecting in %.1fs",
                    self.name,
                    exc.message if isinstance(exc, TransportError) else _describe(exc),
                    delay,
                )
                self._stop.wait(delay)

    def _consume_once(self) -> None:
        # After a failure, start with the next broker URL (a cluster's next node).
        conn = connect(self.url, self.name, first=self.reconnects)
        self._reply_channel = None
        try:
            ch = conn.channel()
            for route in self._routes:
                ch = declare_queue(ch, route.queue, conn.channel)
            # Not global: the limit applies to each consumer below, that is to each queue.
            ch.basic_qos(prefetch_count=self._prefetch)
            cancelled: list[object] = []
            # RabbitMQ cancels consumers of a deleted queue; pika would then idle silently.
            ch.add_on_cancel_callback(cancelled.append)
            finishes = FinishQueue(conn)
            tags = [
                ch.basic_consume(route.queue.name, self._on_message_for(finishes, route.handler))
                for route in self._routes
            ]
            self.connected = True
            self._consumed = True
            self.ready.set()
            log.info("%s: consuming %s", self.name, self._what())
            while not self._stop.is_set():
                if not conn.is_open:
                    # Lost inside a finishing step (see _work), whose nested flush closed pika's
                    # event loop: calling into it again would raise ValueError, not a pika error.
                    raise _ConnectionLost("connection closed")
                conn.process_data_events(time_limit=self._tick)
                self.last_tick = time.monotonic()
                if cancelled:
                    raise _ConnectionLost(
                        f"the broker cancelled a consumer of {self._what()} (queue deleted?)"
                    )
            # Graceful stop: no new deliveries; finish and acknowledge what is in flight, until
            # the deadline stop() set. Unacknowledged deliveries go back when the connection closes.
            for tag in tags:
                ch.basic_cancel(tag)
            # (A connection lost meanwhile ends the drain: what is unacknowledged goes back.)
            while self._pending() and time.monotonic() < self._drain_until and conn.is_open:
                conn.process_data_events(
                    time_limit=min(self._tick, max(0.0, self._drain_until - time.monotonic()))
                )
            if conn.is_open:
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
    def _on_message_for(
        self, finishes: FinishQueue, handler: Handler
    ) -> Callable[[BlockingChannel, Any, pika.BasicProperties, bytes], None]:
        """pika's delivery callback for one queue: its deliveries go to ``handler``."""
        return lambda ch, method, props, body: self._on_message(finishes, handler, ch, method, props, body)

    def _on_message(
        self,
        finishes: FinishQueue,
        handler: Handler,
        ch: BlockingChannel,
        method: Any,
        props: pika.BasicProperties,
        body: bytes,
    ) -> None:
        delivery = self._delivery(
            body, method.routing_key, bool(method.redelivered), props.reply_to, props.user_id
        )
        if delivery is None:
            ch.basic_nack(method.delivery_tag, requeue=False)
            return
        future = self._pool.submit(self._work, finishes, ch, method.delivery_tag, handler, delivery)
        with self._lock:
            self._inflight = {f for f in self._inflight if not f.done()}
            self._inflight.add(future)

    def _reply(self, conn: BlockingConnection, reply_to: str, reply: Envelope) -> None:
        """Publish ``reply`` on a channel of its own (from the connection's thread): when the broker
        refuses it (a reply queue this login may not publish to, 403), only that channel closes, and
        the delivery is still acknowledged on the consuming one -- never redelivered in a loop."""
        if self._reply_channel is None or not self._reply_channel.is_open:
            self._reply_channel = conn.channel()
        try:
            self._reply_channel.basic_publish(
                topology.REPLIES_EXCHANGE.name,
                reply_to,
                reply.encode(),
                _properties(reply, persistent=False, user_id=self._user_id),
            )
        except (pika.exceptions.ChannelClosedByBroker, pika.exceptions.ChannelWrongStateError) as exc:
            # A refusal closes the channel when the broker's answer arrives (the next use of it
            # raises): this reply or an earlier one was refused; a new channel next time.
            self._reply_channel = None
            log.warning("%s: reply to %s refused (%s)", self.name, reply_to, _describe(exc))

    def _work(
        self, finishes: FinishQueue, ch: BlockingChannel, tag: int, handler: Handler, delivery: Delivery
    ) -> None:
        outcome = self._outcome(handler, delivery)
        conn = finishes.conn

        def finish() -> None:
            try:
                if outcome.requeue:  # handed back unanswered (a stopping process)
                    ch.basic_nack(tag, requeue=True)
                    return
                if outcome.reply is not None and delivery.reply_to:
                    self._reply(conn, delivery.reply_to, outcome.reply)
                if outcome.dead_letter:
                    ch.basic_nack(tag, requeue=False)
                else:
                    ch.basic_ack(tag)
            except _PIKA_ERRORS as exc:
                # The broker will redeliver; the receiver's journal answers the duplicate.
                log.warning(
                    "%s: could not reply/ack (%s); the message will be redelivered", self.name, _describe(exc)
                )
                if not conn.is_open:
                    # The connection died during this step (pika noticed it in the step's own
                    # flush and closed its event loop): out of the loop, to reconnect now.
                    raise _ConnectionLost(_describe(exc)) from exc

        try:
            finishes.add(finish)
        except _PIKA_ERRORS as exc:
            log.warning(
                "%s: connection gone before ack (%s); the message will be redelivered",
                self.name,
                _describe(exc),
            )


class FinishQueue:
    """(Internal to :class:`ConsumerServer`.) The finishing steps (reply, then ack or nack) of one connection's deliveries, run by that
    connection's thread (pika is not thread-safe), several per wake-up of its loop.

    Each ``add_callback_threadsafe`` wakes the consumer's loop (a write to its pipe, a poll that
    returns, a read): workers that finish together (a batch of creates answered at once) now
    queue their steps and the first of them schedules one run of all of them.
    """

    def __init__(self, conn: BlockingConnection) -> None:
        self.conn = conn
        self._lock = threading.Lock()
        self._steps: list[Callable[[], None]] = []

    def add(self, step: Callable[[], None]) -> None:
        """Queue ``step``; raises pika's error when the connection is gone (nothing then runs)."""
        with self._lock:
            self._steps.append(step)
            if len(self._steps) > 1:
                return  # a run of the queue is scheduled and has not taken it yet
        try:
            self.conn.add_callback_threadsafe(self._run)
        except BaseException:
            with self._lock:
                self._steps.clear()  # the connection is gone: its deliveries are redelivered
            raise

    def _run(self) -> None:
        with self._lock:
            steps, self._steps = self._steps, []
        for step in steps:
            step()


# ------------------------------------------------------------------------------ transport

P = ParamSpec("P")
R = TypeVar("R")


def _on_session(method: Callable[Concatenate[_Session, P], R]) -> Callable[Concatenate[AmqpTransport, P], R]:
    """``method`` of :class:`_Session` as a method of the transport: it runs on the calling
    thread's session (see :meth:`AmqpTransport._session`)."""

    @functools.wraps(method)
    def on_session(self: AmqpTransport, /, *args: P.args, **kwargs: P.kwargs) -> R:
        with self._session() as session:
            return method(session, *args, **kwargs)

    return on_session


class AmqpTransport:
    """:class:`~common.transport.port.Transport` on RabbitMQ; shareable by every thread.

    Each thread gets its own session (connection + confirm channel), opened on first use and
    reopened after a failure; consumers have their own connections. Nothing connects until
    first used, so constructing one never fails.
    """

    def __init__(self, url: str, name: str, *, max_message_bytes: int = topology.MAX_MESSAGE_BYTES) -> None:
        self._url = url
        self.name = name
        #: the largest body published or handled (config ``max_message_bytes``)
        self.max_message_bytes = max_message_bytes
        self._local = threading.local()
        self._lock = threading.Lock()
        self._sessions: list[tuple[threading.Thread, _Session]] = []
        self._consumers: weakref.WeakSet[ConsumerServer] = weakref.WeakSet()
        self._closed = threading.Event()

    @property
    def url(self) -> str:
        """The broker URL without its credentials."""
        return safe_url(self._url)

    @contextlib.contextmanager
    def _session(self) -> Iterator[_Session]:
        if self._closed.is_set():
            raise TransportError(f"transport {self.name} is closed", retryable=False)
        session: _Session | None = getattr(self._local, "session", None)
        if session is None:
            thread = threading.current_thread()
            session = _Session(
                self._url,
                f"{self.name}:{thread.name}",
                closing=self._closed,
                max_message_bytes=self.max_message_bytes,
            )
            with self._lock:
                # Threads come and go (worker pools): close what dead threads left behind.
                for dead in [s for t, s in self._sessions if not t.is_alive()]:
                    dead.close()
                self._sessions = [(t, s) for t, s in self._sessions if t.is_alive()]
                self._sessions.append((thread, session))
            self._local.session = session
        with session.lock:
            yield session

    # Publishing, calls and declarations run on the calling thread's session, with its retries.
    declare = _on_session(_Session.declare)
    declare_exchange = _on_session(_Session.declare_exchange)
    publish = _on_session(_Session.publish)
    call = _on_session(_Session.call)
    consumer_count = _on_session(_Session.consumer_count)

    def consumer(
        self, queue: Queue, handler: Handler, *, name: str, prefetch: int = 8, workers: int = 4
    ) -> ConsumerServer:
        """A :class:`ConsumerServer` of ``queue`` on its own connection named ``name``."""
        return self.multi_consumer([Route(queue, handler)], name=name, prefetch=prefetch, workers=workers)

    def multi_consumer(
        self, routes: Sequence[Route], *, name: str, prefetch: int = 8, workers: int = 4
    ) -> ConsumerServer:
        """A :class:`ConsumerServer` of every route's queue on one connection (and channel)
        named ``name``."""
        consumer = ConsumerServer(
            self._url,
            name,
            routes,
            prefetch=prefetch,
            workers=workers,
            max_message_bytes=self.max_message_bytes,
        )
        self._consumers.add(consumer)
        return consumer

    def close(self) -> None:
        """Close every thread's connection (a call in progress gives up within a fraction of a
        second); consumers still running lose theirs, so their unacknowledged deliveries are
        redelivered: stop consumers first to let them finish."""
        self._closed.set()
        with self._lock:
            sessions, self._sessions = [s for _, s in self._sessions], []
        for session in sessions:
            # Another thread may be inside the session: wait until it lets go (it sees _closed).
            if session.lock.acquire(timeout=30):
                try:
                    session.close()
                finally:
                    session.lock.release()
            else:
                log.warning("%s: session %s stayed busy; not closed", self.name, session.name)
        for consumer in list(self._consumers):
            consumer.stop(timeout=0)


__all__ = [
    "CONTENT_TYPE",
    "DEFAULT_URL",
    "AmqpTransport",
    "ConsumerServer",
    "Delivery",
    "FinishQueue",
    "Handler",
    "Outcome",
    "backoff_delays",
    "connect",
    "declare_queue",
    "safe_url",
]
