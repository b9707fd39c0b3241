"""The AMQP transport against the real broker with the real API dispatcher: reconnection after
the broker drops every connection, and malformed messages on the API queue going to the
dead-letter queue. (tests/contract checks the same semantics on both transports with test
handlers; this module checks them with the fleet's own queue and dispatcher.)"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import unquote, urlparse

import pika
import pytest
from cutproxy import CHANNEL_OPEN, cutting_proxy
from vfsupport import free_port, wait_until

from common.errors import InvalidRequest, TransportError
from common.messages import api
from common.messages.descriptor import Side
from common.messages.envelope import Envelope, decode_envelope
from common.transport import amqp
from common.transport.amqp import AmqpTransport, ConsumerServer
from common.transport.rpc import Dispatcher, HandlerTable, request, unwrap
from common.transport.topology import (
    API_QUEUE,
    DEAD_LETTER_EXCHANGE,
    DEAD_LETTER_QUEUE,
    HEARTBEATS_QUEUE,
    REPORTS_QUEUE,
    declare,
)

pytestmark = pytest.mark.broker


def _ping_dispatcher(calls: list[str]) -> Dispatcher:
    """The API's dispatcher with ``api.ping`` only, noting each call in ``calls``."""

    def ping(_body: api.Empty) -> api.Empty:
        calls.append("ping")
        return api.Empty()

    table = HandlerTable(Side.CONTROLLER)
    table.register(api.API_PING, ping)
    return Dispatcher("test-controller", table)


@pytest.fixture
def server(vhost_url: str) -> Iterator[ConsumerServer]:
    transport = AmqpTransport(vhost_url, "test-api")
    srv = transport.consumer(API_QUEUE, _ping_dispatcher([]), name="test-api", prefetch=4)
    srv.start()
    assert srv.ready.wait(30)
    yield srv
    srv.stop()
    transport.close()


def _ping(transport: AmqpTransport) -> api.Empty:
    env = request(api.API_PING, api.Empty(), "test", timeout=20)
    return unwrap(transport.call("", API_QUEUE.name, env, 20, persistent=False), api.API_PING)


def _close_all_connections(vhost_url: str) -> None:
    vhost = unquote(urlparse(vhost_url).path.lstrip("/"))
    subprocess.run(
        ["rabbitmqctl", "-q", "close_all_connections", "--vhost", vhost, "test: broker drops everyone"],
        check=True,
        capture_output=True,
        timeout=60,
    )


def test_server_and_client_recover_after_the_broker_drops_all_connections(
    server: ConsumerServer, transport: AmqpTransport, vhost_url: str
) -> None:
    assert _ping(transport) == api.Empty()
    reconnects_before = server.reconnects
    _close_all_connections(vhost_url)
    wait_until(lambda: server.reconnects > reconnects_before, 30, "the server to notice the drop")
    wait_until(server.healthy, 30, "the server to reconnect and consume again")
    # The client's connection was dropped too: the call reconnects and re-publishes.
    assert _ping(transport) == api.Empty()


def test_a_connection_lost_inside_the_reply_step_is_noticed_and_the_request_answered_again(
    transport: AmqpTransport, vhost_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The connection dies while the server's consumer thread opens its reply channel (inside its
    finishing step, itself inside pika's event loop): pika raises there and closes the loop. The
    server must treat that as any lost connection -- reconnect, and answer the request the broker
    redelivers. (Before: the next tick raised ValueError from pika's closed timer, the consumer
    thread died without a word, and every later request waited for its timeout; seen once in a
    dozen runs of tests/chaos/test_broker_cluster.py.)"""
    handled: list[str] = []
    with cutting_proxy() as proxy:
        proxied = AmqpTransport(vhost_url.replace(":5672/", f":{proxy.port}/"), "test-cut")
        srv = proxied.consumer(API_QUEUE, _ping_dispatcher(handled), name="test-cut")
        srv.start()
        try:
            assert srv.ready.wait(30)
            # The server opens its reply channel with its first reply: the connection dies there.
            proxy.cut_at(CHANNEL_OPEN)
            assert _ping(transport) == api.Empty()
            assert proxy.cut.is_set(), "the proxy never saw the reply channel open"
            assert handled == ["ping", "ping"], "the request was not redelivered and handled again"
            assert srv.reconnects == 1
            # ... as a lost connection, not through the last-resort catch for defects
            assert "consumer failed" not in caplog.text
            wait_until(srv.healthy, 30, "the server to consume again")
            assert _ping(transport) == api.Empty()
        finally:
            srv.stop(timeout=1)
            proxied.close()


def test_an_unexpected_error_in_the_consumer_loop_is_logged_and_the_server_starts_over(
    vhost_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A defect that raises something other than a broker error in the consumer's thread must not
    end that thread (the process would stay up, deaf to its queue): it is logged with its
    traceback and the server connects again."""
    real_connect = amqp.connect
    failures = ["a defect"]

    def connect_failing_once(*args: Any, **kwargs: Any) -> Any:
        if failures:
            raise RuntimeError(failures.pop())
        return real_connect(*args, **kwargs)

    monkeypatch.setattr(amqp, "connect", connect_failing_once)
    srv = AmqpTransport(vhost_url, "test-defect").consumer(
        API_QUEUE, Dispatcher("test-controller", HandlerTable(Side.CONTROLLER)), name="test-defect"
    )
    srv.start()
    try:
        assert srv.ready.wait(30), "the consumer thread did not survive the error"
        assert srv.reconnects == 1
        assert "RuntimeError: a defect" in caplog.text
    finally:
        srv.stop(timeout=1)


def test_a_list_of_broker_urls_goes_on_to_a_live_node(server: ConsumerServer, vhost_url: str) -> None:
    """The first URL is dead (a cluster node down): calls and consumers use the next one, with
    the first URL's login and virtual host."""
    assert ":5672/" in vhost_url
    urls = f"{vhost_url.replace(':5672/', f':{free_port()}/')},amqp://127.0.0.1:5672"
    client = AmqpTransport(urls, "test-url-list")
    other = AmqpTransport(urls, "test-url-list-consumer").consumer(
        API_QUEUE, Dispatcher("second-controller", HandlerTable(Side.CONTROLLER)), name="second"
    )
    try:
        assert _ping(client) == api.Empty()
        other.start()
        assert other.ready.wait(30)
        assert client.consumer_count(API_QUEUE.name) == 2
    finally:
        other.stop(timeout=1)
        client.close()


class DeadLetterTap:
    def __init__(self, url: str) -> None:
        self.conn = pika.BlockingConnection(pika.URLParameters(url))
        self.ch = self.conn.channel()
        declare(self.ch, DEAD_LETTER_QUEUE)
        self.queue = self.ch.queue_declare("", exclusive=True).method.queue
        self.ch.queue_bind(self.queue, DEAD_LETTER_EXCHANGE.name, "")

    def wait_for(self, body: bytes, timeout: float = 20) -> dict[str, object]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            method, props, got = self.ch.basic_get(self.queue, auto_ack=True)
            if method is not None and got == body:
                return dict(props.headers or {})
            if method is None:
                self.conn.sleep(0.05)
        raise AssertionError("the message never reached the dead-letter exchange")

    def close(self) -> None:
        self.conn.close()


def test_garbage_on_the_api_queue_is_dead_lettered_and_the_server_carries_on(
    server: ConsumerServer, transport: AmqpTransport, vhost_url: str
) -> None:
    tap = DeadLetterTap(vhost_url)
    # Bytes that are not an envelope cannot go through the transport: publish them raw.
    publisher = pika.BlockingConnection(pika.URLParameters(vhost_url))
    try:
        garbage = b"\xc1 this is not msgpack " + str(time.time()).encode()
        publisher.channel().basic_publish("", API_QUEUE.name, garbage)
        headers = tap.wait_for(garbage)
        death = headers["x-death"]
        assert isinstance(death, list)
        assert death[0]["reason"] == b"rejected" or death[0]["reason"] == "rejected"
        assert death[0]["count"] == 1  # rejected once, not requeued in a loop
        assert _ping(transport) == api.Empty()
    finally:
        publisher.close()
        tap.close()


def test_a_body_that_does_not_fit_the_schema_gets_an_error_reply_and_is_dead_lettered(
    server: ConsumerServer, transport: AmqpTransport, vhost_url: str
) -> None:
    tap = DeadLetterTap(vhost_url)
    try:
        # API_HOST_SHOW needs {"host": str}; send a number instead, through the real client.
        env = Envelope(
            kind=api.API_HOST_SHOW.kind, body={"host": 42}, sender="test", expires_at=time.time() + 20
        )
        reply = transport.call("", API_QUEUE.name, env, 20, persistent=False)
        with pytest.raises(InvalidRequest, match=r"body\.host: expected a string"):
            unwrap(reply, api.API_HOST_SHOW)
        dead = decode_envelope(_wait_dead(tap, env.id))
        assert dead.id == env.id
    finally:
        tap.close()


def _wait_dead(tap: DeadLetterTap, msg_id: str, timeout: float = 20) -> bytes:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        method, props, body = tap.ch.basic_get(tap.queue, auto_ack=True)
        if method is not None and props.message_id == msg_id:
            return bytes(body)
        if method is None:
            tap.conn.sleep(0.05)
    raise AssertionError(f"message {msg_id} never reached the dead-letter exchange")


def test_the_reports_and_heartbeats_queues_of_the_previous_release_are_replaced(
    transport: AmqpTransport, vhost_url: str
) -> None:
    # What the previous release declared: a queue TTL, and no dead-lettering for heartbeats.
    old = pika.BlockingConnection(pika.URLParameters(vhost_url))
    try:
        ch = old.channel()
        for queue in (REPORTS_QUEUE, HEARTBEATS_QUEUE, API_QUEUE):
            ch.queue_delete(queue.name)  # other tests of the module declared today's
        ch.queue_declare(REPORTS_QUEUE.name, durable=True, arguments={"x-message-ttl": 120_000})
        ch.queue_declare(HEARTBEATS_QUEUE.name, durable=True, arguments={"x-message-ttl": 30_000})
        ch.queue_declare(API_QUEUE.name, durable=True, arguments={"x-message-ttl": 1})
    finally:
        old.close()
    try:
        consumer = transport.consumer(
            HEARTBEATS_QUEUE, Dispatcher("test", HandlerTable(Side.CONTROLLER)), name="test-heartbeats"
        )
        consumer.start()
        try:
            assert consumer.ready.wait(30)
        finally:
            consumer.stop()
        transport.declare(REPORTS_QUEUE)
        transport.declare(HEARTBEATS_QUEUE)  # now declared as this release wants: no error
        # The API queue holds requests: never deleted, the operator is told what differs.
        with pytest.raises(TransportError, match=r"virtfleet\.api.*'x-message-ttl'"):
            transport.declare(API_QUEUE)
    finally:
        cleanup = pika.BlockingConnection(pika.URLParameters(vhost_url))
        cleanup.channel().queue_delete(API_QUEUE.name)
        cleanup.close()
