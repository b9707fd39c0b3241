"""Fuzz the handlers: every operation's body, fuzzed, answered without a crash or a traceback.

An in-process fleet (controller, two agents on the shipped fakes, SQLite or PostgreSQL) receives
fuzzed bodies of every kind of the catalogue through the dispatcher that serves it on the bus:
API calls through the controller's API dispatcher, reports through its report dispatcher,
commands through an agent's. The body goes in as plain data, exactly as it would come out of a
decoded envelope. Each reply must be a typed answer -- a result, or an error that is not
InternalError (the dispatcher's answer to a handler that raised something untyped) -- and no
log record may carry a traceback of a non-virtfleet exception or say "crashed (bug)". An API call
answered InvalidRequest must have written nothing (no VM, claim or group row added or removed).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import fuzzkit
import pytest
from hypothesis import given
from inproc import HostShape, InProcessFleet, inprocess_fleet
from sqlalchemy import func, select

from common.errors import VirtfleetError
from common.messages.catalogue import CATALOGUE
from common.messages.descriptor import ApiCall, Command, Op, Report
from common.messages.envelope import Envelope
from common.transport.port import Delivery
from common.transport.rpc import Dispatcher
from controller.db.models import Allocation, HostGroup, ServerGroup, Vm
from controller.endpoint import api_dispatcher, report_dispatcher

pytestmark = [pytest.mark.inprocess, pytest.mark.db]

HOSTS = {name: HostShape() for name in fuzzkit.KNOWN_NAMES[:2]}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessFleet]:
    with inprocess_fleet(tmp_path_factory.mktemp("fuzz"), HOSTS) as running:
        yield running


def dispatcher_for(fleet: InProcessFleet, op: Op[Any, Any]) -> Dispatcher:
    """The dispatcher that serves ``op`` in a running fleet."""
    controller = fleet.controller
    assert controller is not None
    if isinstance(op, ApiCall):
        return api_dispatcher(controller.service, "fuzz-controller")
    if isinstance(op, Report):
        return report_dispatcher(controller.service, "fuzz-controller")
    assert isinstance(op, Command), f"{op} is neither an API call, a report nor a command"
    agent = fleet.hosts_by_name[fuzzkit.KNOWN_NAMES[0]].agent
    assert agent is not None
    return agent.dispatcher


def crashes(records: list[logging.LogRecord]) -> list[str]:
    """Log records that show a crash: "crashed (bug)", or a traceback of an untyped exception."""
    found = []
    for record in records:
        error = record.exc_info[1] if record.exc_info else None
        if "crashed (bug)" in record.getMessage() or (
            error is not None and not isinstance(error, VirtfleetError)
        ):
            found.append(f"{record.name}: {record.getMessage()} ({type(error).__name__})")
    return found


def written(fleet: InProcessFleet) -> tuple[int, ...]:
    """Rows a refused request must not have added or removed: VMs, claims, groups."""
    assert fleet.controller is not None
    with fleet.controller.engine.connect() as conn:
        return tuple(
            conn.execute(select(func.count()).select_from(table)).scalar_one()
            for table in (Vm, Allocation, HostGroup, ServerGroup)
        )


def test_every_kind_is_routed(fleet: InProcessFleet) -> None:
    assert {op.kind for op in CATALOGUE.values() if dispatcher_for(fleet, op)} == set(CATALOGUE)


@pytest.mark.parametrize("kind", sorted(CATALOGUE))
def test_handlers_answer_fuzzed_bodies_without_crashing(
    kind: str, fleet: InProcessFleet, caplog: pytest.LogCaptureFixture, cases: fuzzkit.CaseCount
) -> None:
    op = CATALOGUE[kind]
    dispatcher = dispatcher_for(fleet, op)
    caplog.set_level(logging.INFO)

    @fuzzkit.fuzz_settings()
    @given(fuzzkit.envelope(kind, fuzzkit.body_for(op.body)))
    def check(env: Envelope) -> None:
        caplog.clear()
        cases.add()
        before = written(fleet) if isinstance(op, ApiCall) else None
        outcome = dispatcher(Delivery(env, routing_key=kind, redelivered=False, reply_to=None))
        if outcome.reply is not None:
            error = outcome.reply.body.get("error") or {}
            assert error.get("type") != "InternalError", f"{kind} crashed on {env.body!r}: {error}"
            if before is not None and error.get("type") == "InvalidRequest":
                assert written(fleet) == before, f"{kind} refused {env.body!r} but wrote rows"
        assert not crashes(caplog.records), (
            f"{kind} logged a crash on {env.body!r}: {crashes(caplog.records)}"
        )

    check()
