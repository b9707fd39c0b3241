"""The controller's in-memory fleet (controller.fleet_state) against a real database.

Services here share one database, as several controller processes do:
what one writes, the other learns by its sync; a new one (a restart) rebuilds from the database.
"""

from __future__ import annotations

import time
from typing import Any, TypeVar

import pytest
from builders import host_report
from sqlalchemy import Engine, event

from common.errors import RequestTimeout
from common.messages import api
from common.messages.base import replace as replace_struct
from common.messages.descriptor import Command
from common.messages.host import CpuTopology, Heartbeat, HostReport, VmChanges
from common.messages.vm import KernelBoot, PowerState, VmStatus
from controller.config import ControllerConfig
from controller.db import repository as repo
from controller.recovery import Recovery
from controller.service import ControllerService

B = TypeVar("B")
R = TypeVar("R")


class _SilentAgents:
    """Agents that never answer: a build times out and keeps its claim (what the tests count)."""

    def call(self, host_id: str, op: Command[B, R], body: B) -> R:
        raise RequestTimeout(f"{op.kind} to {host_id}: no answer (test double)")


def _service(engine: Engine, **config: Any) -> ControllerService:
    return ControllerService(
        engine, ControllerConfig(database_url=str(engine.url), **config), _SilentAgents()
    )


def _seed(service: ControllerService, *hosts: str, memory_mib: int = 16384) -> None:
    now = time.time()
    for host in hosts:
        service.record_report(
            host_report(host, memory_mib=memory_mib, memory_free_mib=memory_mib, reported_at=now)
        )


def _create(
    service: ControllerService,
    name: str,
    *,
    memory_mib: int = 1024,
    dry_run: bool = False,
    cpuset: str | None = None,
) -> str:
    """Place and claim ``name``; the silent agents leave the claim in place. The chosen host."""
    request = api.VmCreate(
        name=name,
        vcpus=1,
        memory_mib=memory_mib,
        dry_run=dry_run,
        kernel_boot=KernelBoot("/boot/vmlinuz"),
        cpuset=cpuset,
    )
    if dry_run:
        placement = service.create_vm(request).placement
        assert placement.host is not None
        return placement.host
    with pytest.raises(RequestTimeout):
        service.create_vm(request)
    vm = service.show_vm(name)
    assert vm.host is not None
    return vm.host


def test_a_restarted_controller_decides_as_the_old_one_would(engine: Engine) -> None:
    first = _service(engine)
    _seed(first, "h1", "h2", "h3")
    for n in range(5):
        _create(first, f"vm{n}", memory_mib=1024 * (n + 1))
    before = [_create(first, f"probe{n}", memory_mib=512 * n + 256, dry_run=True) for n in range(6)]
    first.close()

    restarted = _service(engine)
    after = [_create(restarted, f"probe{n}", memory_mib=512 * n + 256, dry_run=True) for n in range(6)]
    assert after == before
    assert {r.id: dict(r.used) for r in restarted.fleet.records()} == {
        r.id: dict(r.used) for r in first.fleet.records()
    }
    restarted.close()


def test_another_controllers_claims_are_seen_after_a_sync(engine: Engine) -> None:
    mine, theirs = _service(engine), _service(engine)
    _seed(mine, "h1")
    theirs.fleet.sync(time.time())
    assert [r.id for r in theirs.fleet.records()] == ["h1"]  # a host another controller took a report of

    _create(mine, "big", memory_mib=8192)
    assert theirs.fleet.records()[0].used == {}  # not yet synced
    assert theirs.fleet.sync(time.time()) == 1
    assert theirs.fleet.records()[0].used == mine.fleet.records()[0].used
    assert dict(mine.fleet.records()[0].used)["MEMORY_MIB"] == 8192
    assert theirs.fleet.sync(time.time()) == 0  # nothing changed since: nothing re-read
    mine.close()
    theirs.close()


def test_a_stale_view_never_overfills_a_host(engine: Engine) -> None:
    """Another controller filled the host since our last sync: the claim re-checks it under its
    lock, finds no room, and the create is refused with the true reason."""
    mine, theirs = _service(engine), _service(engine)
    _seed(mine, "h1", memory_mib=4096)  # 3584 MiB placeable after the 512 MiB reserved
    theirs.fleet.sync(time.time())
    _create(theirs, "first", memory_mib=3000)
    with pytest.raises(Exception) as refused:
        _create(mine, "second", memory_mib=3000)
    assert "memory" in str(refused.value).lower()
    with mine.tx() as s:
        assert repo.host_usage(s, "h1")["MEMORY_MIB"] == 3000
    mine.close()
    theirs.close()


def test_heartbeats_wait_in_memory_and_are_written_in_one_batch(engine: Engine) -> None:
    service = _service(engine)
    _seed(service, "h1", "h2")
    with service.tx() as s:
        written = {h: m.last_heartbeat for h, m in repo.host_markers(s).items()}

    later = time.time() + 5
    service.clock = lambda: later
    for host in ("h1", "h2", "unknown"):
        service.record_heartbeat(Heartbeat(host_id=host, seq=1, started_at=0.0, sent_at=later))
    assert service.fleet.record("h1") is not None
    assert service.fleet.record("h1").last_heartbeat == later  # type: ignore[union-attr]
    with service.tx() as s:
        assert {h: m.last_heartbeat for h, m in repo.host_markers(s).items()} == written

    statements = _count_statements(engine, service.fleet.flush_heartbeats)
    assert len([s for s in statements if s.startswith("UPDATE")]) == 1
    with service.tx() as s:
        assert {h: m.last_heartbeat for h, m in repo.host_markers(s).items()} == {"h1": later, "h2": later}
    assert service.fleet.flush_heartbeats() == 0

    # An older beat (a delayed message) never moves a host back in time.
    with service.tx() as s:
        repo.record_heartbeats(s, {"h1": later - 100})
        assert repo.host_markers(s)["h1"].last_heartbeat == later
    service.close()


def test_a_create_reads_no_host_when_the_memory_is_current(engine: Engine) -> None:
    """The claim's compare-and-set on the host's generation proves the memory current: no host
    is read, no reported VM decoded; the claim is one UPDATE and the inserts."""
    service = _service(engine)
    _seed(service, *(f"h{n:02d}" for n in range(20)))
    statements = _count_statements(engine, lambda: _create(service, "one"))
    assert not [s for s in statements if s.startswith("SELECT") and "FROM hosts" in s], statements
    assert not any("reported_vms" in s for s in statements)
    claim = [s for s in statements if s.startswith("UPDATE hosts")]
    assert len(claim) == 1 and "hosts.generation =" in claim[0], statements
    service.close()


def _count_statements(engine: Engine, action: Any) -> list[str]:
    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        seen.append(" ".join(statement.split()))

    event.listen(engine, "before_cursor_execute", record)
    try:
        action()
    finally:
        event.remove(engine, "before_cursor_execute", record)
    return seen


def test_n_plus_one_is_a_fleet_rule_not_checked_again_on_the_one_claimed_host(engine: Engine) -> None:
    # The claim re-checks one host under its lock; N+1 on a one-host snapshot refuses everything.
    service = _service(engine, n_plus_one=True)
    _seed(service, "h1", "h2", "h3")
    assert _create(service, "kept") in {"h1", "h2", "h3"}
    service.close()


def test_a_report_that_says_nothing_new_is_only_a_heartbeat(engine: Engine) -> None:
    service = _service(engine)
    first = host_report("h1", memory_mib=16384, memory_free_mib=16384, seq=1, reported_at=time.time())
    service.record_report(first)
    later = time.time() + 5
    service.clock = lambda: later
    again = replace_struct(first, seq=2, reported_at=later)
    assert _count_statements(engine, lambda: service.record_report(again)) == []
    assert service.fleet.record("h1").last_heartbeat == later  # type: ignore[union-attr]

    changed = replace_struct(again, seq=3, memory_free_mib=8000)
    written = _count_statements(engine, lambda: service.record_report(changed))
    assert any(s.startswith("UPDATE hosts") for s in written), written
    with service.tx() as s:
        assert repo.get_host(s, "h1").memory_free_mib == 8000
    service.close()


def test_a_repeated_report_after_a_delta_is_written_and_an_overtaken_delta_is_dropped(engine: Engine) -> None:
    service = _service(engine)
    _seed(service, "h1")
    _create(service, "v")
    uuid = service.show_vm("v").uuid
    start = time.time() + 1

    def running(power: PowerState) -> VmStatus:
        return VmStatus(uuid, "v", power, 1, 1, 1024, 1024)

    def report(seq: int) -> HostReport:
        return host_report(
            "h1", vms=(running(PowerState.RUNNING),), seq=seq, started_at=start, reported_at=start + seq
        )

    def delta(seq: int) -> VmChanges:
        return VmChanges("h1", start, seq, start + seq, vms=(running(PowerState.SHUTOFF),))

    service.clock = lambda: start + 10
    service.record_report(report(1))
    assert service.show_vm("v").power_state == PowerState.RUNNING
    service.record_vm_changes(delta(2))
    assert service.show_vm("v").power_state == PowerState.SHUTOFF
    # Says what report 1 said, but a delta changed the VM since: written, not taken as a repeat.
    service.record_report(report(3))
    assert service.show_vm("v").power_state == PowerState.RUNNING

    service.record_report(report(5))  # a repeat now: not written, the database's seq stays at 3
    service.record_vm_changes(delta(4))  # older than report 5 (the reports queue has two workers)
    assert service.show_vm("v").power_state == PowerState.RUNNING
    service.close()


def test_a_report_that_could_not_speak_for_a_vm_is_not_taken_as_a_repeat(engine: Engine) -> None:
    # The agent stamps a report before it lists the domains; a VM the controller changed after
    # the stamp is left alone by that report. Saying the same thing again, the agent's next
    # report (stamped after the change) is the first that can speak for it: it must be written.
    service = _service(engine)
    _seed(service, "h1")
    _create(service, "v")
    changed_at = service.show_vm("v").updated_at
    started = time.time() + 1

    def report(seq: int, reported_at: float) -> HostReport:
        # Unlike _seed's report (the free memory), so that the first one is written whatever
        # the claim did to the host row.
        return host_report("h1", memory_free_mib=8192, seq=seq, started_at=started, reported_at=reported_at)

    service.record_report(report(1, changed_at - 1))
    assert service.show_vm("v").power_state != PowerState.MISSING
    service.record_report(report(2, changed_at + 1))
    assert service.show_vm("v").power_state == PowerState.MISSING
    service.close()


def test_a_cpuset_is_placed_on_a_host_that_has_its_cpus(engine: Engine) -> None:
    # The weigher prefers the 8-CPU host (the most free memory); a cpuset naming CPU 10 can only
    # run on the 32-CPU one. It used to be placed on the first and refused there by the claim
    # (InvalidRequest, exit 2), although another host could take it.
    service = _service(engine)
    now = time.time()
    service.record_report(
        host_report(
            "narrow", cpu=CpuTopology(cpus=8), memory_mib=65536, memory_free_mib=65536, reported_at=now
        )
    )
    service.record_report(
        host_report(
            "wide", cpu=CpuTopology(cpus=32), memory_mib=16384, memory_free_mib=16384, reported_at=now
        )
    )
    assert _create(service, "probe", dry_run=True) == "narrow"
    assert _create(service, "probe", dry_run=True, cpuset="10-11") == "wide"
    assert _create(service, "pinned", cpuset="10-11") == "wide"
    service.close()


def test_a_report_after_a_claim_is_not_taken_as_a_repeat(engine: Engine) -> None:
    # A build whose reply never came keeps its claim, "reports will tell": the host's next
    # report says what the one before the claim said, and is the one that tells.
    service = _service(engine)
    _seed(service, "h1")
    _create(service, "v")
    later = service.show_vm("v").updated_at + 1
    service.record_report(host_report("h1", seq=2, reported_at=later))
    assert service.show_vm("v").power_state == PowerState.MISSING
    service.close()


def test_a_create_that_lost_the_race_for_a_host_rechecks_it_under_its_lock(engine: Engine) -> None:
    # Both controllers see h1 and h2 empty and pick h1 (spread, ties by id); the second one's
    # compare-and-set fails, so it re-reads h1 under its lock, finds room, and claims there
    # (deciding again instead made every concurrent create collide on the next best host: a
    # herd that halved creates/s in bench/fleet.py).
    mine, theirs = _service(engine), _service(engine)
    _seed(mine, "h1", "h2")
    theirs.fleet.sync(time.time())
    assert _create(theirs, "first") == "h1"
    with mine.tx() as s:
        generation = repo.get_host(s, "h1").generation
    statements = _count_statements(engine, lambda: _create(mine, "second"))
    assert mine.show_vm("second").host == "h1"
    assert any(s.startswith("SELECT") and "FROM hosts" in s for s in statements), statements
    with mine.tx() as s:
        assert repo.get_host(s, "h1").generation == generation + 1
        assert repo.host_usage(s, "h1")["MEMORY_MIB"] == 2048
    mine.close()
    theirs.close()


def test_the_reconciler_reads_only_the_vms_still_building(engine: Engine) -> None:
    service = _service(engine, build_timeout_s=0.5)
    _seed(service, "h1")
    _create(service, "stuck")  # the silent agent: its build ends in error, not building
    stale = Recovery(service, "test", engine).fail_stale_builds
    reads = [s for s in _count_statements(engine, stale) if s.startswith("SELECT")]
    assert reads and all("WHERE vms.status =" in s for s in reads), reads
    service.close()


def test_a_watcher_of_a_host_is_told_once_when_the_sweep_declares_it_down(engine: Engine) -> None:
    service = _service(engine, down_after_s=30.0)
    _seed(service, "h1", "h2")
    fleet = service.fleet
    now = time.time()
    told: list[str] = []
    fleet.watch_down("h1", lambda: told.append("h1"))
    fleet.watch_down("h2", lambda: told.append("h2"))
    gone = fleet.watch_down("h1", lambda: told.append("unsubscribed"))
    gone()

    fleet.sweep(now + 1)  # both still up
    assert told == []
    fleet.beat("h2", now + 20)  # h2 beats; h1 stays silent
    fleet.sweep(now + 31)
    assert told == ["h1"]
    fleet.sweep(now + 40)  # told once, not at every sweep
    assert told == ["h1"]
    # A host the last sweep found down tells a new watcher at once.
    fleet.watch_down("h1", lambda: told.append("late"))
    assert told == ["h1", "late"]


def test_a_host_that_came_back_is_declared_down_again_when_it_falls_silent_again(engine: Engine) -> None:
    service = _service(engine, down_after_s=30.0)
    _seed(service, "h1")  # the only host: no other heartbeat brings the next sweep forward
    fleet = service.fleet
    now = time.time()
    fleet.sweep(now + 31)  # down
    fleet.beat("h1", now + 40)  # back
    told: list[str] = []
    fleet.watch_down("h1", lambda: told.append("h1"))
    assert told == []  # it is up again
    fleet.sweep(now + 71)  # silent for 31 s since it came back
    assert told == ["h1"]
