"""An independent client written from docs/protocol.md alone meets virtfleet with no surprises.

The exchanges, queues (flags and arguments with their types) and bindings are parsed from the
Markdown only, declared with plain pika, and declared again through virtfleet's own
``topology.declare``, in both orders, on a private vhost: RabbitMQ answers any difference with
``406 PRECONDITION_FAILED``. Then messages published as the document says reach the queues it
says.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pika
import pika.exceptions
import pytest
from pika.adapters.blocking_connection import BlockingChannel
from protocoldoc import DOC, arguments, code, section, table, yes
from vfsupport import private_vhost

from common.transport import topology

pytestmark = pytest.mark.broker

#: A made-up agent; no '.' in it (the document says the report bindings match one word).
HOST = f"doc-host-{uuid.uuid4().hex[:8]}"


# ------------------------------------------------------------------ the document, read as a stranger would


@dataclass(frozen=True)
class DocQueue:
    name: str
    durable: bool
    exclusive: bool
    auto_delete: bool
    arguments: dict[str, Any]


@dataclass(frozen=True)
class Documented:
    exchanges: list[tuple[str, str]]
    queues: list[DocQueue]
    bindings: list[tuple[str, str, str]]


def _code(cell: str) -> str:
    return code(cell).replace("<host_id>", HOST)


def read_doc() -> Documented:
    text = DOC.read_text(encoding="utf-8")
    exchanges = [(_code(r["Exchange"]), _code(r["Type"])) for r in table(section(text, "exchanges"))]
    queues = [
        DocQueue(
            _code(r["Queue"]),
            yes(r["Durable"]),
            yes(r["Exclusive"]),
            yes(r["Auto-delete"]),
            arguments(r["Arguments"]),
        )
        for r in table(section(text, "queues"))
    ]
    bindings = [
        (_code(r["Exchange"]), _code(r["Routing key"]), _code(r["Queue"]))
        for r in table(section(text, "bindings"))
    ]
    return Documented(exchanges, queues, bindings)


# ------------------------------------------------------------------ the two ways of declaring


def declare_from_doc(ch: BlockingChannel) -> None:
    """What an independent client does with the document's tables (section 2)."""
    doc = read_doc()
    for name, exchange_type in doc.exchanges:
        ch.exchange_declare(name, exchange_type, durable=True)
    for q in doc.queues:
        ch.queue_declare(
            q.name, durable=q.durable, exclusive=q.exclusive, auto_delete=q.auto_delete, arguments=q.arguments
        )
    for exchange, routing_key, queue in doc.bindings:
        ch.queue_bind(queue, exchange, routing_key)


def declare_with_virtfleet(ch: BlockingChannel) -> None:
    """What the controller and an agent declare."""
    for queue in (*topology.SHARED_QUEUES, topology.agent_queue(HOST)):
        topology.declare(ch, queue)


Step = Callable[[BlockingChannel], None]


@pytest.fixture
def conn() -> Iterator[pika.BlockingConnection]:
    """A plain pika connection to a private vhost of its own."""
    with private_vhost("vfdoc") as url:
        connection = pika.BlockingConnection(pika.URLParameters(url))
        yield connection
        connection.close()


def _run(ch: BlockingChannel, step: Step) -> None:
    try:
        step(ch)
    except pika.exceptions.ChannelClosedByBroker as exc:
        pytest.fail(f"{step.__name__}: the broker refused it: {exc.reply_code} {exc.reply_text}")


def _count(conn: pika.BlockingConnection, queue: str) -> int:
    ch = conn.channel()
    count = int(ch.queue_declare(queue, passive=True).method.message_count)
    ch.close()
    return count


@pytest.mark.parametrize(
    "steps",
    [(declare_from_doc, declare_with_virtfleet), (declare_with_virtfleet, declare_from_doc)],
    ids=["doc-first", "virtfleet-first"],
)
def test_declaring_as_documented_agrees_with_virtfleet(
    conn: pika.BlockingConnection, steps: tuple[Step, Step]
) -> None:
    ch = conn.channel()
    for step in steps:
        _run(ch, step)
    # Published the way section 1 says, each message lands where the tables say.
    ch.confirm_delivery()
    routes = {
        ("virtfleet.commands", HOST): f"virtfleet.agent.{HOST}",
        ("", "virtfleet.api"): "virtfleet.api",
        ("virtfleet.reports", f"host.report.{HOST}"): "virtfleet.controller.reports",
        ("virtfleet.reports", f"host.heartbeat.{HOST}"): "virtfleet.controller.heartbeats",
        ("virtfleet.dlx", "anything"): "virtfleet.dead",
    }
    for (exchange, routing_key), _queue in routes.items():
        ch.basic_publish(exchange, routing_key, b"doc test", mandatory=True)
    for queue in routes.values():
        assert _count(conn, queue) == 1, queue


def test_a_declaration_that_differs_from_the_document_is_refused(conn: pika.BlockingConnection) -> None:
    # The check above is only worth something if a difference is noticed: a string where the
    # document says (int) is one.
    _run(conn.channel(), declare_from_doc)
    dead = next(q for q in read_doc().queues if q.name == "virtfleet.dead")
    wrong = {k: str(v) for k, v in dead.arguments.items()}
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
        conn.channel().queue_declare(dead.name, durable=True, arguments=wrong)
    assert info.value.reply_code == 406
