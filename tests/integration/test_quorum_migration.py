"""A broker with an older release's classic queues: what a new controller or agent says, and
``virtfleet-controller broker migrate`` moving every queue to a quorum queue without losing a
message (also when run twice, or after an interruption)."""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Iterator
from urllib.parse import unquote, urlsplit

import pika
import pytest
from transportkit import Recorder
from vfsupport import BIN, wait_until

from common.errors import TransportError
from common.transport.amqp import AmqpTransport
from common.transport.amqp_migration import migrating_queue
from common.transport.topology import (
    API_QUEUE,
    EXCHANGES,
    REPORTS_QUEUE,
    Queue,
    agent_queue,
)

pytestmark = pytest.mark.broker

#: What an older release declared: the same queues, classic, with its arguments.
OLD_QUEUES: tuple[tuple[Queue, dict[str, object]], ...] = (
    (API_QUEUE, {"x-dead-letter-exchange": "virtfleet.dlx"}),
    (agent_queue("h1"), {"x-dead-letter-exchange": "virtfleet.dlx"}),
    (
        REPORTS_QUEUE,
        {"x-dead-letter-exchange": "virtfleet.dlx", "x-max-length": 10_000, "x-overflow": "reject-publish"},
    ),
)
PER_QUEUE = 25


@pytest.fixture
def channel(vhost_url: str) -> Iterator[pika.adapters.blocking_connection.BlockingChannel]:
    conn = pika.BlockingConnection(pika.URLParameters(vhost_url))
    ch = conn.channel()
    ch.confirm_delivery()
    yield ch
    for queue, _args in OLD_QUEUES:
        for name in (queue.name, migrating_queue(queue.name)):
            ch.queue_delete(name)
    conn.close()


def _old_release(ch: pika.adapters.blocking_connection.BlockingChannel) -> dict[str, list[str]]:
    """The classic queues of an older release, each with messages; their ids by queue."""
    for exchange in EXCHANGES:
        ch.exchange_declare(exchange.name, exchange.type.value, durable=True)
    sent: dict[str, list[str]] = {}
    for queue, args in OLD_QUEUES:
        ch.queue_delete(queue.name)
        ch.queue_declare(queue.name, durable=True, arguments=args)
        for binding in queue.bindings:
            ch.queue_bind(queue.name, binding.exchange.name, binding.routing_key)
        ids = [f"{queue.name}-{i}" for i in range(PER_QUEUE)]
        for msg_id in ids:
            ch.basic_publish(
                "",
                queue.name,
                msg_id.encode(),
                pika.BasicProperties(message_id=msg_id, delivery_mode=2, user_id="guest"),
            )
        sent[queue.name] = ids
    return sent


def _types(vhost_url: str) -> dict[str, tuple[str, int]]:
    vhost = unquote(urlsplit(vhost_url).path[1:])
    out = subprocess.run(
        ["rabbitmqctl", "-q", "list_queues", "-p", vhost, "--no-table-headers", "name", "type", "messages"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    rows = (line.split("\t") for line in out.splitlines() if line.strip())
    return {name: (kind, int(count)) for name, kind, count in rows}


def _migrate(vhost_url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            str(BIN / "virtfleet-controller"),
            "broker",
            "--amqp-url",
            vhost_url,
            "migrate",
            "--no-database",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={"PATH": "/usr/bin:/bin"},
    )


def _drain(ch: pika.adapters.blocking_connection.BlockingChannel, queue: str) -> list[str]:
    ids: list[str] = []
    while True:
        method, props, _body = ch.basic_get(queue, auto_ack=True)
        if method is None:
            return ids
        ids.append(props.message_id)


def test_a_classic_queue_is_refused_naming_the_migration_and_migrate_keeps_every_message(
    vhost_url: str,
    channel: pika.adapters.blocking_connection.BlockingChannel,
    caplog: pytest.LogCaptureFixture,
) -> None:
    sent = _old_release(channel)

    transport = AmqpTransport(vhost_url, "new-release")
    try:
        with pytest.raises(TransportError, match="virtfleet-controller broker migrate") as refused:
            transport.declare(API_QUEUE)
        assert not refused.value.retryable
    finally:
        transport.close()

    # A controller's consumer keeps saying so, retrying with backoff: not consuming, not exiting.
    consumer = AmqpTransport(vhost_url, "new-controller").consumer(API_QUEUE, Recorder(), name="api")
    with caplog.at_level(logging.ERROR, logger="common.transport.amqp"):
        consumer.start()
        wait_until(lambda: consumer.reconnects >= 2, 60, "the consumer to try twice")
        consumer.stop(timeout=1)
    assert not consumer.ready.is_set()
    assert "run `virtfleet-controller broker migrate`" in caplog.text

    done = _migrate(vhost_url, "--host", "h1")
    assert done.returncode == 0, done.stderr
    for queue, _args in OLD_QUEUES:
        assert f"{queue.name}: migrated, {PER_QUEUE} message(s) moved" in done.stdout
    types = _types(vhost_url)
    # (rabbitmqctl's message counts of quorum queues lag: the messages are counted by _drain below)
    assert {name: types[name][0] for name in sent} == dict.fromkeys(sent, "quorum")
    assert not any(name.endswith(".migrating") for name in types)

    again = _migrate(vhost_url, "--host", "h1")
    assert again.returncode == 0, again.stderr
    assert (
        again.stdout.count("quorum already") == len(OLD_QUEUES) + 2
    )  # and the API read and heartbeats queues

    # The new release declares every queue as it is now; the messages are there, in order.
    transport = AmqpTransport(vhost_url, "new-release")
    try:
        for queue, _args in OLD_QUEUES:
            transport.declare(queue)
    finally:
        transport.close()
    for name, ids in sent.items():
        assert _drain(channel, name) == ids


def test_an_interrupted_migration_is_finished_and_consumers_are_refused(
    vhost_url: str, channel: pika.adapters.blocking_connection.BlockingChannel
) -> None:
    sent = _old_release(channel)
    # Interrupted after the classic queue was deleted: the messages wait in the temporary queue.
    queue = API_QUEUE
    channel.queue_delete(queue.name)
    temp = migrating_queue(queue.name)
    channel.queue_declare(temp, durable=True, arguments=dict(queue.arguments))
    for msg_id in sent[queue.name]:
        channel.basic_publish(
            "", temp, msg_id.encode(), pika.BasicProperties(message_id=msg_id, user_id="guest")
        )

    # A consumer still on a queue: refused, nothing moved.
    other = agent_queue("h1").name
    tag = channel.basic_consume(other, lambda *_a: None)
    refused = _migrate(vhost_url, "--host", "h1")
    assert refused.returncode == 2
    assert f"queue {other} has 1 consumer(s)" in refused.stderr
    channel.basic_cancel(tag)

    done = _migrate(vhost_url, "--host", "h1")
    assert done.returncode == 0, done.stderr
    assert f"{queue.name}: finished an interrupted migration, {PER_QUEUE} message(s) moved" in done.stdout
    types = _types(vhost_url)
    assert types[queue.name][0] == "quorum" and temp not in types
    assert _drain(channel, queue.name) == sent[queue.name]
