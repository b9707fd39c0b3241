"""The in-memory broker's own features, beyond the transport contract (tests/contract).

What both transports must do alike is tested in tests/contract; here are the broker-side tools
tests rely on (inspection, faults) and the corners of RabbitMQ's behaviour it models.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import replace

import pytest

from common.errors import NotFound, TransportError
from common.messages.envelope import Envelope
from common.transport.memory import MemoryBroker, MemoryTransport, PreconditionFailed, topic_matches
from common.transport.port import Delivery, Outcome, Refused
from common.transport.topology import (
    API_QUEUE,
    DEAD_LETTER_EXCHANGE,
    DEAD_LETTER_QUEUE,
    Binding,
    Exchange,
    ExchangeType,
    Queue,
    agent_queue,
)

WAIT = 10.0


@pytest.fixture
def broker() -> Iterator[MemoryBroker]:
    made = MemoryBroker("unit")
    yield made
    made.close()


def _env(**body: object) -> Envelope:
    return Envelope(kind="test.ping", body=dict(body), sender="unit")


def _dead_lettered(name: str, **arguments: object) -> Queue:
    return Queue(name, arguments={"x-dead-letter-exchange": DEAD_LETTER_EXCHANGE.name, **arguments})


class Collect:
    def __init__(self) -> None:
        self.seen: list[Delivery] = []
        self.changed = threading.Condition()

    def __call__(self, delivery: Delivery) -> Outcome:
        with self.changed:
            self.seen.append(delivery)
            self.changed.notify_all()
        return Outcome()

    def wait(self, count: int) -> list[Delivery]:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.seen) >= count, WAIT)
            return list(self.seen)


@pytest.mark.parametrize(
    ("pattern", "key", "matches"),
    [
        ("host.report.*", "host.report.h1", True),
        ("host.report.*", "host.report.h1.x", False),
        ("host.report.*", "host.heartbeat.h1", False),
        ("host.#", "host", True),
        ("host.#", "host.a.b", True),
        ("#.h1", "host.report.h1", True),
        ("*", "", True),
        ("a.*.c", "a..c", True),
    ],
)
def test_topic_matching(pattern: str, key: str, matches: bool) -> None:
    assert topic_matches(pattern, key) is matches


def test_expired_messages_are_dead_lettered_without_anyone_looking(broker: MemoryBroker) -> None:
    transport = broker.transport("t")
    queue = _dead_lettered("q")
    transport.declare(queue)
    env = _env()
    transport.publish("", "q", env, expiration_ms=20)
    # Woken by the broker's own timer: nobody consumes, inspects or publishes meanwhile.
    assert broker.wait_for(lambda: bool(broker._queues["virtfleet.dead"].ready), WAIT)
    (dead,) = broker.dead_letters()
    assert dead.message_id == env.id
    assert dead.expiration_ms is None  # as on RabbitMQ: a dead letter does not expire again
    assert dead.headers["x-first-death-reason"] == "expired"
    assert broker.messages("q") == ()


def test_a_message_dead_lettered_twice_from_the_same_queue_counts_up(broker: MemoryBroker) -> None:
    transport = broker.transport("t")
    back = Exchange("back", ExchangeType.FANOUT)
    # Rejected messages go back into the same queue (and a copy to "watch"): RabbitMQ allows
    # that cycle because a rejection is involved, and counts it in one x-death entry.
    source = Queue("src", arguments={"x-dead-letter-exchange": "back"}, bindings=(Binding(back, ""),))
    transport.declare(source)
    transport.declare(Queue("watch", bindings=(Binding(back, ""),)))
    collected = Collect()

    def reject_twice(delivery: Delivery) -> Outcome:
        collected(delivery)
        return Outcome(dead_letter=len(collected.seen) <= 2)

    consumer = transport.consumer(source, reject_twice, name="c")
    consumer.start()
    transport.publish("", "src", _env())
    collected.wait(3)
    consumer.stop()
    first, second = broker.messages("watch")
    assert [d["count"] for d in first.headers["x-death"]] == [1]
    assert [(d["queue"], d["reason"], d["count"]) for d in second.headers["x-death"]] == [
        ("src", "rejected", 2)
    ]


def test_drop_head_dead_letters_and_reject_publish_dlx_refuses_and_dead_letters(broker: MemoryBroker) -> None:
    transport = broker.transport("t")
    transport.declare(_dead_lettered("dropping", **{"x-max-length": 1}))
    transport.declare(_dead_lettered("refusing", **{"x-max-length": 1, "x-overflow": "reject-publish-dlx"}))
    first, second = _env(n=1), _env(n=2)
    transport.publish("", "dropping", first)
    transport.publish("", "dropping", second)
    transport.publish("", "refusing", first)
    with pytest.raises(Refused):
        transport.publish("", "refusing", second)
    reasons = [
        (m.message_id, m.headers["x-first-death-queue"], m.headers["x-first-death-reason"])
        for m in broker.dead_letters()
    ]
    assert reasons == [(first.id, "dropping", "maxlen"), (second.id, "refusing", "maxlen")]


def test_arguments_it_does_not_implement_are_refused(broker: MemoryBroker) -> None:
    with pytest.raises(TransportError, match="x-queue-mode"):
        broker.transport("t").declare(Queue("q", arguments={"x-queue-mode": "lazy"}))


def test_an_exchange_redeclared_with_another_type_is_refused(broker: MemoryBroker) -> None:
    transport = broker.transport("t")
    transport.declare(Queue("a", bindings=(Binding(Exchange("x", ExchangeType.DIRECT), "k"),)))
    with pytest.raises(TransportError) as info:
        transport.declare(Queue("b", bindings=(Binding(Exchange("x", ExchangeType.FANOUT), ""),)))
    assert info.value.details == {"exchange": "x", "argument": "type"}


def test_an_exclusive_queue_belongs_to_its_connection(broker: MemoryBroker) -> None:
    owner, other = broker.transport("owner"), broker.transport("other")
    private = Queue("private", exclusive=True, auto_delete=True)
    owner.declare(private)
    with pytest.raises(TransportError, match="exclusive"):
        other.declare(private)
    owner.close()
    assert "private" not in broker.queues()


def test_kill_connections_drops_only_matching_names_and_consumers_come_back(broker: MemoryBroker) -> None:
    transport = broker.transport("ctl")
    collected = Collect()
    keep = transport.consumer(Queue("a"), collected, name="agent-1")
    drop = transport.consumer(Queue("b"), collected, name="agent-2")
    keep.start()
    drop.start()
    assert broker.kill_connections("agent-2") == 1
    assert keep.healthy()
    assert broker.wait_for(lambda: transport.consumer_count("b") == 1 and drop.healthy(), WAIT)
    transport.publish("", "b", _env())
    collected.wait(1)
    keep.stop()
    drop.stop()


def test_pause_holds_deliveries_until_resume(broker: MemoryBroker) -> None:
    transport = broker.transport("t")
    collected = Collect()
    consumer = transport.consumer(Queue("q"), collected, name="c")
    consumer.start()
    broker.pause()
    transport.publish("", "q", _env())
    assert len(broker.messages("q")) == 1 and collected.seen == []
    broker.resume()
    collected.wait(1)
    consumer.stop()


def test_user_id_is_the_transports_login(broker: MemoryBroker) -> None:
    alice = broker.transport("t", user="alice")
    collected = Collect()
    consumer = broker.transport("c").consumer(Queue("q"), collected, name="c")
    consumer.start()
    alice.publish("", "q", _env())
    assert collected.wait(1)[0].user_id == "alice"
    consumer.stop()


def test_competing_consumers_share_the_work(broker: MemoryBroker) -> None:
    transport = broker.transport("t")
    first, second = Collect(), Collect()
    consumers = [transport.consumer(Queue("q"), c, name=f"c{i}") for i, c in enumerate((first, second))]
    for c in consumers:
        c.start()
    for i in range(4):
        transport.publish("", "q", _env(i=i))
    assert len(first.wait(2)) == 2 and len(second.wait(2)) == 2
    for c in consumers:
        c.stop()


def test_brokers_are_independent_and_inspection_names_missing_queues() -> None:
    one, two = MemoryBroker("one"), MemoryBroker("two")
    try:
        one.transport("t").declare(Queue("q"))
        assert "q" in one.queues() and "q" not in two.queues()
        with pytest.raises(NotFound):
            two.messages("q")
        assert two.queue_state("q") is None
    finally:
        one.close()
        two.close()


def test_a_closed_broker_refuses_new_work_and_consumers_do_not_retry_forever(broker: MemoryBroker) -> None:
    transport: MemoryTransport = broker.transport("t")
    consumer = transport.consumer(Queue("q"), Collect(), name="c")
    consumer.start()
    broker.close()
    assert not consumer.healthy()
    with pytest.raises(TransportError):
        broker.transport("late").publish("", "q", _env())
    consumer.stop()


def test_an_agent_queue_only_checks_the_controllers_exchanges_and_dead_letter_queue(
    broker: MemoryBroker,
) -> None:
    controller, agent = broker.transport("ctl", user="controller"), broker.transport("ag", user="agent-h1")
    agent.declare(agent_queue("h1"))  # a fresh broker: what is missing is declared
    assert DEAD_LETTER_QUEUE.name in broker.queues()
    broker.delete_queue(DEAD_LETTER_QUEUE.name)
    controller.declare(
        replace(DEAD_LETTER_QUEUE, arguments={**DEAD_LETTER_QUEUE.arguments, "x-max-length": 1})
    )  # another release's
    agent.declare(agent_queue("h1"))  # only checked: no 406 for the agent
    with pytest.raises(PreconditionFailed, match="x-max-length"):
        controller.declare(API_QUEUE)  # the controller, who owns it, is told


def test_replies_travel_to_a_reply_queue_named_after_the_callers_login(broker: MemoryBroker) -> None:
    server, caller = broker.transport("srv"), broker.transport("cli", user="alice")
    seen: list[Delivery] = []

    def answer(delivery: Delivery) -> Outcome:
        seen.append(delivery)
        return Outcome(reply=delivery.envelope.reply_ok({}, "srv"))

    consumer = server.consumer(Queue("q"), answer, name="c")
    consumer.start()
    try:
        reply = caller.call("", "q", _env(), 10)
        assert reply.kind == "reply"
        (delivery,) = seen
        assert delivery.user_id == "alice"
        assert delivery.reply_to is not None and delivery.reply_to.startswith("virtfleet.reply.alice.")
        assert broker.queue_state(delivery.reply_to) is not None  # bound to the replies exchange
    finally:
        consumer.stop()
