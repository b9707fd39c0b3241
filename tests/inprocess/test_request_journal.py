"""The controller's API request journal (controller.request_journal) through the API Dispatcher.

A redelivery is the same envelope handed to the Dispatcher again; a controller that dies while
handling a request is a handler that raises :class:`_Died` (a BaseException: nothing catches
it, nothing is answered, as after ``kill -9``), with the database left as that moment left it.
Runs on SQLite and, with VIRTFLEET_DATABASE_URL=postgresql://..., on PostgreSQL.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest
from builders import host_report
from inproc import HostShape, inprocess_fleet
from sqlalchemy import Engine, func, select

from common.errors import Conflict, InvalidRequest, RequestTimeout
from common.messages import api
from common.messages.descriptor import ApiCall, Command
from common.messages.placement import API_GROUP_CREATE, API_GROUP_DELETE, ServerGroupCreate, ServerGroupRef
from common.messages.vm import CreateVm, KernelBoot, Lifecycle, PowerState, VmResult, VmStatus
from common.transport.port import Delivery, Outcome
from common.transport.rpc import Dispatcher, request, unwrap
from controller.config import ControllerConfig
from controller.db import repository as repo
from controller.db import request_journal as store
from controller.db.models import ApiRequest
from controller.endpoint import api_dispatcher
from controller.request_journal import PRUNE_BATCH, ApiJournal, implicit_key
from controller.service import ControllerService

B = TypeVar("B")
R = TypeVar("R")
CALLER = "guest"


class _Died(BaseException):
    """The controller process died here (kill -9): no reply, no clean-up."""


class _Agents:
    """Builds succeed at once with the VM running; ``die_on_create``: the first build kills the
    controller after the claim (the agent never heard of it)."""

    def __init__(self) -> None:
        self.creates = 0
        self.die_on_create = False

    def call(self, host_id: str, op: Command[B, R], body: B) -> R:
        if not isinstance(body, CreateVm):
            return cast(R, VmResult())  # a delete: done
        if self.die_on_create:
            self.die_on_create = False
            raise _Died
        self.creates += 1
        spec = body.spec
        status = VmStatus(
            spec.uuid, spec.name, PowerState.RUNNING, spec.vcpus, spec.vcpus, spec.memory_mib, spec.memory_mib
        )
        return cast(R, VmResult(status=status))


class _Controller:
    """A service, its journal and its API dispatcher over a shared database."""

    def __init__(self, engine: Engine, agents: _Agents, **journal: Any) -> None:
        self.agents = agents
        self.service = ControllerService(engine, ControllerConfig(database_url=str(engine.url)), agents)
        now = time.time()
        for host in ("h1", "h2"):
            self.service.record_report(
                host_report(host, memory_mib=8192, memory_free_mib=8192, reported_at=now)
            )
        self.journal = ApiJournal(self.service, **journal)
        self.dispatcher: Dispatcher = api_dispatcher(self.service, "controller", journal=self.journal)

    def deliver(self, env: Any, *, redelivered: bool = False) -> Outcome:
        return self.dispatcher(Delivery(env, "api", redelivered, "reply-queue", user_id=CALLER))

    def close(self) -> None:
        self.service.close()


@pytest.fixture
def ctl(engine: Engine) -> Iterator[_Controller]:
    controller = _Controller(engine, _Agents(), poll_s=0.05)
    yield controller
    controller.close()


def _create(name: str, **fields: Any) -> api.VmCreate:
    return api.VmCreate(name=name, vcpus=1, memory_mib=512, kernel_boot=KernelBoot("/boot/vmlinuz"), **fields)


def _answer(outcome: Outcome, op: ApiCall[Any, R]) -> R:
    assert outcome.reply is not None and not outcome.dead_letter
    return unwrap(outcome.reply, op)


def _vms(service: ControllerService) -> list[tuple[str, Lifecycle]]:
    with service.tx() as s:
        return sorted((v.name, v.status) for v in repo.list_vms(s))


def _entries(service: ControllerService) -> dict[str, str]:
    with service.tx() as s:
        return {r.request_id: r.state for r in s.scalars(select(ApiRequest))}


def test_a_redelivered_create_whose_controller_died_gets_its_own_vm(ctl: _Controller) -> None:
    env = request(api.API_VM_CREATE, _create("web1"), "cli")
    ctl.agents.die_on_create = True
    with pytest.raises(_Died):
        ctl.deliver(env)
    assert _vms(ctl.service) == [("web1", Lifecycle.BUILDING)]
    assert _entries(ctl.service) == {}  # a create is journalled by its VM row

    # Another helper's recovery finishes the build meanwhile; the redelivery waits for it.
    def recover() -> None:
        time.sleep(0.3)
        with ctl.service.tx() as s:
            vm = repo.find_vm_by_key(s, implicit_key(env.id))
            assert vm is not None
            repo.update_vm(s, vm.uuid, time.time(), status=Lifecycle.ACTIVE, task=None)

    recovery = threading.Thread(target=recover)
    recovery.start()
    created = _answer(ctl.deliver(env, redelivered=True), api.API_VM_CREATE)
    recovery.join()
    assert created.vm is not None and created.vm.name == "web1"
    assert created.vm.status is Lifecycle.ACTIVE
    assert _vms(ctl.service) == [("web1", Lifecycle.ACTIVE)]
    assert ctl.agents.creates == 0  # the handler did not run again
    # And once more: now from the record.
    again = _answer(ctl.deliver(env, redelivered=True), api.API_VM_CREATE)
    assert again.vm is not None and again.vm.uuid == created.vm.uuid


def test_a_redelivered_create_that_claimed_nothing_runs_the_create(
    ctl: _Controller, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = ctl.service.fleet.place_batch

    def die(*_args: Any, **_kwargs: Any) -> Any:
        monkeypatch.setattr(ctl.service.fleet, "place_batch", original)
        raise _Died

    monkeypatch.setattr(ctl.service.fleet, "place_batch", die)
    env = request(api.API_VM_CREATE, _create("web2"), "cli")
    with pytest.raises(_Died):
        ctl.deliver(env)
    assert _vms(ctl.service) == []
    created = _answer(ctl.deliver(env, redelivered=True), api.API_VM_CREATE)
    assert created.vm is not None and created.vm.status is Lifecycle.ACTIVE
    assert _vms(ctl.service) == [("web2", Lifecycle.ACTIVE)]
    assert ctl.agents.creates == 1


def test_answered_requests_are_answered_again_from_the_journal(ctl: _Controller) -> None:
    create = request(api.API_VM_CREATE, _create("web3"), "cli")
    first = _answer(ctl.deliver(create), api.API_VM_CREATE)
    second = ctl.deliver(create, redelivered=True)
    assert second.reply is not None and second.reply.correlation_id == create.id
    assert first.vm is not None and _answer(second, api.API_VM_CREATE).vm == first.vm
    assert ctl.agents.creates == 1
    # Not only creates: a redelivered delete is answered "deleted", not NotFound.
    delete = request(api.API_VM_DELETE, api.VmDeleteRequest(name="web3"), "cli")
    ctl.agents.creates = 0
    deleted = _answer(ctl.deliver(delete), api.API_VM_DELETE)
    assert _answer(ctl.deliver(delete, redelivered=True), api.API_VM_DELETE) == deleted


def test_a_retry_with_the_same_key_gets_the_first_answer_and_another_call_conflicts(ctl: _Controller) -> None:
    body = ServerGroupCreate(name="g1", policy="anti-affinity")
    first = request(API_GROUP_CREATE, body, "cli", idempotency_key="k-1")
    view = _answer(ctl.deliver(first), API_GROUP_CREATE)
    retry = request(API_GROUP_CREATE, body, "cli", idempotency_key="k-1")
    replayed = ctl.deliver(retry)
    assert replayed.reply is not None and replayed.reply.correlation_id == retry.id
    assert _answer(replayed, API_GROUP_CREATE) == view  # not AlreadyExists
    other = request(
        API_GROUP_CREATE, ServerGroupCreate(name="g2", policy="affinity"), "cli", idempotency_key="k-1"
    )
    with pytest.raises(Conflict, match="idempotency key 'k-1' was used for another request"):
        _answer(ctl.deliver(other), API_GROUP_CREATE)
    with ctl.service.tx() as s:
        assert repo.find_server_group(s, "g2") is None  # nothing changed
    too_long = request(API_GROUP_CREATE, body, "cli", idempotency_key="k" * 129)
    with pytest.raises(InvalidRequest, match="idempotency key longer than 128"):
        _answer(ctl.deliver(too_long), API_GROUP_CREATE)
    # The key is the caller's: another login's same key is another request.
    mine = request(
        API_GROUP_CREATE, ServerGroupCreate(name="g3", policy="affinity"), "cli", idempotency_key="k-1"
    )
    outcome = ctl.dispatcher(Delivery(mine, "api", False, "reply-queue", user_id="someone-else"))
    assert _answer(outcome, API_GROUP_CREATE).name == "g3"


def test_a_retried_create_whose_first_run_died_gets_the_vm_of_the_first_run(ctl: _Controller) -> None:
    first = request(api.API_VM_CREATE, _create("web4"), "cli", idempotency_key="create-web4")
    ctl.agents.die_on_create = True
    with pytest.raises(_Died):
        ctl.deliver(first)
    with ctl.service.tx() as s:  # the recovery failed the orphaned build meanwhile
        vm = repo.find_vm_by_key(s, implicit_key(first.id))
        assert vm is not None
        repo.update_vm(s, vm.uuid, time.time(), status=Lifecycle.ERROR, task=None, last_error="orphaned")
    retry = request(api.API_VM_CREATE, _create("web4"), "cli", idempotency_key="create-web4")
    created = _answer(ctl.deliver(retry), api.API_VM_CREATE)
    assert created.vm is not None and created.vm.name == "web4"  # not AlreadyExists
    assert created.vm.status is Lifecycle.ERROR
    assert _vms(ctl.service) == [("web4", Lifecycle.ERROR)]


def test_a_started_call_is_run_again_only_when_idempotent(ctl: _Controller) -> None:
    now = time.time()
    group = request(API_GROUP_CREATE, ServerGroupCreate(name="g4", policy="affinity"), "cli")
    delete = request(API_GROUP_DELETE, ServerGroupRef(name="g5"), "cli")
    with ctl.service.tx() as s:  # what a controller that died right after journalling them left
        for env, kind in ((group, API_GROUP_CREATE.kind), (delete, API_GROUP_DELETE.kind)):
            entry = store.Entry(env.id, kind, CALLER, None, "x", store.State.STARTED, None, now)
            assert store.start(s, [entry]) == {env.id}
    with pytest.raises(Conflict, match="whether it took effect is unknown"):
        _answer(ctl.deliver(group, redelivered=True), API_GROUP_CREATE)
    with ctl.service.tx() as s:
        assert repo.find_server_group(s, "g4") is None  # not run
    _answer(
        ctl.deliver(request(API_GROUP_CREATE, ServerGroupCreate(name="g5", policy="affinity"), "cli")),
        API_GROUP_CREATE,
    )
    _answer(ctl.deliver(delete, redelivered=True), API_GROUP_DELETE)  # idempotent: run
    with ctl.service.tx() as s:
        assert repo.find_server_group(s, "g5") is None


def test_two_controllers_handed_one_request_create_one_vm(engine: Engine) -> None:
    first, second = _Controller(engine, _Agents()), _Controller(engine, _Agents(), poll_s=0.05)
    try:
        env = request(api.API_VM_CREATE, _create("web5"), "cli")
        answers: list[Any] = []
        threads = [
            threading.Thread(target=lambda c=c: answers.append(_answer(c.deliver(env), api.API_VM_CREATE)))
            for c in (first, second)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(answers) == 2
        assert {a.vm.uuid for a in answers} == {answers[0].vm.uuid}
        assert _vms(first.service) == [("web5", Lifecycle.ACTIVE)]
        assert first.agents.creates + second.agents.creates == 1
    finally:
        first.close()
        second.close()


def test_reads_cost_nothing_and_retryable_errors_are_not_kept(ctl: _Controller) -> None:
    ctl.deliver(request(api.API_VM_LIST, api.VmListRequest(), "cli", idempotency_key="read"))
    assert _entries(ctl.service) == {}

    class _Silent(_Agents):
        def call(self, host_id: str, op: Command[B, R], body: B) -> R:
            raise RequestTimeout("no answer (test double)")

    ctl.service.agents = _Silent()
    env = request(api.API_VM_CREATE, _create("web6"), "cli", idempotency_key="web6")
    with pytest.raises(RequestTimeout):
        _answer(ctl.deliver(env), api.API_VM_CREATE)
    assert _entries(ctl.service) == {}  # a retry with the key runs again
    bad = request(api.API_VM_CREATE, _create("web7", cpuset="0-500"), "cli", idempotency_key="web7")
    with pytest.raises(InvalidRequest, match="cpuset"):
        _answer(ctl.deliver(bad), api.API_VM_CREATE)
    assert _entries(ctl.service) == {}  # refused input changes nothing, not even the journal


def test_entries_past_the_retention_are_pruned_in_batches(ctl: _Controller) -> None:
    now = time.time()
    old = now - ctl.service.config.request_retention_s - 1
    with ctl.service.tx() as s:
        old_entries = [
            store.Entry(f"old{i}", API_GROUP_DELETE.kind, CALLER, None, "x", store.State.DONE, None, old)
            for i in range(PRUNE_BATCH + 5)
        ]
        store.start(s, old_entries)
        store.start(
            s, [store.Entry("new", API_GROUP_DELETE.kind, CALLER, None, "x", store.State.DONE, None, now)]
        )
    assert ctl.journal.prune(now, batches=1) == PRUNE_BATCH
    assert ctl.journal.prune(now) == 5
    with ctl.service.tx() as s:
        assert s.scalar(select(func.count()).select_from(ApiRequest)) == 1


def test_the_cli_idempotency_key_makes_any_command_safe_to_retry(tmp_path: Path) -> None:
    with inprocess_fleet(tmp_path, {"small": HostShape("small")}) as fleet:
        first = fleet.cli("--idempotency-key", "grp-1", "group", "create", "web", "--policy", "anti-affinity")
        assert first.code == 0, first.stdout + first.stderr
        again = fleet.cli("--idempotency-key", "grp-1", "group", "create", "web", "--policy", "anti-affinity")
        assert (again.code, again.json) == (0, first.json)  # not AlreadyExists
        other = fleet.cli("--idempotency-key", "grp-1", "group", "create", "db", "--policy", "affinity")
        assert other.code == 4 and other.json["error"]["type"] == "Conflict", other.stdout
        too_long = fleet.cli("--idempotency-key", "k" * 129, "group", "create", "x", "--policy", "affinity")
        assert too_long.code == 2 and too_long.json["error"]["type"] == "InvalidRequest", too_long.stdout
        assert fleet.controller is not None
        with fleet.controller.service.tx() as s:  # nothing else was created
            assert [repo.find_server_group(s, n) is not None for n in ("web", "db", "x")] == [
                True,
                False,
                False,
            ]


def test_a_redelivered_create_waiting_on_a_build_is_handed_back_when_the_controller_stops(
    ctl: _Controller,
) -> None:
    env = request(api.API_VM_CREATE, _create("web8"), "cli")
    ctl.agents.die_on_create = True
    with pytest.raises(_Died):
        ctl.deliver(env)
    threading.Timer(0.3, ctl.journal.interrupt).start()
    outcome = ctl.deliver(env, redelivered=True)  # waits on the VM still building, then stops
    assert outcome.requeue and outcome.reply is None
    assert _vms(ctl.service) == [("web8", Lifecycle.BUILDING)]
