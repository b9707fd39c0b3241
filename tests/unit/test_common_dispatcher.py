"""The request/reply layer (common/transport/rpc.py): Dispatcher, request() and unwrap()."""

from __future__ import annotations

from typing import Any

import pytest

from common.codec import to_wire
from common.errors import (
    Conflict,
    InternalError,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    Replayed,
    RequestTimeout,
    TransportError,
    Unauthenticated,
    VirtfleetError,
)
from common.messages import api, host, placement, vm
from common.messages.catalogue import CATALOGUE, timeout_of
from common.messages.descriptor import Op, Route, Side, Timeout, command
from common.messages.envelope import Envelope, decode_envelope
from common.transport.port import Delivery, Interrupted, Outcome
from common.transport.rpc import Dispatcher, HandlerTable, request, unwrap

NOW = 1_000_000.0
SENDER = "agent:h1:99"


class DictJournal:
    def __init__(self) -> None:
        self.replies: dict[str, bytes] = {}
        self.puts: list[tuple[str, str]] = []

    def get(self, message_id: str) -> bytes | None:
        return self.replies.get(message_id)

    def put(self, message_id: str, kind: str, reply: bytes) -> None:
        self.puts.append((message_id, kind))
        self.replies[message_id] = reply


class Recorder:
    """A fake handler: records its calls and returns or raises what it is told."""

    def __init__(self, result: Any = None, raises: BaseException | None = None) -> None:
        self.calls: list[Any] = []
        self.result = result
        self.raises = raises

    def __call__(self, body: Any) -> Any:
        self.calls.append(body)
        if self.raises is not None:
            raise self.raises
        return self.result


def delivery(env: Envelope, redelivered: bool = False) -> Delivery:
    return Delivery(
        envelope=env,
        routing_key="virtfleet.agent.h1",
        redelivered=redelivered,
        reply_to="amq.rabbitmq.reply-to",
    )


def env_for(
    kind: str, body: dict[str, Any], *, expires_at: float | None = NOW + 30, msg_id: str = "req-1"
) -> Envelope:
    return Envelope(
        kind=kind, body=body, sender="controller:c:1", id=msg_id, sent_at=NOW, expires_at=expires_at
    )


VM_REF = {"vm": {"uuid": "u-1", "name": "web"}}
STATUS = vm.VmStatus(
    uuid="u-1",
    name="web",
    state=vm.PowerState.RUNNING,
    vcpus=2,
    max_vcpus=2,
    memory_mib=1024,
    max_memory_mib=1024,
)


def table(handlers: dict[Op[Any, Any], Any]) -> HandlerTable:
    """A handler table of the side that serves the given operations."""
    sides = {op.served_by for op in handlers}
    t = HandlerTable(sides.pop() if sides else Side.AGENT)
    for op, handler in handlers.items():
        t.register(op, handler)
    return t


def make(handlers: dict[Op[Any, Any], Any], journal: DictJournal | None = None) -> Dispatcher:
    return Dispatcher(SENDER, table(handlers), journal=journal, clock=lambda: NOW)


def wire(env: Envelope | None) -> bytes:
    """What a reply is on the wire (in-process bodies hold tuples where decoded ones hold lists)."""
    assert env is not None
    return env.encode()


def error_of(outcome: Outcome) -> dict[str, Any]:
    assert outcome.reply is not None
    assert outcome.reply.kind == "reply"
    assert outcome.reply.body["ok"] is False
    err = outcome.reply.body["error"]
    assert isinstance(err, dict)
    return err


# ------------------------------------------------------------------ construction


def test_a_table_refuses_operations_the_other_side_serves() -> None:
    with pytest.raises(ValueError, match=r"^api\.ping is served by the controller, not the agent$"):
        HandlerTable(Side.AGENT).register(api.API_PING, Recorder())
    with pytest.raises(ValueError, match=r"^vm\.start is served by the agent, not the controller$"):
        HandlerTable(Side.CONTROLLER).register(vm.VM_START, Recorder())


def test_a_table_refuses_an_operation_twice_and_foreign_descriptors() -> None:
    t = table({vm.VM_START: Recorder()})
    with pytest.raises(ValueError, match=r"^vm\.start is handled twice$"):
        t.register(vm.VM_START, Recorder())
    impostor = command(vm.VM, vm.VM_START.kind, vm.VmAction, vm.VmResult, Timeout.FAST, "not the catalogue's")
    with pytest.raises(ValueError, match=r"^vm\.start is not the catalogue's descriptor$"):
        HandlerTable(Side.AGENT).register(impostor, Recorder())


def test_a_table_merges_feature_tables_and_refuses_clashes() -> None:
    core, extra = table({vm.VM_START: Recorder()}), table({vm.VM_REBOOT: Recorder()})
    core.update(extra)
    assert [op.kind for op in core.ops()] == [vm.VM_START.kind, vm.VM_REBOOT.kind]
    assert vm.VM_REBOOT in core and len(core) == 2
    with pytest.raises(ValueError, match="handled twice"):
        core.update(extra)


def test_empty_handler_map_is_fine() -> None:
    assert Dispatcher(SENDER, table({})).sender == SENDER


# ------------------------------------------------------------------ success


def test_handler_gets_typed_body_and_result_is_serialised() -> None:
    handler = Recorder(result=vm.VmResult(status=STATUS, message="started"))
    env = env_for(vm.VM_START.kind, VM_REF)
    outcome = make({vm.VM_START: handler})(delivery(env))
    assert handler.calls == [vm.VmAction(vm=vm.VmRef(uuid="u-1", name="web"))]
    assert outcome.dead_letter is False
    assert outcome.reply is not None
    assert outcome.reply.kind == "reply"
    assert outcome.reply.correlation_id == "req-1"
    assert outcome.reply.sender == SENDER
    # as the caller receives it
    assert decode_envelope(outcome.reply.encode()).body == {
        "ok": True,
        "result": {
            "status": {
                "uuid": "u-1",
                "name": "web",
                "state": "running",
                "vcpus": 2,
                "max_vcpus": 2,
                "memory_mib": 1024,
                "max_memory_mib": 1024,
                "cpu_time_ns": 0,
                "autostart": False,
                "persistent": True,
                "managed": True,
            },
            "message": "started",
            "disks": [],
            "deleted_volumes": [],
        },
    }
    assert unwrap(outcome.reply, vm.VM_START) == vm.VmResult(status=STATUS, message="started")


def test_handler_returning_none_gives_empty_result() -> None:
    outcome = make({api.API_PING: Recorder(result=None)})(delivery(env_for(api.API_PING.kind, {})))
    assert outcome.reply is not None
    assert outcome.reply.body == {"ok": True, "result": {}}
    assert unwrap(outcome.reply, api.API_PING) == api.Empty()


def test_unknown_body_fields_are_ignored() -> None:
    handler = Recorder(result=api.Empty())
    outcome = make({api.API_PING: handler})(delivery(env_for(api.API_PING.kind, {"newer": 1})))
    assert handler.calls == [api.Empty()]
    assert outcome.reply is not None
    assert outcome.reply.body["ok"] is True


# ------------------------------------------------------------------ refusals


def test_unknown_kind_is_invalid_request_and_dead_lettered() -> None:
    handler = Recorder()
    outcome = make({vm.VM_START: handler})(delivery(env_for("vm.explode", VM_REF)))
    assert outcome.dead_letter is True
    assert error_of(outcome) == {
        "type": "InvalidRequest",
        "message": "unknown message kind 'vm.explode'",
        "retryable": False,
        "details": {},
    }
    assert outcome.reply is not None
    assert outcome.reply.correlation_id == "req-1"
    assert handler.calls == []


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({}, "body.vm: required field is missing"),
        ({"vm": {"uuid": "u"}}, "body.vm.name: required field is missing"),
        ({"vm": {"uuid": 1, "name": "web"}}, "body.vm.uuid: expected a string, got an integer"),
        ({"vm": []}, "body.vm: expected a map, got a list"),
    ],
)
def test_malformed_body_is_error_reply_and_dead_lettered(body: dict[str, Any], message: str) -> None:
    handler = Recorder()
    outcome = make({vm.VM_START: handler})(delivery(env_for(vm.VM_START.kind, body)))
    assert outcome.dead_letter is True
    err = error_of(outcome)
    assert err["type"] == "InvalidRequest"
    assert err["message"] == message
    assert handler.calls == []


def test_body_failing_validation_is_dead_lettered() -> None:
    handler = Recorder()
    outcome = make({api.API_VM_SHOW: handler})(delivery(env_for(api.API_VM_SHOW.kind, {"name": "-bad"})))
    assert outcome.dead_letter is True
    err = error_of(outcome)
    assert err["type"] == "InvalidRequest"
    assert err["message"].startswith("body: invalid VM name '-bad'")
    assert handler.calls == []


def test_expired_request_is_request_timeout_not_dead_lettered() -> None:
    handler = Recorder()
    outcome = make({vm.VM_START: handler})(
        delivery(env_for(vm.VM_START.kind, VM_REF, expires_at=NOW - 0.001))
    )
    assert outcome.dead_letter is False
    assert error_of(outcome) == {
        "type": "RequestTimeout",
        "message": "vm.start expired before it could be handled",
        "retryable": True,
        "details": {},
    }
    assert handler.calls == []


def test_request_expiring_exactly_now_is_still_handled() -> None:
    handler = Recorder(result=vm.VmResult())
    outcome = make({vm.VM_START: handler})(delivery(env_for(vm.VM_START.kind, VM_REF, expires_at=NOW)))
    assert len(handler.calls) == 1
    assert outcome.reply is not None
    assert outcome.reply.body["ok"] is True


def test_expired_check_comes_before_body_validation() -> None:
    outcome = make({vm.VM_START: Recorder()})(delivery(env_for(vm.VM_START.kind, {}, expires_at=NOW - 1)))
    assert error_of(outcome)["type"] == "RequestTimeout"
    assert outcome.dead_letter is False


def test_known_kind_without_handler_is_unsupported() -> None:
    outcome = make({vm.VM_START: Recorder()})(delivery(env_for(vm.VM_REBOOT.kind, VM_REF)))
    assert outcome.dead_letter is False
    assert error_of(outcome) == {
        "type": "Unsupported",
        "message": "vm.reboot is not handled here",
        "retryable": False,
        "details": {},
    }


@pytest.mark.parametrize(
    "error",
    [
        NotFound("no VM 'web'", details={"name": "web"}),
        Conflict("VM 'web' is running", retryable=True),
        TransportError("lost"),
        InternalError("raised on purpose"),
    ],
)
def test_handler_raising_virtfleet_error_is_error_reply(error: VirtfleetError) -> None:
    outcome = make({vm.VM_START: Recorder(raises=error)})(delivery(env_for(vm.VM_START.kind, VM_REF)))
    assert outcome.dead_letter is False
    assert error_of(outcome) == error.to_wire()
    assert outcome.reply is not None
    with pytest.raises(type(error)) as info:
        unwrap(outcome.reply, vm.VM_START)
    assert type(info.value) is type(error)
    assert info.value.message == error.message
    assert info.value.retryable is error.retryable
    assert info.value.details == error.details


def test_a_handler_interrupted_by_its_stopping_process_hands_the_request_back_unanswered() -> None:
    journal = DictJournal()
    handler = Recorder(raises=Interrupted("the controller is stopping"))
    outcome = make({vm.VM_START: handler}, journal)(delivery(env_for(vm.VM_START.kind, VM_REF)))
    assert outcome == Outcome(requeue=True)  # no reply, not dead-lettered: back to the queue
    assert journal.puts == []  # not answered, so nothing to answer a redelivery with


def test_handler_raising_plain_exception_is_internal_error() -> None:
    outcome = make({vm.VM_START: Recorder(raises=KeyError("disk"))})(
        delivery(env_for(vm.VM_START.kind, VM_REF))
    )
    assert outcome.dead_letter is False
    err = error_of(outcome)
    assert err == {
        "type": "InternalError",
        "message": "internal error handling vm.start: KeyError: 'disk'",
        "retryable": False,
        "details": {},
    }
    assert "Traceback" not in err["message"]
    assert "File " not in err["message"]


def test_handler_exception_message_is_only_type_and_str() -> None:
    class Boom(RuntimeError):
        pass

    outcome = make({api.API_PING: Recorder(raises=Boom("kaput"))})(delivery(env_for(api.API_PING.kind, {})))
    assert error_of(outcome)["message"] == "internal error handling api.ping: Boom: kaput"


# ------------------------------------------------------------------ reports


REPORTS = [op for op in CATALOGUE.values() if op.route is Route.REPORT]


def test_report_kinds_have_no_result_type() -> None:
    assert REPORTS == [host.HOST_REPORT, host.HOST_HEARTBEAT, host.HOST_VM_CHANGES]
    assert all(op.result is type(None) and not op.replies for op in REPORTS)


def test_report_kind_gives_outcome_without_reply() -> None:
    handler = Recorder(result="ignored")
    beat = host.Heartbeat(host_id="h1", seq=3, started_at=1.0, sent_at=2.0)
    outcome = make({host.HOST_HEARTBEAT: handler})(delivery(env_for(host.HOST_HEARTBEAT.kind, to_wire(beat))))
    assert outcome == Outcome(reply=None, dead_letter=False)
    assert handler.calls == [beat]


def test_report_kind_with_journal_records_nothing() -> None:
    journal = DictJournal()
    handler = Recorder()
    dispatch = make({host.HOST_HEARTBEAT: handler}, journal)
    beat = to_wire(host.Heartbeat(host_id="h1", seq=3, started_at=1.0, sent_at=2.0))
    env = env_for(host.HOST_HEARTBEAT.kind, beat)
    assert dispatch(delivery(env)) == Outcome()
    assert dispatch(delivery(env, redelivered=True)) == Outcome()
    assert journal.replies == {}
    assert len(handler.calls) == 2


# ------------------------------------------------------------------ journal


def test_redelivery_is_answered_from_the_journal() -> None:
    journal = DictJournal()
    handler = Recorder(result=vm.VmResult(status=STATUS))
    dispatch = make({vm.VM_START: handler}, journal)
    env = env_for(vm.VM_START.kind, VM_REF)
    first = dispatch(delivery(env))
    assert journal.puts == [("req-1", vm.VM_START.kind)]
    assert first.reply is not None
    assert journal.replies["req-1"] == first.reply.encode()

    second = dispatch(delivery(env, redelivered=True))
    assert len(handler.calls) == 1
    assert wire(second.reply) == wire(first.reply)
    assert second.reply is not None
    assert second.reply.correlation_id == "req-1"
    assert second.dead_letter is False
    assert journal.puts == [("req-1", vm.VM_START.kind)]


def test_error_replies_are_journaled_too() -> None:
    journal = DictJournal()
    handler = Recorder(raises=NotFound("gone"))
    dispatch = make({vm.VM_START: handler}, journal)
    env = env_for(vm.VM_START.kind, VM_REF)
    first = dispatch(delivery(env))
    second = dispatch(delivery(env))
    assert len(handler.calls) == 1
    assert wire(second.reply) == wire(first.reply)
    assert error_of(second)["type"] == "NotFound"


def test_other_ids_are_not_answered_from_the_journal() -> None:
    journal = DictJournal()
    handler = Recorder(result=vm.VmResult())
    dispatch = make({vm.VM_START: handler}, journal)
    dispatch(delivery(env_for(vm.VM_START.kind, VM_REF, msg_id="a")))
    dispatch(delivery(env_for(vm.VM_START.kind, VM_REF, msg_id="b")))
    assert len(handler.calls) == 2
    assert set(journal.replies) == {"a", "b"}


def test_dead_lettered_messages_are_not_journaled() -> None:
    journal = DictJournal()
    dispatch = make({vm.VM_START: Recorder()}, journal)
    dispatch(delivery(env_for(vm.VM_START.kind, {}, msg_id="bad-body")))
    dispatch(delivery(env_for("nope", {}, msg_id="bad-kind")))
    assert journal.replies == {}


def test_journal_hit_wins_even_over_expiry() -> None:
    journal = DictJournal()
    handler = Recorder(result=vm.VmResult(message="done"))
    env = env_for(vm.VM_START.kind, VM_REF, expires_at=NOW + 1)
    first = Dispatcher(SENDER, table({vm.VM_START: handler}), journal=journal, clock=lambda: NOW)(
        delivery(env)
    )
    later = Dispatcher(SENDER, table({vm.VM_START: handler}), journal=journal, clock=lambda: NOW + 100)(
        delivery(env)
    )
    assert wire(later.reply) == wire(first.reply)
    assert len(handler.calls) == 1


# ------------------------------------------------------------------ request()


def test_request_builds_envelope_with_plain_body() -> None:
    body = vm.VmAction(vm=vm.VmRef(uuid="u-1", name="web"))
    env = request(vm.VM_START, body, "controller:c:1", timeout=12.5, now=500.0)
    assert env.kind == vm.VM_START.kind
    assert env.body == VM_REF
    assert env.sender == "controller:c:1"
    assert env.sent_at == 500.0
    assert env.expires_at == 512.5
    assert env.correlation_id is None


@pytest.mark.parametrize(
    ("op", "body"),
    [
        (vm.VM_START, vm.DeleteVm(vm=vm.VmRef(uuid="u", name="n"))),
        (vm.VM_START, VM_REF),
        (api.API_PING, None),
        (api.API_VM_SHOW, api.VmDeleteRequest(name="web")),
    ],
)
def test_request_with_wrong_body_type_is_type_error(op: Op[Any, Any], body: object) -> None:
    # mypy refuses these at the call site; the runtime check guards untyped callers.
    with pytest.raises(TypeError, match=f"^{op.kind} takes "):
        request(op, body, "s", timeout=1.0)


@pytest.mark.parametrize(
    ("op", "body"),
    [
        (vm.VM_START, vm.VmAction(vm=vm.VmRef(uuid="u", name="n"))),
        (vm.VM_SHUTDOWN, vm.ShutdownVm(vm=vm.VmRef(uuid="u", name="n"))),
        (vm.VM_SUSPEND, vm.VmAction(vm=vm.VmRef(uuid="u", name="n"))),
    ],
)
def test_request_without_timeout_uses_catalogue_timeout(op: Op[Any, Any], body: object) -> None:
    env = request(op, body, "s", now=1000.0)
    assert env.expires_at == 1000.0 + timeout_of(op)


def test_request_round_trips_through_dispatcher() -> None:
    body = api.VmCreate(name="web", vcpus=2, memory_mib=1024, disk_gib=10, host="h1")
    handler = Recorder(
        result=api.VmCreated(
            vm=None, placement=api.PlacementView(host="h1", alternates=(), candidates=(), rejected=())
        )
    )
    env = decode_envelope(request(api.API_VM_CREATE, body, "cli", timeout=60, now=NOW).encode())
    outcome = make({api.API_VM_CREATE: handler})(delivery(env))
    assert handler.calls == [body]
    assert outcome.reply is not None
    created = unwrap(decode_envelope(outcome.reply.encode()), api.API_VM_CREATE)
    assert created.placement.host == "h1"
    assert created.vm is None


# ------------------------------------------------------------------ unwrap()


def test_unwrap_ok() -> None:
    req = env_for(api.API_PING.kind, {})
    assert unwrap(req.reply_ok({"message": "h1"}, "x"), placement.API_HOST_SET) == placement.Done("h1")


def test_unwrap_ok_bad_result_names_result_path() -> None:
    reply = env_for(api.API_HOST_SHOW.kind, {}).reply_ok({"hosts": "x"}, "x")
    with pytest.raises(InvalidRequest, match=r"^result\.hosts: expected a list, got a string$"):
        unwrap(reply, api.API_HOST_LIST)


def test_unwrap_ok_without_result_uses_empty_map() -> None:
    reply = Envelope(kind="reply", body={"ok": True}, sender="x", correlation_id="c")
    assert unwrap(reply, api.API_PING) == api.Empty()


def test_unwrap_error_raises_rebuilt_error() -> None:
    reply = env_for(vm.VM_START.kind, VM_REF).reply_error(RequestTimeout("slow", details={"s": 3}), "x")
    with pytest.raises(RequestTimeout) as info:
        unwrap(reply, vm.VM_START)
    assert info.value.message == "slow"
    assert info.value.retryable is True
    assert info.value.details == {"s": 3}


@pytest.mark.parametrize(
    "body",
    [
        {"ok": False},
        {"ok": "true", "result": {}},
        {"ok": 1, "result": {}},
        {},
        {"ok": False, "error": {"type": "os.system", "message": "rm"}},
    ],
)
def test_unwrap_malformed_reply_is_internal_error(body: dict[str, Any]) -> None:
    reply = Envelope(kind="reply", body=body, sender="x", correlation_id="c")
    with pytest.raises(InternalError):
        unwrap(reply, api.API_PING)


def test_unwrap_of_non_reply_is_invalid_request() -> None:
    with pytest.raises(InvalidRequest, match=r"^expected a reply, got 'vm\.start'$"):
        unwrap(env_for(vm.VM_START.kind, {"ok": True, "result": {}}), api.API_PING)


# ------------------------------------------------------------------ admission


def refuse_with(error: VirtfleetError) -> Any:
    def check(_delivery: Delivery, _op: Op[Any, Any]) -> None:
        raise error

    return check


def test_an_unauthenticated_delivery_is_dead_lettered_answered_and_counted_not_handled() -> None:
    handler, journal = Recorder(result=STATUS), DictJournal()
    seen: list[tuple[str | None, str]] = []

    def note(d: Delivery, op: Op[Any, Any]) -> None:
        seen.append((d.user_id, op.kind))

    dispatcher = Dispatcher(
        SENDER,
        table({vm.VM_START: handler}),
        journal=journal,
        clock=lambda: NOW,
        admit=[note, refuse_with(Unauthenticated("bad signature"))],
    )
    outcome = dispatcher(delivery(env_for(vm.VM_START.kind, VM_REF)))
    assert outcome.dead_letter is True
    assert error_of(outcome)["type"] == "Unauthenticated"
    assert handler.calls == [] and journal.puts == []
    assert seen == [(None, vm.VM_START.kind)]
    assert dispatcher.refused == {"Unauthenticated": 1}


def test_a_replayed_copy_is_dead_lettered_without_an_answer() -> None:
    """A copy re-published (same id) while the first still runs: the requester must get the answer
    of the copy that runs, not a refusal that overtakes it."""
    handler = Recorder(result=STATUS)
    dispatcher = Dispatcher(
        SENDER, table({vm.VM_START: handler}), admit=[refuse_with(Replayed("seen before: a replay"))]
    )
    outcome = dispatcher(delivery(env_for(vm.VM_START.kind, VM_REF)))
    assert outcome == Outcome(None, dead_letter=True)
    assert handler.calls == []
    assert dispatcher.refused == {"Replayed": 1}


def test_a_denied_delivery_is_answered_but_not_dead_lettered() -> None:
    handler = Recorder(result=api.Empty())
    dispatcher = Dispatcher(
        SENDER, table({api.API_PING: handler}), admit=[refuse_with(PermissionDenied("readers may not"))]
    )
    outcome = dispatcher(delivery(env_for(api.API_PING.kind, {})))
    assert outcome.dead_letter is False
    assert error_of(outcome)["type"] == "PermissionDenied"
    assert handler.calls == []
    assert dispatcher.refused == {"PermissionDenied": 1}


def test_a_refused_report_gets_no_reply_and_a_journaled_reply_is_not_given_to_an_unproven_sender() -> None:
    report = Dispatcher(SENDER, HandlerTable(Side.CONTROLLER), admit=[refuse_with(Unauthenticated("forged"))])
    outcome = report(delivery(env_for(host.HOST_HEARTBEAT.kind, {})))
    assert outcome == Outcome(None, dead_letter=True)
    journal = DictJournal()
    journal.put("req-1", vm.VM_START.kind, b"recorded")
    replay = Dispatcher(
        SENDER, table({vm.VM_START: Recorder()}), journal=journal, admit=[refuse_with(Unauthenticated("x"))]
    )
    assert error_of(replay(delivery(env_for(vm.VM_START.kind, VM_REF))))["type"] == "Unauthenticated"


def test_admission_passes_deliveries_it_admits_through() -> None:
    handler = Recorder(result=api.Empty())
    dispatcher = Dispatcher(
        SENDER, table({api.API_PING: handler}), clock=lambda: NOW, admit=[lambda d, op: None]
    )
    outcome = dispatcher(delivery(env_for(api.API_PING.kind, {})))
    assert outcome.reply is not None and outcome.reply.body["ok"] is True
    assert len(handler.calls) == 1 and not dispatcher.refused
