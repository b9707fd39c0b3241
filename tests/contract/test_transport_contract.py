"""The transport contract: what common/transport/port.py promises, checked on both transports.

Every test runs twice, on the in-memory broker and on RabbitMQ (``kit`` in conftest.py). A
test that passes on one and fails on the other is a difference between the implementations,
which is a bug in one of them.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from transportkit import WAIT, Consumers, Gate, Kit, Names, Recorder, envelope, eventually

from common.errors import HostDown, InvalidRequest, NotFound, RequestTimeout, TransportError
from common.messages.envelope import Envelope
from common.transport.amqp import AmqpTransport
from common.transport.factory import open_transport
from common.transport.memory import MemoryBroker, MemoryTransport
from common.transport.port import Abort, Delivery, Outcome, Refused, Route, Transport, Unroutable
from common.transport.topology import (
    DEAD_LETTER_QUEUE,
    REPORTS_QUEUE,
    Binding,
    ExchangeType,
    Queue,
    agent_queue,
)

# ------------------------------------------------------------------------------ publish / consume


def test_a_published_envelope_reaches_the_handler_intact(
    kit: Kit, names: Names, consumers: Consumers
) -> None:
    exchange = names.exchange(ExchangeType.TOPIC)
    queue = names.queue(bindings=(Binding(exchange, "host.report.*"),))
    recorder = Recorder()
    consumers.start(kit.transport.consumer(queue, recorder, name="c"))
    sent = envelope(host="h1", sizes=[1, 2])

    kit.transport.publish(exchange.name, "host.report.h1", sent, persistent=True, mandatory=True)

    (delivery,) = recorder.wait_for(1)
    assert delivery.envelope == sent
    assert delivery.routing_key == "host.report.h1"
    assert delivery.redelivered is False
    assert delivery.reply_to is None
    # The broker-authenticated login, not something the message says about itself.
    assert delivery.user_id == "guest"


def test_a_transport_is_shared_by_threads_and_each_call_gets_its_own_reply(
    kit: Kit, names: Names, consumers: Consumers
) -> None:
    queue = names.queue()
    consumers.start(kit.transport.consumer(queue, Recorder(), name="echo", prefetch=8, workers=4))

    def caller(n: int) -> None:
        for i in range(5):
            request = envelope(n=n, i=i)
            reply = kit.transport.call("", queue.name, request, WAIT, persistent=False)
            assert reply.correlation_id == request.id
            assert reply.body == {"ok": True, "result": {"echo": {"n": n, "i": i}}}

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(caller, range(4), timeout=WAIT * 2))  # re-raises what a caller raised


def test_call_returns_the_reply_to_its_request_and_ignores_unrelated_ones(
    kit: Kit, names: Names, consumers: Consumers
) -> None:
    queue = names.queue()
    publisher = kit.new_transport("replier")

    def answer(delivery: Delivery) -> Outcome:
        assert delivery.reply_to
        stray = Envelope(
            kind="reply", body={"ok": True, "result": {"stray": 1}}, sender="x", correlation_id="other"
        )
        publisher.publish("", delivery.reply_to, stray)
        if delivery.envelope.body.get("answer"):
            return Outcome(reply=delivery.envelope.reply_ok({"mine": 1}, "test"))
        return Outcome()

    consumers.start(kit.transport.consumer(queue, Recorder(answer), name="replier"))
    # Only a stray reply comes back: the call must not take it for its own.
    with pytest.raises(RequestTimeout):
        kit.transport.call("", queue.name, envelope(answer=False), 0.5, persistent=False)
    request = envelope(answer=True)
    reply = kit.transport.call("", queue.name, request, WAIT, persistent=False)
    assert reply.correlation_id == request.id
    assert reply.body == {"ok": True, "result": {"mine": 1}}


def test_a_call_nobody_answers_times_out(kit: Kit, names: Names, consumers: Consumers) -> None:
    queue = names.queue()
    silent = Recorder(lambda _d: Outcome())  # handled and acknowledged, but no reply
    consumers.start(kit.transport.consumer(queue, silent, name="silent"))
    started = time.monotonic()
    with pytest.raises(RequestTimeout):
        kit.transport.call("", queue.name, envelope(), 0.3, persistent=False)
    assert 0.3 <= time.monotonic() - started < 5
    silent.wait_for(1)


def test_an_abort_set_while_a_call_waits_ends_it_with_the_aborts_error(
    kit: Kit, names: Names, consumers: Consumers
) -> None:
    queue = names.queue()
    gate = Gate()  # the handler holds the request and never answers until the end of the test
    consumers.start(kit.transport.consumer(queue, Recorder(gate.handler), name="held"))
    abort = Abort()
    errors: list[BaseException] = []

    def call() -> None:
        try:
            kit.transport.call("", queue.name, envelope(), 3600, persistent=False, abort=abort)
        except BaseException as exc:
            errors.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    gate.wait_inside(1)  # the request was delivered: the call waits for its reply
    abort.set(HostDown("host h1 went down", details={"host": "h1"}))
    caller.join(WAIT)  # far below the call's timeout: the abort ended it
    gate.open()
    assert not caller.is_alive()
    assert [type(e) for e in errors] == [HostDown]
    assert isinstance(errors[0], HostDown) and errors[0].details == {"host": "h1"}


def test_a_call_given_an_abort_already_set_sends_nothing(
    kit: Kit, names: Names, consumers: Consumers
) -> None:
    queue = names.queue()
    recorder = Recorder()
    abort = Abort()
    abort.set(HostDown("down", details={"host": "h1"}))
    with pytest.raises(HostDown):
        kit.transport.call("", queue.name, envelope(), WAIT, persistent=False, abort=abort)
    kit.transport.declare(queue)
    assert kit.ready_count(queue.name) == 0
    consumers.start(kit.transport.consumer(queue, recorder, name="after"))
    marker = envelope(marker=True)
    kit.transport.publish("", queue.name, marker)
    assert [d.envelope.id for d in recorder.wait_for(1)] == [marker.id]


def test_an_outcome_that_requeues_sends_no_reply_and_the_message_is_delivered_again(
    kit: Kit, names: Names, consumers: Consumers
) -> None:
    queue = names.queue()
    seen: list[Delivery] = []

    def hand_back_first(delivery: Delivery) -> Outcome:
        seen.append(delivery)
        if len(seen) == 1:
            return Outcome(requeue=True)
        return Outcome(reply=delivery.envelope.reply_ok({"second": True}, "test"))

    consumers.start(kit.transport.consumer(queue, Recorder(hand_back_first), name="requeue", prefetch=1))
    request = envelope()
    reply = kit.transport.call("", queue.name, request, WAIT, persistent=False)
    assert reply.body == {"ok": True, "result": {"second": True}}  # the first handling sent nothing
    assert [(d.envelope.id, d.redelivered) for d in seen] == [(request.id, False), (request.id, True)]


# ------------------------------------------------------------------------------ ack after reply


def test_a_delivery_stays_unacknowledged_while_its_handler_runs_and_comes_back_when_the_consumer_stops(
    kit: Kit, names: Names, consumers: Consumers
) -> None:
    queue = names.queue()
    gate = Gate()
    first = Recorder(gate.handler)
    busy = consumers.start(kit.transport.consumer(queue, first, name="busy", prefetch=1))
    sent = envelope()
    kit.transport.publish("", queue.name, sent)
    gate.wait_inside(1)
    assert kit.ready_count(queue.name) == 0  # delivered, held by the consumer, not acknowledged

    busy.stop(timeout=0.2)  # the handler is still blocked: stop gives up on it

    second = Recorder(lambda _d: Outcome())
    consumers.start(kit.transport.consumer(queue, second, name="second"))
    (again,) = second.wait_for(1)
    gate.open()
    assert again.envelope.id == sent.id
    assert again.redelivered is True


def test_a_stopping_consumer_lets_its_handler_finish_reply_and_acknowledge(
    kit: Kit, names: Names, consumers: Consumers
) -> None:
    queue = names.queue()
    gate = Gate()

    def slow(delivery: Delivery) -> Outcome:
        gate.enter()
        return Outcome(reply=delivery.envelope.reply_ok({"done": True}, "test"))

    slow_consumer = consumers.start(kit.transport.consumer(queue, Recorder(slow), name="slow"))
    request = envelope()
    replies: list[Envelope] = []
    caller = threading.Thread(
        target=lambda: replies.append(kit.transport.call("", queue.name, request, WAIT, persistent=False))
    )
    caller.start()
    gate.wait_inside(1)
    stopper = threading.Thread(target=slow_consumer.stop, kwargs={"timeout": WAIT})
    stopper.start()
    gate.open()
    stopper.join(WAIT)
    caller.join(WAIT)
    assert [r.correlation_id for r in replies] == [request.id]

    # Acknowledged: a consumer started now sees the next message first, not the old one again.
    marker = envelope(marker=True)
    kit.transport.publish("", queue.name, marker)
    after = Recorder(lambda _d: Outcome())
    consumers.start(kit.transport.consumer(queue, after, name="after"))
    assert after.wait_for(1)[0].envelope.id == marker.id


def test_closing_a_transport_gives_its_consumers_deliveries_back(
    kit: Kit, names: Names, consumers: Consumers
) -> None:
    queue = names.queue()
    doomed = kit.new_transport("doomed")
    gate = Gate()
    doomed.consumer(queue, Recorder(gate.handler), name="doomed-c").start()
    kit.transport.declare(queue)
    sent = envelope()
    kit.transport.publish("", queue.name, sent)
    gate.wait_inside(1)

    doomed.close()

    survivor = Recorder(lambda _d: Outcome())
    consumers.start(kit.transport.consumer(queue, survivor, name="survivor"))
    (again,) = survivor.wait_for(1)
    gate.open()
    assert (again.envelope.id, again.redelivered) == (sent.id, True)


def test_when_the_broker_drops_every_connection_consumers_reconnect_and_a_call_publishes_again(
    kit: Kit, names: Names, consumers: Consumers
) -> None:
    queue = names.queue()
    gate = Gate()
    seen: list[Delivery] = []

    def handler(delivery: Delivery) -> Outcome:
        seen.append(delivery)
        if len(seen) == 1:
            gate.enter()  # the first delivery is held until the connections are gone
        return Outcome(reply=delivery.envelope.reply_ok({"n": len(seen)}, "test"))

    server = consumers.start(kit.transport.consumer(queue, Recorder(handler), name="server", prefetch=4))
    request = envelope()
    replies: list[Envelope] = []
    caller = threading.Thread(
        target=lambda: replies.append(kit.transport.call("", queue.name, request, WAIT * 2, persistent=True))
    )
    caller.start()
    gate.wait_inside(1)

    kit.drop_connections()

    caller.join(WAIT * 2)
    gate.open()
    assert [r.correlation_id for r in replies] == [request.id]
    assert all(d.envelope.id == request.id for d in seen)
    # The held delivery came back (redelivered), and the caller published the same envelope again.
    assert any(d.redelivered for d in seen[1:])
    assert getattr(server, "reconnects", 0) >= 1
    eventually(server.healthy, "the consumer to be healthy again")


# ------------------------------------------------------------------------------ dead letters


def dead_lettered_queue(
    kit: Kit, names: Names, arguments: dict[str, Any] | None = None
) -> tuple[Queue, Queue]:
    """A queue (not declared yet) whose dead letters go to a private dead-letter queue (declared):
    (queue, dead-letter queue)."""
    dlx, dead = names.dead_letters()
    kit.transport.declare(dead)
    return names.queue(dead_letters_to=dlx, arguments=arguments), dead


def test_a_handler_asking_for_it_dead_letters_the_message_once(
    kit: Kit, names: Names, consumers: Consumers
) -> None:
    queue, dead = dead_lettered_queue(kit, names)
    consumers.start(kit.transport.consumer(queue, Recorder(lambda _d: Outcome(dead_letter=True)), name="c"))
    sent = envelope()
    kit.transport.publish("", queue.name, sent)

    (letter,) = kit.take(dead.name)
    assert letter.body == sent.encode()
    assert letter.death["reason"] == "rejected"
    assert letter.death["queue"] == queue.name
    assert letter.death["count"] == 1  # rejected once, not requeued in a loop
    assert letter.headers["x-first-death-reason"] == "rejected"


def test_a_message_over_max_message_bytes_is_neither_published_nor_handled(
    kit: Kit, names: Names, consumers: Consumers
) -> None:
    queue, dead = dead_lettered_queue(kit, names)
    small = kit.new_transport("small", max_message_bytes=2048)
    big = envelope(padding="x" * 4096)
    with pytest.raises(InvalidRequest, match="exceeds max_message_bytes"):
        small.publish("", queue.name, big)
    with pytest.raises(InvalidRequest, match="exceeds max_message_bytes"):
        small.call("", queue.name, big, WAIT)

    handled = Recorder()
    consumers.start(small.consumer(queue, handled, name="c"))
    kit.transport.publish("", queue.name, big)  # another party's larger limit
    kit.transport.publish("", queue.name, fits := envelope())
    (letter,) = kit.take(dead.name)
    assert (letter.message_id, letter.death["reason"]) == (big.id, "rejected")  # dead-lettered unread
    handled.wait_for(1)
    assert [d.envelope.id for d in handled.deliveries] == [fits.id]


def test_max_length_bytes_with_reject_publish_refuses_what_would_go_over(kit: Kit, names: Names) -> None:
    size = len(envelope().encode())
    queue = names.queue(
        arguments={"x-max-length-bytes": 2 * size + size // 2, "x-overflow": "reject-publish"}
    )
    kit.transport.declare(queue)
    kept = [envelope(), envelope()]
    for env in kept:
        kit.transport.publish("", queue.name, env)
    with pytest.raises(Refused):
        kit.transport.publish("", queue.name, envelope())
    assert [m.message_id for m in kit.take(queue.name, 2)] == [env.id for env in kept]


def test_a_crashing_handler_dead_letters_the_message(kit: Kit, names: Names, consumers: Consumers) -> None:
    queue, dead = dead_lettered_queue(kit, names)

    def crash(_d: Delivery) -> Outcome:
        raise RuntimeError("bug")

    consumers.start(kit.transport.consumer(queue, crash, name="c"))
    sent = envelope()
    kit.transport.publish("", queue.name, sent)
    assert kit.take(dead.name)[0].message_id == sent.id


def test_bytes_that_are_not_an_envelope_are_dead_lettered_and_the_consumer_carries_on(
    kit: Kit, names: Names, consumers: Consumers
) -> None:
    queue, dead = dead_lettered_queue(kit, names)
    recorder = Recorder()
    consumers.start(kit.transport.consumer(queue, recorder, name="c"))
    garbage = b"\xc1 this is not msgpack"

    kit.publish_raw("", queue.name, garbage)

    (letter,) = kit.take(dead.name)
    assert letter.body == garbage
    assert letter.death["reason"] == "rejected"
    assert letter.death["count"] == 1
    assert recorder.deliveries == []  # the handler never saw it
    reply = kit.transport.call("", queue.name, envelope(), WAIT, persistent=False)
    assert reply.body["ok"] is True


def test_the_fleet_topology_sends_dead_letters_to_virtfleet_dead(
    kit: Kit, names: Names, consumers: Consumers
) -> None:
    queue = agent_queue(names.prefix)  # dead-letters to virtfleet.dlx -> virtfleet.dead
    consumers.start(
        kit.transport.consumer(queue, Recorder(lambda _d: Outcome(dead_letter=True)), name="agent")
    )
    sent = envelope()
    kit.transport.publish("virtfleet.commands", names.prefix, sent, persistent=True, mandatory=True)

    # virtfleet.dead is shared by every test of the vhost: look for ours.
    letter = eventually(
        lambda: next((m for m in kit.take(DEAD_LETTER_QUEUE.name) if m.message_id == sent.id), None),
        "the dead letter in virtfleet.dead",
    )
    assert letter.headers["x-first-death-queue"] == queue.name


# ------------------------------------------------------------------------------ expiry and limits


def test_a_message_waiting_longer_than_its_expiration_is_dead_lettered(kit: Kit, names: Names) -> None:
    queue, dead = dead_lettered_queue(kit, names)
    kit.transport.declare(queue)
    sent = envelope()

    kit.transport.publish("", queue.name, sent, expiration_ms=50)  # and nobody consumes

    (letter,) = kit.take(dead.name)
    assert letter.message_id == sent.id
    assert letter.death["reason"] == "expired"
    assert letter.death["original-expiration"] == "50"
    assert kit.ready_count(queue.name) == 0


def test_a_queue_message_ttl_dead_letters_old_messages(kit: Kit, names: Names) -> None:
    queue, dead = dead_lettered_queue(kit, names, {"x-message-ttl": 50})
    kit.transport.declare(queue)
    sent = envelope()
    kit.transport.publish("", queue.name, sent)
    (letter,) = kit.take(dead.name)
    assert (letter.message_id, letter.death["reason"]) == (sent.id, "expired")


def test_max_length_drops_and_dead_letters_the_oldest(kit: Kit, names: Names) -> None:
    queue, dead = dead_lettered_queue(kit, names, {"x-max-length": 2})
    kit.transport.declare(queue)
    sent = [envelope(i=i) for i in range(3)]
    for env in sent:
        kit.transport.publish("", queue.name, env)

    (letter,) = kit.take(dead.name)
    assert (letter.message_id, letter.death["reason"]) == (sent[0].id, "maxlen")
    assert [m.message_id for m in kit.take(queue.name, 2)] == [sent[1].id, sent[2].id]


def test_a_quorum_queue_dead_letters_a_message_handed_back_too_often(
    kit: Kit, names: Names, consumers: Consumers
) -> None:
    """A poison message (its consumer hands it back every time: a crash, a stopping process)
    ends in the dead-letter queue after x-delivery-limit returns, instead of looping."""
    queue, dead = dead_lettered_queue(kit, names, {"x-queue-type": "quorum", "x-delivery-limit": 2})
    kit.transport.declare(queue)
    recorder = Recorder(lambda _d: Outcome(requeue=True))
    consumers.start(kit.transport.consumer(queue, recorder, name="poisoned"))
    sent = envelope()
    kit.transport.publish("", queue.name, sent)

    (letter,) = kit.take(dead.name)
    assert (letter.message_id, letter.death["reason"]) == (sent.id, "delivery_limit")
    # Delivered once, then handed back twice more (the limit) before it was dead-lettered.
    assert [d.envelope.id for d in recorder.deliveries] == [sent.id] * 3
    assert kit.ready_count(queue.name) == 0


def test_a_full_reject_publish_queue_refuses_and_dead_letters_nothing(kit: Kit, names: Names) -> None:
    dlx, dead = names.dead_letters()
    kit.transport.declare(dead)
    queue = names.queue(dead_letters_to=dlx, arguments={"x-max-length": 1, "x-overflow": "reject-publish"})
    kit.transport.declare(queue)
    kept = envelope()
    kit.transport.publish("", queue.name, kept)

    with pytest.raises(Refused):
        kit.transport.publish("", queue.name, envelope(), persistent=True, mandatory=True)
    with pytest.raises(Refused):
        kit.transport.call("", queue.name, envelope(), WAIT)

    # Nothing was dead-lettered before this marker (reject-publish does not dead-letter).
    marker = envelope(marker=True)
    kit.transport.publish(dlx.name, "", marker)
    assert kit.take(dead.name)[0].message_id == marker.id
    assert [m.message_id for m in kit.take(queue.name)] == [kept.id]
    # The transport still works after a refusal (no reconnect needed).
    kit.transport.publish("", queue.name, envelope())


def test_the_reports_queue_refuses_when_full(kit: Kit, names: Names) -> None:
    """The fleet's reports queue shape (a quorum queue: x-max-length + reject-publish + DLX),
    shrunk to 1. A quorum queue refuses once it is *over* its length (RabbitMQ 3.10, measured):
    it holds one message more than x-max-length."""
    exchange = names.exchange(ExchangeType.TOPIC)
    queue = names.queue(
        arguments={**REPORTS_QUEUE.arguments, "x-max-length": 1},
        bindings=(Binding(exchange, "host.report.*"),),
    )
    kit.transport.declare(queue)
    kit.transport.publish(exchange.name, "host.report.h1", envelope())
    kit.transport.publish(exchange.name, "host.report.h1", envelope())
    with pytest.raises(Refused):
        kit.transport.publish(exchange.name, "host.report.h1", envelope())
    assert kit.ready_count(queue.name) == 2


# ------------------------------------------------------------------------------ routing


def test_a_mandatory_publish_nobody_is_bound_for_is_unroutable(kit: Kit, names: Names) -> None:
    exchange = names.exchange()
    queue = names.queue(bindings=(Binding(exchange, "bound"),))
    kit.transport.declare(queue)

    with pytest.raises(Unroutable):
        kit.transport.publish(exchange.name, "unbound", envelope(), mandatory=True)
    kit.transport.publish(exchange.name, "unbound", envelope())  # not mandatory: dropped silently
    with pytest.raises(Unroutable):
        kit.transport.call(exchange.name, "unbound", envelope(), WAIT)
    with pytest.raises(NotFound, match="no agent"):
        kit.transport.call(
            exchange.name, "unbound", envelope(), WAIT, unroutable=lambda: NotFound("no agent")
        )
    assert kit.ready_count(queue.name) == 0


def test_publishing_to_a_missing_exchange_is_a_transport_error(kit: Kit, names: Names) -> None:
    with pytest.raises(TransportError) as info:
        kit.transport.publish(names.exchange().name, "k", envelope())
    assert not isinstance(info.value, Unroutable | Refused)
    assert info.value.retryable is False
    kit.transport.publish("", "nowhere", envelope())  # the transport is usable afterwards


def test_consumer_count(kit: Kit, names: Names, consumers: Consumers) -> None:
    queue = names.queue()
    assert kit.transport.consumer_count(queue.name) is None
    kit.transport.declare(queue)
    assert kit.transport.consumer_count(queue.name) == 0
    consumer = consumers.start(kit.transport.consumer(queue, Recorder(), name="c"))
    assert kit.transport.consumer_count(queue.name) == 1
    consumer.stop(timeout=1)
    eventually(lambda: kit.transport.consumer_count(queue.name) == 0, "the consumer to go away")


def test_prefetch_bounds_the_handlers_running_at_once(kit: Kit, names: Names, consumers: Consumers) -> None:
    queue = names.queue()
    gate = Gate()
    recorder = Recorder(gate.handler)
    consumers.start(kit.transport.consumer(queue, recorder, name="c", prefetch=2, workers=4))
    for i in range(5):
        kit.transport.publish("", queue.name, envelope(i=i))

    gate.wait_inside(2)
    assert kit.ready_count(queue.name) == 3  # the broker holds back what exceeds the prefetch
    gate.open()
    recorder.wait_for(5)
    assert gate.most_inside == 2


# ------------------------------------------------------------------------------ several queues, one consumer


def test_a_multi_consumer_sends_each_queue_to_its_own_handler_and_replies_to_calls(
    kit: Kit, names: Names, consumers: Consumers
) -> None:
    queues = [names.queue(f"q{i}") for i in range(3)]

    def answering(i: int) -> Recorder:
        return Recorder(lambda d: Outcome(reply=d.envelope.reply_ok({"queue": i}, "t")))

    recorders = [answering(i) for i in range(3)]
    consumers.start(
        kit.transport.multi_consumer(
            [Route(q, r) for q, r in zip(queues, recorders, strict=True)], name="many", workers=2
        )
    )
    assert [kit.transport.consumer_count(q.name) for q in queues] == [1, 1, 1]

    for i, queue in enumerate(queues):
        reply = kit.transport.call("", queue.name, envelope(n=i), WAIT, persistent=False)
        assert reply.body == {"ok": True, "result": {"queue": i}}
    kit.transport.publish("", queues[1].name, envelope(extra=True))

    assert [d.envelope.body for d in recorders[0].wait_for(1)] == [{"n": 0}]
    assert [d.envelope.body for d in recorders[1].wait_for(2)] == [{"n": 1}, {"extra": True}]
    assert [d.envelope.body for d in recorders[2].wait_for(1)] == [{"n": 2}]
    assert len(recorders[0].deliveries) == 1 and len(recorders[2].deliveries) == 1


def test_a_multi_consumer_prefetch_bounds_each_queue_not_the_sum(
    kit: Kit, names: Names, consumers: Consumers
) -> None:
    first, second = names.queue("a"), names.queue("b")
    gate = Gate()
    recorder = Recorder(gate.handler)
    consumers.start(
        kit.transport.multi_consumer(
            [Route(first, recorder), Route(second, recorder)], name="many", prefetch=1, workers=4
        )
    )
    for i in range(3):
        kit.transport.publish("", first.name, envelope(i=i))
        kit.transport.publish("", second.name, envelope(i=i))

    gate.wait_inside(2)  # one from each queue: a busy queue does not hold the other back
    assert kit.ready_count(first.name) == 2
    assert kit.ready_count(second.name) == 2
    gate.open()
    recorder.wait_for(6)
    assert gate.most_inside == 2


def test_a_multi_consumer_whose_queue_is_deleted_declares_it_again_and_keeps_the_others(
    kit: Kit, names: Names, consumers: Consumers
) -> None:
    kept, deleted = names.queue("kept"), names.queue("deleted")
    recorders = {kept.name: Recorder(lambda _d: Outcome()), deleted.name: Recorder(lambda _d: Outcome())}
    consumers.start(
        kit.transport.multi_consumer([Route(q, recorders[q.name]) for q in (kept, deleted)], name="many")
    )

    kit.delete_queue(deleted.name)

    eventually(
        lambda: kit.transport.consumer_count(deleted.name) == 1, "the consumer to declare the queue again"
    )
    eventually(lambda: kit.transport.consumer_count(kept.name) == 1, "the other queue to be consumed again")
    for queue in (kept, deleted):
        sent = envelope()
        kit.transport.publish("", queue.name, sent, mandatory=True)
        assert recorders[queue.name].wait_for(1)[0].envelope.id == sent.id


def test_a_multi_consumer_needs_distinct_queues(kit: Kit, names: Names) -> None:
    queue = names.queue()
    with pytest.raises(ValueError, match="twice"):
        kit.transport.multi_consumer([Route(queue, Recorder()), Route(queue, Recorder())], name="dup")
    with pytest.raises(ValueError, match="no queue"):
        kit.transport.multi_consumer([], name="none")


# ------------------------------------------------------------------------------ declarations


def test_redeclaring_a_queue_with_other_arguments_fails_naming_queue_and_argument(
    kit: Kit, names: Names
) -> None:
    old = names.queue(arguments={"x-message-ttl": 60_000})
    kit.transport.declare(old)
    kept = envelope()
    kit.transport.publish("", old.name, kept)
    new = names.queue(arguments={"x-message-ttl": 30_000, "x-max-length": 5})

    with pytest.raises(TransportError) as info:
        kit.transport.declare(new)

    error = info.value
    assert error.retryable is False
    assert error.details == {"queue": old.name, "argument": "x-message-ttl"}
    assert old.name in error.message and "x-message-ttl" in error.message
    kit.transport.declare(old)  # the transport is usable afterwards, and the queue untouched
    assert [m.message_id for m in kit.take(old.name)] == [kept.id]


def test_redeclaring_an_exchange_with_another_type_fails_naming_it(kit: Kit, names: Names) -> None:
    direct = names.exchange(ExchangeType.DIRECT)
    kit.transport.declare(names.queue("a", bindings=(Binding(direct, "k"),)))
    fanout = names.exchange(ExchangeType.FANOUT)  # same name, another type
    with pytest.raises(TransportError) as info:
        kit.transport.declare(names.queue("b", bindings=(Binding(fanout, ""),)))
    assert info.value.details == {"exchange": direct.name, "argument": "type"}
    assert info.value.retryable is False


def test_a_disposable_queue_declared_by_an_older_release_is_replaced(
    kit: Kit, names: Names, consumers: Consumers
) -> None:
    # The 0.x reports queue: a queue TTL and no dead-lettering.
    old = names.queue("reports", arguments={"x-message-ttl": 120_000})
    kit.transport.declare(old)
    kit.transport.publish("", old.name, envelope())
    dlx, _dead = names.dead_letters()
    new = names.queue(
        "reports",
        arguments={"x-max-length": 10, "x-overflow": "reject-publish"},
        dead_letters_to=dlx,
        disposable=True,
    )

    kit.transport.declare(new)

    assert kit.ready_count(new.name) == 0  # the old queue and its stale reports are gone
    with pytest.raises(TransportError):
        kit.transport.declare(old)  # the new arguments are in force
    kept = envelope()
    kit.transport.publish("", new.name, kept)
    kit.transport.declare(new)  # same arguments: nothing is deleted
    assert kit.ready_count(new.name) == 1

    # A consumer declaring it meets the same rule.
    kit.delete_queue(new.name)
    kit.transport.declare(old)
    recorder = Recorder(lambda _d: Outcome())
    consumers.start(kit.transport.consumer(new, recorder, name="new-controller"))
    fresh = envelope()
    kit.transport.publish("", new.name, fresh)
    assert recorder.wait_for(1)[0].envelope.id == fresh.id


def test_a_consumer_whose_queue_is_deleted_declares_it_again_and_goes_on(
    kit: Kit, names: Names, consumers: Consumers
) -> None:
    queue = names.queue()
    recorder = Recorder(lambda _d: Outcome())
    consumers.start(kit.transport.consumer(queue, recorder, name="c"))

    kit.delete_queue(queue.name)

    eventually(
        lambda: kit.transport.consumer_count(queue.name) == 1, "the consumer to declare its queue again"
    )
    sent = envelope()
    kit.transport.publish("", queue.name, sent, mandatory=True)
    assert recorder.wait_for(1)[0].envelope.id == sent.id


# ------------------------------------------------------------------------------ the factory


def test_open_transport_chooses_the_implementation_by_url() -> None:
    broker = MemoryBroker("fleet")
    try:
        memory = open_transport("memory://fleet", name="t", memory=broker)
        assert isinstance(memory, MemoryTransport)
        assert memory.url == "memory://fleet"
        # Constructing the AMQP transport does not connect (nothing listens on port 1).
        amqp = open_transport("amqp://guest:secret@127.0.0.1:1/%2F", name="t")
        assert isinstance(amqp, AmqpTransport)
        assert "secret" not in amqp.url
        with pytest.raises(InvalidRequest, match="pass the broker"):
            open_transport("memory://fleet", name="t")
        with pytest.raises(InvalidRequest, match="unsupported broker URL"):
            open_transport("redis://localhost", name="t")
    finally:
        broker.close()


def test_both_implementations_satisfy_the_port() -> None:
    """Checked by mypy (assignments to the protocol types), and here at run time for the names."""
    broker = MemoryBroker()
    transports: list[Transport] = [
        broker.transport("t"),
        AmqpTransport("amqp://guest:guest@127.0.0.1:1/%2F", "t"),
    ]
    members = ("url", "declare", "publish", "call", "consumer", "multi_consumer", "consumer_count", "close")
    for transport in transports:
        assert all(hasattr(transport, m) for m in members)
    broker.close()
