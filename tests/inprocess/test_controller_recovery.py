"""Recovery of what a dead controller left half done (controller.recovery), in process.

A dead controller is simulated exactly: an instance row whose heartbeat is older than the expiry
owns VMs left building or with a task, as a controller killed at that instruction leaves them.
The fleet's own controller runs its passes only when the test calls :meth:`Recovery.step` (its
intervals are an hour), so each case is deterministic. Hosts ``a`` and ``b`` run real agents over
the fakes; ``b`` is stopped (down) for the host-down case only.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from inproc import HostShape, InProcessFleet, inprocess_fleet
from vfsupport import wait_until

from common.messages.base import replace
from common.messages.vm import DiskFormat, Lifecycle, PowerState, Task
from controller.db import liveness
from controller.db import repository as repo
from controller.db.models import ControllerInstance
from controller.recovery import Recovery

#: the instance id of the simulated dead controller
DEAD = "dead-controller"
HOUR = 3600.0


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessFleet]:
    hosts = {"a": HostShape("small"), "b": HostShape("small")}
    with inprocess_fleet(
        tmp_path_factory.mktemp("recovery"),
        hosts,
        down_after_s=3.0,
        instance_heartbeat_s=0.5,
        recovery_interval_s=HOUR,
        reconcile_interval_s=HOUR,
    ) as f:
        recovery = _recovery(f)
        with recovery.service.tx() as s:
            liveness.register(s, DEAD, "controller:killed", time.time() - HOUR)
        yield f


def _recovery(fleet: InProcessFleet) -> Recovery:
    assert fleet.controller is not None
    return fleet.controller.recovery


def _create(fleet: InProcessFleet, name: str, host: str = "a") -> str:
    created = fleet.cli("vm", "create", name, "--memory", "128", "--disk", "1", "--host", host)
    assert created.code == 0, created.stdout + created.stderr
    return str(created.json["vm"]["uuid"])


def _leave(fleet: InProcessFleet, uuid: str, owner: str | None = DEAD, **values: Any) -> None:
    """Make the VM's row what a controller that died mid-work leaves."""
    recovery = _recovery(fleet)
    with recovery.service.tx() as s:
        repo.update_vm(s, uuid, time.time(), owner=owner, **values)


def _vm(fleet: InProcessFleet, name: str) -> dict[str, Any]:
    shown: dict[str, Any] = fleet.cli_ok("vm", "show", name)
    return shown


def _step(fleet: InProcessFleet, *, full: bool = False) -> list[str]:
    return _recovery(fleet).step(full=full)


def test_a_running_controller_is_alive_and_holds_the_lease(fleet: InProcessFleet) -> None:
    recovery = _recovery(fleet)
    assert recovery.holds_lease(), "it took the lease at start and renews it"
    with recovery.service.tx() as s:
        row = s.get(ControllerInstance, recovery.instance_id)
        assert row is not None and row.name == "controller"
        assert liveness.holder_of(s, liveness.RECONCILER, time.time()) == recovery.instance_id
    beat = row.heartbeat_at
    wait_until(lambda: _heartbeat(fleet) > beat, 30, "the next liveness heartbeat")


def _heartbeat(fleet: InProcessFleet) -> float:
    recovery = _recovery(fleet)
    with recovery.service.tx() as s:
        row = s.get(ControllerInstance, recovery.instance_id)
        assert row is not None
        return row.heartbeat_at


def test_a_build_that_never_reached_its_host_is_sent_again(fleet: InProcessFleet) -> None:
    uuid = _create(fleet, "never-sent")
    hv = fleet.fake("a").hypervisor
    hv.destroy(uuid)
    hv.undefine(uuid)  # the domain as it was before the command was sent: none
    _leave(fleet, uuid, status=Lifecycle.BUILDING, task=Task.BUILDING, power_state=PowerState.NOSTATE)
    used = fleet.used("a")["MEMORY_MIB"]

    changes = _step(fleet)

    assert any("never-sent" in c and "re-sent" in c for c in changes), changes
    vm = _vm(fleet, "never-sent")
    assert (vm["status"], vm["task"], vm["power_state"], vm["host"]) == ("active", None, "running", "a")
    status = hv.find(uuid)
    assert status is not None and status.state is PowerState.RUNNING
    assert fleet.used("a")["MEMORY_MIB"] == used, "the claim is the build's: kept, not doubled"
    fleet.cli_ok("vm", "delete", "never-sent", "--delete-disks")


def test_a_build_that_reached_its_host_is_adopted_as_it_runs(fleet: InProcessFleet) -> None:
    uuid = _create(fleet, "reached")
    _leave(fleet, uuid, status=Lifecycle.BUILDING, task=Task.BUILDING, power_state=PowerState.NOSTATE)

    changes = _step(fleet)

    assert any("reached" in c and "had reached a" in c for c in changes), changes
    vm = _vm(fleet, "reached")
    assert (vm["status"], vm["task"], vm["power_state"]) == ("active", None, "running")
    fleet.cli_ok("vm", "delete", "reached", "--delete-disks")


def test_a_task_left_by_a_dead_controller_is_cleared_from_the_hosts_truth(fleet: InProcessFleet) -> None:
    uuid = _create(fleet, "half-shut")
    fleet.fake("a").hypervisor.destroy(uuid)  # the shutdown went through; its answer was never recorded
    _leave(fleet, uuid, task=Task.SHUTTING_DOWN)

    _step(fleet)

    vm = _vm(fleet, "half-shut")
    assert (vm["status"], vm["task"], vm["power_state"]) == ("active", None, "shutoff")
    fleet.cli_ok("vm", "delete", "half-shut", "--delete-disks")


def test_a_delete_whose_domain_is_gone_is_finished(fleet: InProcessFleet) -> None:
    used = fleet.used("a")["MEMORY_MIB"]
    uuid = _create(fleet, "half-deleted")
    hv = fleet.fake("a").hypervisor
    hv.destroy(uuid)
    hv.undefine(uuid)
    _leave(fleet, uuid, task=Task.DELETING)

    _step(fleet)

    assert fleet.cli("vm", "show", "half-deleted").code != 0, "the VM is forgotten"
    assert fleet.used("a")["MEMORY_MIB"] == used, "and its claim released"


def test_work_of_a_live_controller_is_never_touched(fleet: InProcessFleet) -> None:
    recovery = _recovery(fleet)
    with recovery.service.tx() as s:
        liveness.register(s, "live-elsewhere", "controller:other", time.time())
    uuid = _create(fleet, "busy")
    _leave(fleet, uuid, owner="live-elsewhere", task=Task.REBOOTING)
    unowned = _create(fleet, "young-unowned")
    with recovery.service.tx() as s:  # written before owners were recorded, a moment ago
        repo.update_vm(s, unowned, time.time(), owner=None, task=Task.SUSPENDING)

    _step(fleet, full=True)

    assert _vm(fleet, "busy")["task"] == "rebooting"
    assert _vm(fleet, "young-unowned")["task"] == "suspending"
    # The other controller dies: now its work is recovered.
    with recovery.service.tx() as s:
        liveness.beat(s, "live-elsewhere", "controller:other", time.time() - HOUR)
    _step(fleet)
    assert _vm(fleet, "busy")["task"] is None
    for name in ("busy", "young-unowned"):
        _leave(fleet, _vm(fleet, name)["uuid"], owner=None, task=None)
        fleet.cli_ok("vm", "delete", name, "--delete-disks")


def test_stray_claims_are_released_and_missing_claims_restored(fleet: InProcessFleet) -> None:
    free_before = fleet.used("a")["MEMORY_MIB"]
    kept = _create(fleet, "claimless")
    dropped = _create(fleet, "hostless")
    recovery = _recovery(fleet)
    with recovery.service.tx() as s:
        amounts = repo.allocations_of(s, kept)
        repo.release(s, kept, "a")  # placed, holds no claim
        repo.update_vm(s, dropped, time.time(), host_id=None, status=Lifecycle.ERROR)  # claim, no host
    recovery.service.hosts_changed("a")

    changes = _step(fleet, full=True)

    assert any("claimless: claimed again" in c for c in changes), changes
    assert any(dropped in c and "released" in c for c in changes), changes
    with recovery.service.tx() as s:
        assert repo.allocations_of(s, kept) == amounts
        assert repo.allocations_of(s, dropped) == {}
    assert fleet.used("a")["MEMORY_MIB"] == free_before + 128
    fleet.cli_ok("vm", "delete", "claimless", "--delete-disks")
    fleet.cli_ok("vm", "delete", "hostless")


def test_an_error_vm_its_host_runs_becomes_active(fleet: InProcessFleet) -> None:
    uuid = _create(fleet, "ran-anyway")
    _leave(fleet, uuid, owner=None, status=Lifecycle.ERROR, last_error="build on a got no reply")

    _step(fleet, full=True)

    vm = _vm(fleet, "ran-anyway")
    assert (vm["status"], vm["last_error"]) == ("active", None)
    fleet.cli_ok("vm", "delete", "ran-anyway", "--delete-disks")


def test_builds_on_a_host_that_is_down_are_left_with_their_claims(fleet: InProcessFleet) -> None:
    uuid = _create(fleet, "on-down-host", host="b")
    used = fleet.used("b")["MEMORY_MIB"]
    fleet.kill_agent("b")
    try:
        wait_until(lambda: fleet.cli_ok("host", "show", "b")["status"] == "down", 30, "host b down")
        _leave(fleet, uuid, status=Lifecycle.BUILDING, task=Task.BUILDING)

        assert not [c for c in _step(fleet) if "on-down-host" in c]

        vm = _vm(fleet, "on-down-host")
        assert (vm["status"], vm["host"]) == ("building", "b")
        assert fleet.used("b")["MEMORY_MIB"] == used
    finally:
        fleet.start_agent("b")
    fleet.wait_hosts({"b"})
    _step(fleet)  # back up: now it is recovered (the domain runs there: adopted)
    assert _vm(fleet, "on-down-host")["status"] == "active"
    fleet.cli_ok("vm", "delete", "on-down-host", "--delete-disks")


def test_a_build_re_sent_keeps_the_shared_disk_its_create_allowed(fleet: InProcessFleet) -> None:
    """``--allow-shared-disk`` is part of what was asked: the re-sent build says it again (it
    used not to, and the agent refused the disk the first guest holds: the VM failed)."""
    hv = fleet.fake("a").hypervisor
    image = hv.add_file("/srv/images/shared.raw", DiskFormat.RAW, 1)
    for name in ("holder", "sharer"):
        created = fleet.cli(
            "vm", "create", name, "--host", "a", "--memory", "64", "--disk", f"path={image}",
            "--allow-shared-disk",
        )  # fmt: skip
        assert created.code == 0, created.stdout + created.stderr
        if name == "holder":  # defined, so its disk is in use; off, so qemu's write lock is free
            fleet.cli_ok("vm", "destroy", name)
    uuid = str(_vm(fleet, "sharer")["uuid"])
    hv.destroy(uuid)
    hv.undefine(uuid)  # the sharer's build as it was before the command was sent
    _leave(fleet, uuid, status=Lifecycle.BUILDING, task=Task.BUILDING, power_state=PowerState.NOSTATE)

    changes = _step(fleet)

    assert any("sharer" in c and "re-sent" in c for c in changes), changes
    shown = _vm(fleet, "sharer")
    assert (shown["status"], shown["power_state"], shown["last_error"]) == ("active", "running", None)
    for name in ("sharer", "holder"):
        fleet.cli_ok("vm", "delete", name)


def test_a_refused_resend_releases_the_claim_and_says_why(fleet: InProcessFleet) -> None:
    used = fleet.used("a")["MEMORY_MIB"]
    uuid = _create(fleet, "refused")
    hv = fleet.fake("a").hypervisor
    hv.destroy(uuid)
    hv.undefine(uuid)
    recovery = _recovery(fleet)
    with recovery.service.tx() as s:
        vm = repo.get_vm_by_uuid(s, uuid)
        assert vm.spec is not None
        broken = replace(vm.spec, name="refused", disks=(replace(vm.spec.disks[0], pool="no-such-pool"),))
        repo.update_vm(s, uuid, time.time(), spec=broken)
    _leave(fleet, uuid, status=Lifecycle.BUILDING, task=Task.BUILDING, power_state=PowerState.NOSTATE)

    _step(fleet)

    shown = _vm(fleet, "refused")
    assert (shown["status"], shown["host"]) == ("error", None)
    assert "re-sent" in shown["last_error"] and DEAD in shown["last_error"], shown["last_error"]
    assert fleet.used("a")["MEMORY_MIB"] == used
    fleet.cli_ok("vm", "delete", "refused")


def test_a_build_left_between_two_hosts_is_failed(fleet: InProcessFleet) -> None:
    uuid = _create(fleet, "between-hosts")
    recovery = _recovery(fleet)
    with recovery.service.tx() as s:  # a reschedule: the first host's claim released, no new one yet
        repo.release(s, uuid, "a")
    _leave(fleet, uuid, host_id=None, status=Lifecycle.BUILDING, task=Task.BUILDING)

    _step(fleet)

    vm = _vm(fleet, "between-hosts")
    assert (vm["status"], vm["task"], vm["host"]) == ("error", None, None)
    assert vm["last_error"] == f"build interrupted: controller instance {DEAD} stopped"
    fleet.fake("a").hypervisor.destroy(uuid)
    fleet.fake("a").hypervisor.undefine(uuid)
    fleet.cli_ok("vm", "delete", "between-hosts")
