"""The chaos audit (tests/chaoskit.py) counts what it must: each fault kind on a made-up fleet view,
so a chaos test that passes does so because nothing was duplicated or lost, not because the audit
cannot see it. Pure: no process, no broker."""

from __future__ import annotations

import pytest
from chaoskit import NO_ANSWER, OK, FleetView, Outcome, audit

from common.messages import placement as pmsg
from common.messages.vm import DesiredPower, HostStatus, Lifecycle, PowerState, VmView

pytestmark = [pytest.mark.chaos]


def vm(name: str, host: str | None = "h1", status: Lifecycle = Lifecycle.ACTIVE, memory: int = 64) -> VmView:
    return VmView(
        uuid=f"uuid-{name}",
        name=name,
        host=host,
        status=status,
        power_state=PowerState.RUNNING,
        desired_power=DesiredPower.RUNNING,
        task=None,
        vcpus=1,
        max_vcpus=1,
        memory_mib=memory,
        max_memory_mib=memory,
        disk_gib=1,
        autostart=False,
        persistent=True,
        cpu_time_ns=0,
        created_at=0.0,
        updated_at=0.0,
    )


def host(used: int, capacity: int = 1024, drift: tuple[str, ...] = ()) -> pmsg.HostCapacity:
    memory = pmsg.ResourceCapacity(
        resource="MEMORY_MIB",
        total=capacity,
        reserved=0,
        allocation_ratio=1.0,
        capacity=capacity,
        used=used,
        free=capacity - used,
        min_unit=1,
        max_unit=capacity,
        step_size=1,
    )
    return pmsg.HostCapacity(host="h1", status=HostStatus.UP, group=None, resources=(memory,), drift=drift)


def test_a_clean_run_is_clean() -> None:
    report = audit(
        [Outcome("a", OK, "h1"), Outcome("b", "NoValidHost"), Outcome("c", NO_ANSWER)],
        FleetView((vm("a"), vm("c")), (host(used=128),)),
    )
    assert report.clean, report.explain()
    assert (report.completed, report.errors, report.unanswered) == (1, {"NoValidHost": 1}, {"done": 1})


def test_each_fault_is_counted() -> None:
    outcomes = [
        Outcome("ok-but-missing", OK, "h1"),  # lost: answered ok, no VM
        Outcome("silent", NO_ANSWER),  # lost: no answer, no VM
        Outcome("own", "AlreadyExists"),  # duplicated: told its own VM already exists
        Outcome("ghost", OK, "h1"),  # lost: the host does not report it
        Outcome("slow", "HostDown"),
    ]
    view = FleetView(
        (vm("own"), vm("ghost"), vm("slow", status=Lifecycle.BUILDING)),
        (
            host(
                used=64 * 3 + 512 + 2048,
                capacity=2048,
                drift=(
                    "VM ghost is claimed here but the host does not report it",
                    "unknown domain twin (running, 1 vCPU, 64 MiB) is not claimed by virtfleet",
                ),
            ),
        ),
    )
    report = audit(outcomes, view)
    assert (report.lost, report.duplicated) == (3, 2), report.explain()
    assert report.stuck == ("slow",)
    assert report.over_capacity and report.leaked_mib == {"h1": 2560}
    assert not report.clean


def test_an_error_vm_holds_capacity_only_while_its_host_runs_it() -> None:
    kept = FleetView((vm("timed-out", status=Lifecycle.ERROR),), (host(used=64),))
    gone = FleetView(
        (vm("timed-out", status=Lifecycle.ERROR),),
        (host(used=64, drift=("VM timed-out is claimed here but the host does not report it",)),),
    )
    assert audit([Outcome("timed-out", "HostDown")], kept).leaked_mib == {"h1": 0}
    assert audit([Outcome("timed-out", "HostDown")], gone).leaked_mib == {"h1": 64}
