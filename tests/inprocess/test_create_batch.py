"""Batched creates (ControllerService._claim_batch through create_vm) against a real database.

Each test holds the first batch (a lone create) at its decision until the creates under test have
queued behind it, so those form the next batch: one decision pass and one transaction. Services
share one database, as several controller processes do. Runs on SQLite and, with
VIRTFLEET_DATABASE_URL=postgresql://..., on PostgreSQL.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, cast

import pytest
from builders import host_report
from sqlalchemy import Engine, event
from vfsupport import wait_until

from common.errors import AlreadyExists, NoValidHost, RequestTimeout
from common.messages import api
from common.messages.base import replace as replace_struct
from common.messages.descriptor import Command
from common.messages.vm import CreateVm, KernelBoot, Lifecycle, PowerState, VmResult, VmStatus, VmView
from controller import fleet
from controller.config import ControllerConfig
from controller.create_batcher import GroupCommit
from controller.db import repository as repo
from controller.scheduler.model import Placement, ResourceClass
from controller.service import ControllerService

B = TypeVar("B")
R = TypeVar("R")
BOUND_S = 60.0  # liveness bound of every wait: a hang fails the test


class _SilentAgents:
    """Agents that never answer: a build times out and keeps its claim (what the tests count)."""

    def call(self, host_id: str, op: Command[B, R], body: B) -> R:
        raise RequestTimeout(f"{op.kind} to {host_id}: no answer (test double)")


def _service(engine: Engine, **config: Any) -> ControllerService:
    return ControllerService(
        engine, ControllerConfig(database_url=str(engine.url), **config), _SilentAgents()
    )


def _seed(service: ControllerService, hosts: dict[str, int]) -> None:
    """Hosts by memory MiB (512 of each are reserved)."""
    now = time.time()
    for host, memory in hosts.items():
        service.record_report(host_report(host, memory_mib=memory, memory_free_mib=memory, reported_at=now))


def _request(name: str, memory_mib: int) -> api.VmCreate:
    return api.VmCreate(name=name, vcpus=1, memory_mib=memory_mib, kernel_boot=KernelBoot("/boot/vmlinuz"))


class _Batches:
    """Creates run in threads; the first batch waits at its decision until ``release``."""

    def __init__(self, service: ControllerService, monkeypatch: pytest.MonkeyPatch) -> None:
        self.service = service
        self.outcomes: dict[str, str | Exception] = {}
        self._threads: list[threading.Thread] = []
        self._gate = threading.Event()
        self._entered = threading.Event()
        original = service.fleet.place_batch

        def gated(*args: Any, **kwargs: Any) -> Any:
            if not self._entered.is_set():
                self._entered.set()
                self._gate.wait(BOUND_S)
            return original(*args, **kwargs)

        monkeypatch.setattr(service.fleet, "place_batch", gated)

    def start(self, name: str, memory_mib: int) -> None:
        def create() -> None:
            try:
                self.service.create_vm(_request(name, memory_mib))
            except RequestTimeout:  # the silent agents: claimed, the build never answered
                vm = self.service.show_vm(name)
                assert vm.host is not None
                self.outcomes[name] = vm.host
            except Exception as exc:
                self.outcomes[name] = exc

        thread = threading.Thread(target=create)
        thread.start()
        self._threads.append(thread)

    def first(self, name: str, memory_mib: int) -> None:
        """The lone create that is held at its decision."""
        self.start(name, memory_mib)
        self._entered.wait(BOUND_S)
        assert self._entered.is_set()

    def queue(self, creates: Sequence[tuple[str, int]]) -> None:
        """Creates that queue behind the held one (they become the next batch)."""
        for name, memory in creates:
            self.start(name, memory)
        wait_until(lambda: self.service._creates.queued == len(creates), BOUND_S, "creates queued")

    def release_and_join(self) -> dict[str, str | Exception]:
        self._gate.set()
        for thread in self._threads:
            thread.join(BOUND_S)
            assert not thread.is_alive()
        return self.outcomes


def _statements(engine: Engine) -> tuple[list[str], Callable[[], None]]:
    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        seen.append(" ".join(statement.split()))

    event.listen(engine, "before_cursor_execute", record)
    return seen, lambda: event.remove(engine, "before_cursor_execute", record)


def _usage(service: ControllerService) -> dict[str, int]:
    with service.tx() as s:
        return {h.id: dict(h.used).get("MEMORY_MIB", 0) for h in repo.list_hosts(s, include_vms=False)}


def _assert_memory_matches_database(service: ControllerService) -> None:
    with service.tx() as s:
        stored = {h.id: (h.generation, dict(h.used)) for h in repo.list_hosts(s, include_vms=False)}
    assert {r.id: (r.generation, dict(r.used)) for r in service.fleet.records()} == stored


def test_creates_queued_together_are_claimed_in_one_transaction(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = _service(engine)
    _seed(service, {"h1": 8192, "h2": 8192, "h3": 8192})
    batches = _Batches(service, monkeypatch)
    statements, stop = _statements(engine)
    batches.first("a", 1024)
    batches.queue([(f"b{n}", 1024) for n in range(6)])
    outcomes = batches.release_and_join()
    stop()

    assert all(isinstance(h, str) for h in outcomes.values()), outcomes
    inserts = [s for s in statements if s.startswith("INSERT INTO vms")]
    assert len(inserts) == 2, statements  # the lone create's batch and one for the six
    # spread: the batch's decisions saw each other's claims, so the seven went 3 + 2 + 2
    assert sorted(_usage(service).values()) == [2048, 2048, 3072]
    hosts = {outcomes[f"b{n}"] for n in range(6)} | {outcomes["a"]}
    assert hosts == {"h1", "h2", "h3"}
    _assert_memory_matches_database(service)
    service.close()


def test_a_refusal_in_a_batch_refuses_only_that_create(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = _service(engine)
    _seed(service, {"h1": 4096, "h2": 4096})  # 3584 MiB placeable each
    batches = _Batches(service, monkeypatch)
    batches.first("a", 1024)
    batches.queue([("small1", 1024), ("huge", 8000), ("small2", 1024)])
    outcomes = batches.release_and_join()
    assert isinstance(outcomes["huge"], NoValidHost), outcomes
    assert {outcomes["small1"], outcomes["small2"], outcomes["a"]} <= {"h1", "h2"}
    assert sum(_usage(service).values()) == 3072
    with service.tx() as s:
        assert repo.find_vm(s, "huge") is None
    service.close()


def test_a_batch_larger_than_the_fleet_never_overfills_a_host(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = _service(engine)
    _seed(service, {"h1": 4096})  # 3584 MiB placeable
    batches = _Batches(service, monkeypatch)
    # Refused, so it leaves memory exactly the database's: the batch's claims then compare-and-set
    # successfully, and only the batch's own accounting stands between them and an overfull host.
    batches.first("a", 100_000)
    batches.queue([(f"b{n}", 1024) for n in range(5)])
    outcomes = batches.release_and_join()
    placed = [n for n, o in outcomes.items() if o == "h1"]
    refused = [n for n, o in outcomes.items() if isinstance(o, NoValidHost)]
    assert len(placed) == 3 and len(refused) == 3, outcomes
    assert _usage(service) == {"h1": 3072}
    _assert_memory_matches_database(service)
    service.close()


def test_a_claim_of_a_batch_that_lost_the_race_rechecks_its_host(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another controller claimed on h1 after our last sync. In our batch, the first of "b" and
    "c" decides on h1 as memory shows it and loses the compare-and-set; the other (h2) is written
    all the same, and the first, alone, re-reads h1 under its lock, finds room and claims there."""
    mine, theirs = _service(engine), _service(engine)
    _seed(mine, {"h1": 4096, "h2": 4096, "h3": 8192})
    theirs.fleet.sync(time.time())
    batches = _Batches(mine, monkeypatch)
    batches.first("a", 7680)  # fills h3, the only host it fits: h1 stays as memory last saw it
    batches.queue([("b", 1024), ("c", 1024)])
    _their_create(theirs, "first", host="h1")
    assert theirs.show_vm("first").host == "h1"
    statements, stop = _statements(engine)
    outcomes = batches.release_and_join()
    stop()

    # b and c queue in whichever order their threads ran: one of them lost h1 and re-checked it
    assert outcomes["a"] == "h3" and {outcomes["b"], outcomes["c"]} == {"h1", "h2"}, outcomes
    assert any(s.startswith("SELECT") and "FROM hosts" in s for s in statements), statements  # the re-read
    assert _usage(mine) == {"h1": 2048, "h2": 1024, "h3": 7680}
    _assert_memory_matches_database(mine)
    mine.close()
    theirs.close()


def _their_create(service: ControllerService, name: str, *, host: str | None = None) -> None:
    with pytest.raises(RequestTimeout):
        service.create_vm(replace_struct(_request(name, 1024), host=host))


def test_a_taken_name_in_a_batch_refuses_only_that_create(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = _service(engine)
    _seed(service, {"h1": 8192, "h2": 8192})
    _their_create(service, "taken")
    batches = _Batches(service, monkeypatch)
    batches.first("a", 1024)
    batches.queue([("b", 1024), ("taken", 1024), ("c", 1024)])
    outcomes = batches.release_and_join()
    assert isinstance(outcomes["taken"], AlreadyExists), outcomes
    assert {outcomes["a"], outcomes["b"], outcomes["c"]} <= {"h1", "h2"}
    assert sum(_usage(service).values()) == 4096
    _assert_memory_matches_database(service)
    service.close()


def test_a_lone_create_is_one_transaction_of_its_own(engine: Engine) -> None:
    # No other create announced: a batch of one, claimed at once (that no window is waited for
    # is tests/unit/test_create_batcher.py's).
    service = _service(engine, create_batch_window_s=1.0)
    _seed(service, {"h1": 8192})
    statements, stop = _statements(engine)
    _their_create(service, "alone")
    stop()
    assert service.show_vm("alone").host == "h1"
    assert len([s for s in statements if s.startswith("INSERT INTO vms")]) == 1
    assert service._creates.batches == 1
    service.close()


def test_a_sync_while_a_batch_claims_keeps_its_claims_in_memory(engine: Engine) -> None:
    """Between a batch's decision and its commit, memory is ahead of the database on the hosts it
    chose: a sync then must not re-read them (the next claims there would all lose their
    compare-and-set); once the batch settles, a claim that was never written is dropped."""
    service = _service(engine)
    _seed(service, {"h1": 8192})
    request = fleet.placement_request("held", {ResourceClass.MEMORY_MIB: 1024})
    ((placement, _basis),) = service.fleet.place_batch(
        [request], fleet.policy(service.config), time.time(), lambda _r, _p: {"MEMORY_MIB": 1024}
    )
    assert isinstance(placement, Placement) and placement.host_id == "h1"
    assert service.fleet.sync(time.time()) == 0
    assert dict(service.fleet.records()[0].used) == {"MEMORY_MIB": 1024}
    service.fleet.settle({"h1": 1})
    assert service.fleet.sync(time.time()) == 1  # this batch never committed: the database wins
    assert dict(service.fleet.records()[0].used) == {}
    service.close()


def test_a_name_twice_in_one_batch_is_created_once(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    service = _service(engine)
    _seed(service, {"h1": 8192})
    batches = _Batches(service, monkeypatch)
    batches.first("a", 100_000)  # refused: memory stays the database's
    batches.queue([("twin", 1024), ("twin", 1024)])
    batches.release_and_join()
    with service.tx() as s:
        assert [v.name for v in repo.list_vms(s)] == ["twin"]
    assert _usage(service) == {"h1": 1024}
    _assert_memory_matches_database(service)  # the claim held for the second twin is gone
    service.close()


class _InstantAgents:
    """Every build succeeds at once with the VM running."""

    def call(self, host_id: str, op: Command[B, R], body: B) -> R:
        assert isinstance(body, CreateVm), op.kind
        spec = body.spec
        status = VmStatus(
            spec.uuid, spec.name, PowerState.RUNNING, spec.vcpus, spec.vcpus, spec.memory_mib, spec.memory_mib
        )
        return cast(R, VmResult(status=status))


def test_results_of_builds_that_finish_together_are_recorded_in_one_transaction(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = ControllerService(engine, ControllerConfig(database_url=str(engine.url)), _InstantAgents())
    _seed(service, {"h1": 16384, "h2": 16384})
    gate, entered = threading.Event(), threading.Event()
    original = service._record_builds

    def gated(built: Sequence[tuple[str, VmResult]]) -> list[VmView | BaseException]:
        if not entered.is_set():  # held before its transaction: SQLite has one writer
            entered.set()
            gate.wait(BOUND_S)
        return original(built)

    built: GroupCommit[tuple[str, VmResult], VmView] = GroupCommit(gated, window_s=0.0, max_size=32)
    monkeypatch.setattr(service, "_built", built)
    views: dict[str, VmView | None] = {}

    def create(name: str) -> None:
        views[name] = service.create_vm(_request(name, 1024)).vm

    threads = [threading.Thread(target=create, args=("first",))]
    threads[0].start()
    entered.wait(BOUND_S)
    threads += [threading.Thread(target=create, args=(f"vm{n}",)) for n in range(4)]
    for thread in threads[1:]:
        thread.start()
    wait_until(lambda: built.queued == 4, BOUND_S, "four results queued behind the first")
    gate.set()
    for thread in threads:
        thread.join(BOUND_S)
        assert not thread.is_alive()
    assert (built.batches, built.items) == (2, 5)
    assert all(v is not None and v.status is Lifecycle.ACTIVE for v in views.values()), views
    assert {service.show_vm(name).power_state for name in views} == {PowerState.RUNNING}
    service.close()


def test_a_keyed_create_whose_twin_claimed_first_answers_with_the_twins_vm(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two copies of one keyed create (a redelivery while the first still runs): the second looked
    before the first committed, so its own claim is refused by the name; it answers with the
    first copy's VM, not AlreadyExists (seen in tests/chaos/test_broker_cluster.py)."""
    service = _service(engine)
    _seed(service, {"h1": 8192})
    keyed = replace_struct(_request("twin", 1024), idempotency_key="twin-key", wait=False)
    first = service.create_vm(keyed)
    assert first.vm is not None
    looked = service._check_create
    calls: list[api.VmCreated | None] = []

    def before_the_twin_committed(req: api.VmCreate) -> api.VmCreated | None:
        calls.append(None if not calls else looked(req))  # the first look saw nothing yet
        return calls[-1]

    monkeypatch.setattr(service, "_check_create", before_the_twin_committed)
    second = service.create_vm(keyed)
    assert len(calls) == 2
    assert second.vm is not None and second.vm.uuid == first.vm.uuid
    with service.tx() as s:
        assert [v.name for v in repo.list_vms(s)] == ["twin"]
