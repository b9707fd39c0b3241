"""The reconciler lease (controller.db.liveness, controller.recovery): two controller services on
one database (each with its own engine, as two processes have), on SQLite and PostgreSQL.

Only the holder runs a pass; the lease passes to the other controller when the holder stops
renewing it and it expires, or at once when the holder resigns (a clean stop).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from builders import host_report
from sqlalchemy import Engine
from vfsupport import fresh_database

from common.errors import RequestTimeout
from common.messages import api
from common.messages.descriptor import Command
from common.messages.vm import KernelBoot, Lifecycle
from controller.config import ControllerConfig
from controller.db import liveness
from controller.db import repository as repo
from controller.db.engine import make_engine, migrate
from controller.recovery import Recovery
from controller.service import ControllerService

B = TypeVar("B")
R = TypeVar("R")
TTL = 15.0


class _SilentAgents:
    def call(self, host_id: str, op: Command[B, R], body: B) -> R:
        raise RequestTimeout(f"{op.kind} to {host_id}: no answer (test double)")


class _Clock:
    """The time both controllers read, moved by the test (expiry without waiting for it)."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def url(tmp_path: Path) -> Iterator[str]:
    with fresh_database(tmp_path) as db:
        engine = make_engine(db)
        migrate(engine)
        engine.dispose()
        yield db


class _Controllers:
    """Makes controller services on the test's database (each with its own engine) and stops them."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.clock = _Clock()
        self._made: list[tuple[Recovery, Engine]] = []

    def __call__(self, name: str, **config: Any) -> Recovery:
        engine = make_engine(self.url)
        service = ControllerService(
            engine,
            ControllerConfig(database_url=self.url, lease_ttl_s=TTL, **config),
            _SilentAgents(),
            clock=self.clock,
        )
        recovery = Recovery(service, name, engine)
        recovery.register()
        self._made.append((recovery, engine))
        return recovery

    def close(self) -> None:
        for recovery, engine in self._made:
            recovery.service.close()
            engine.dispose()


@pytest.fixture
def controllers(url: str) -> Iterator[_Controllers]:
    made = _Controllers(url)
    yield made
    made.close()


def test_two_controllers_racing_for_the_lease_get_one_holder(controllers: _Controllers) -> None:
    one, two = controllers("one"), controllers("two")
    start = threading.Barrier(2)
    results: dict[str, list[bool]] = {"one": [], "two": []}

    def race(who: Recovery) -> None:
        start.wait()
        for _ in range(20):
            results[who.name].append(who.holds_lease())

    threads = [threading.Thread(target=race, args=(c,)) for c in (one, two)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Whoever won the first compare-and-set renews it every time; the other never gets it.
    assert sorted([all(results["one"]), all(results["two"])]) == [False, True], results
    assert not any(results["one"]) or not any(results["two"]), results


def test_the_lease_passes_when_the_holder_stops_renewing_or_resigns(controllers: _Controllers) -> None:
    clock = controllers.clock
    one, two = controllers("one"), controllers("two")
    assert one.holds_lease() and not two.holds_lease()
    clock.now += TTL - 1  # not yet expired: still the holder's
    assert not two.holds_lease()
    one.heartbeat()  # the heartbeat renews it
    clock.now += TTL - 1
    assert not two.holds_lease()
    clock.now += 2  # the holder died: no renewal for longer than the TTL
    assert two.holds_lease()
    assert not one.holds_lease(), "a holder back from a stall does not take it back"
    with two.service.tx() as s:
        assert liveness.holder_of(s, liveness.RECONCILER, clock.now) == two.instance_id
    two.resign()  # a clean stop hands it over at once
    assert one.holds_lease()


def test_only_the_holder_runs_a_pass(controllers: _Controllers) -> None:
    clock = controllers.clock
    one = controllers("one", build_timeout_s=60.0)
    two = controllers("two", build_timeout_s=60.0)
    now = clock.now
    one.service.record_report(host_report("h1", memory_mib=4096, memory_free_mib=4096, reported_at=now))
    request = api.VmCreate(name="stuck", vcpus=1, memory_mib=512, kernel_boot=KernelBoot("/boot/vmlinuz"))
    with pytest.raises(RequestTimeout):
        one.service.create_vm(request)
    with one.service.tx() as s:  # the silent agent: a build still going on, for 2 minutes
        repo.update_vm(s, one.service.show_vm("stuck").uuid, now, status=Lifecycle.BUILDING)
    clock.now += 120
    one.heartbeat()  # the build's owner is alive: only the build timeout applies to it
    assert one.holds_lease()
    assert two.step(full=True) == [], "not the holder: no pass"
    assert one.service.show_vm("stuck").status is Lifecycle.BUILDING
    assert one.step(full=True) == ["stuck: build timed out"]
