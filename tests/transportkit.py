"""What the contract tests need beside the port: raw access to the broker behind a transport.

A :class:`Kit` wraps one transport under test (memory or AMQP) with the few broker-side tools
the port deliberately lacks: publishing bytes that are not an envelope, taking raw messages
(with their dead-letter headers) off a queue, counting ready messages, deleting a queue and
dropping every connection. Each kit gives its test unique names, so AMQP tests can share one
vhost.
"""

from __future__ import annotations

import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import unquote, urlparse

import pika

from common.messages.envelope import Envelope, new_id
from common.transport.amqp import AmqpTransport
from common.transport.memory import MemoryBroker
from common.transport.port import Delivery, Outcome, Transport
from common.transport.topology import MAX_MESSAGE_BYTES, Binding, Exchange, ExchangeType, Queue

#: Upper bound for things that normally take milliseconds (generous: CI machines get loaded).
WAIT = 20.0


@dataclass(frozen=True)
class Raw:
    """A message as taken off a queue, headers made plain (bytes -> str, no timestamps)."""

    body: bytes
    headers: dict[str, Any]
    message_id: str | None
    redelivered: bool

    @property
    def death(self) -> dict[str, Any]:
        """The newest x-death entry."""
        deaths = self.headers["x-death"]
        assert isinstance(deaths, list)
        first = deaths[0]
        assert isinstance(first, dict)
        return first


def plain(value: Any) -> Any:
    """Header values as plain Python: str instead of bytes, ints instead of pika longs."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items() if k != "time"}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return int(value)
    return value


class Kit(Protocol):
    kind: str
    transport: Transport

    def new_transport(self, name: str, *, max_message_bytes: int = MAX_MESSAGE_BYTES) -> Transport: ...

    def publish_raw(self, exchange: str, routing_key: str, body: bytes) -> None: ...

    def take(self, queue: str, count: int = 1, *, timeout: float = WAIT) -> list[Raw]: ...

    def ready_count(self, queue: str) -> int: ...

    def delete_queue(self, queue: str) -> None: ...

    def drop_connections(self) -> None: ...

    def close(self) -> None: ...


def eventually(predicate: Callable[[], Any], what: str, timeout: float = WAIT) -> Any:
    """Wait until ``predicate()`` is truthy (broker state has no event to wait on)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value {value!r}")
        time.sleep(0.005)


class MemoryKit:
    kind = "memory"

    def __init__(self) -> None:
        self.broker = MemoryBroker("contract")
        self._transports: list[Transport] = []
        self.transport = self.new_transport("kit")

    def new_transport(self, name: str, *, max_message_bytes: int = MAX_MESSAGE_BYTES) -> Transport:
        transport = self.broker.transport(name, max_message_bytes=max_message_bytes)
        self._transports.append(transport)
        return transport

    def publish_raw(self, exchange: str, routing_key: str, body: bytes) -> None:
        self.broker.publish_raw(exchange, routing_key, body)

    def take(self, queue: str, count: int = 1, *, timeout: float = WAIT) -> list[Raw]:
        taken: list[Raw] = []

        def got_all() -> bool:
            while len(taken) < count:
                message = self.broker.get(queue)
                if message is None:
                    return False
                taken.append(
                    Raw(message.body, plain(dict(message.headers)), message.message_id, message.redelivered)
                )
            return True

        deadline = time.monotonic() + timeout
        # wait_for looks once more after its timeout; only an answer before it counts.
        found = self.broker.wait_for(got_all, timeout)
        assert found and time.monotonic() < deadline, f"{len(taken)} of {count} messages on {queue}"
        return taken

    def ready_count(self, queue: str) -> int:
        return len(self.broker.messages(queue))

    def delete_queue(self, queue: str) -> None:
        self.broker.delete_queue(queue)

    def drop_connections(self) -> None:
        self.broker.kill_connections("")

    def close(self) -> None:
        for transport in self._transports:
            transport.close()
        self.broker.close()


class AmqpKit:
    kind = "amqp"

    def __init__(self, url: str) -> None:
        self.url = url
        self._transports: list[Transport] = []
        self._conn: Any = None
        self._ch: Any = None
        self.transport = self.new_transport("kit")

    def new_transport(self, name: str, *, max_message_bytes: int = MAX_MESSAGE_BYTES) -> Transport:
        transport = AmqpTransport(self.url, f"contract-{name}", max_message_bytes=max_message_bytes)
        self._transports.append(transport)
        return transport

    def _channel(self) -> Any:
        if self._ch is None or not self._ch.is_open:
            if self._conn is None or not self._conn.is_open:
                self._conn = pika.BlockingConnection(pika.URLParameters(self.url))
            self._ch = self._conn.channel()
        return self._ch

    def publish_raw(self, exchange: str, routing_key: str, body: bytes) -> None:
        self._channel().basic_publish(exchange, routing_key, body)

    def take(self, queue: str, count: int = 1, *, timeout: float = WAIT) -> list[Raw]:
        taken: list[Raw] = []
        deadline = time.monotonic() + timeout
        ch = self._channel()
        while len(taken) < count:
            method, props, body = ch.basic_get(queue, auto_ack=True)
            if method is not None:
                headers = plain(dict(props.headers or {}))
                taken.append(Raw(bytes(body), headers, props.message_id, bool(method.redelivered)))
                continue
            assert time.monotonic() < deadline, f"{len(taken)} of {count} messages on {queue}"
            self._conn.sleep(0.005)
        return taken

    def ready_count(self, queue: str) -> int:
        return int(self._channel().queue_declare(queue, passive=True).method.message_count)

    def delete_queue(self, queue: str) -> None:
        self._channel().queue_delete(queue)

    def drop_connections(self) -> None:
        vhost = unquote(urlparse(self.url).path.lstrip("/"))
        subprocess.run(
            [
                "rabbitmqctl",
                "-q",
                "close_all_connections",
                "--vhost",
                vhost,
                "contract test: connections dropped",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )

    def close(self) -> None:
        for transport in self._transports:
            transport.close()
        if self._conn is not None and self._conn.is_open:
            self._conn.close()


# ------------------------------------------------------------------------------ test helpers


@dataclass
class Names:
    """Unique exchange and queue names for one test."""

    prefix: str = field(default_factory=lambda: f"ct.{uuid.uuid4().hex[:10]}")

    def exchange(self, kind: ExchangeType = ExchangeType.DIRECT, suffix: str = "x") -> Exchange:
        return Exchange(f"{self.prefix}.{suffix}", kind)

    def dead_letters(self) -> tuple[Exchange, Queue]:
        """A private dead-letter exchange and the queue that collects what it receives."""
        dlx = self.exchange(ExchangeType.FANOUT, "dlx")
        return dlx, Queue(f"{self.prefix}.dead", bindings=(Binding(dlx, ""),))

    def queue(
        self,
        suffix: str = "q",
        *,
        arguments: dict[str, Any] | None = None,
        bindings: tuple[Binding, ...] = (),
        dead_letters_to: Exchange | None = None,
        disposable: bool = False,
    ) -> Queue:
        args = dict(arguments or {})
        if dead_letters_to is not None:
            args["x-dead-letter-exchange"] = dead_letters_to.name
        return Queue(f"{self.prefix}.{suffix}", arguments=args, bindings=bindings, disposable=disposable)


def envelope(kind: str = "test.ping", **body: Any) -> Envelope:
    return Envelope(kind=kind, body=dict(body), sender="contract-test", id=new_id())


class Recorder:
    """A handler that records deliveries (and can be told how to answer), with a condition to wait on."""

    def __init__(self, answer: Callable[[Delivery], Outcome] | None = None) -> None:
        self.deliveries: list[Delivery] = []
        self._answer = answer or (
            lambda d: Outcome(reply=d.envelope.reply_ok({"echo": d.envelope.body}, "test"))
        )
        self._changed = threading.Condition()

    def __call__(self, delivery: Delivery) -> Outcome:
        with self._changed:
            self.deliveries.append(delivery)
            self._changed.notify_all()
        return self._answer(delivery)

    def wait_for(self, count: int, timeout: float = WAIT) -> list[Delivery]:
        with self._changed:
            assert self._changed.wait_for(lambda: len(self.deliveries) >= count, timeout), (
                f"{len(self.deliveries)} of {count} deliveries"
            )
            return list(self.deliveries)


class Gate:
    """Handlers block on it until the test opens it; counts who is inside."""

    def __init__(self) -> None:
        self._open = threading.Event()
        self._changed = threading.Condition()
        self.inside = 0
        self.most_inside = 0

    def enter(self) -> None:
        with self._changed:
            self.inside += 1
            self.most_inside = max(self.most_inside, self.inside)
            self._changed.notify_all()
        try:
            assert self._open.wait(WAIT * 2), "the test never opened the gate"
        finally:
            with self._changed:
                self.inside -= 1
                self._changed.notify_all()

    def handler(self, _delivery: Delivery) -> Outcome:
        """A handler that waits at the gate, then acknowledges without a reply."""
        self.enter()
        return Outcome()

    def wait_inside(self, count: int, timeout: float = WAIT) -> None:
        with self._changed:
            assert self._changed.wait_for(lambda: self.inside >= count, timeout), (
                f"{self.inside} of {count} inside"
            )

    def open(self) -> None:
        self._open.set()


@dataclass
class Consumers:
    """Consumers started by a test, stopped at its end whatever happens."""

    started: list[Any] = field(default_factory=list)

    def start(self, consumer: Any) -> Any:
        self.started.append(consumer)
        consumer.start()
        assert consumer.ready.wait(WAIT), f"{consumer.name} never became ready"
        return consumer

    def stop_all(self) -> None:
        for consumer in self.started:
            consumer.stop(timeout=1)
