"""The fleet driven with the ``virtfleet`` CLI as an operator would: a real controller and three
real agents in process, on the in-memory broker, over simulated hosts of three sizes
(tests/fixtures/nodes: small, medium, large).

Most tests share one fleet and leave it as they found it; the ones that take hosts down or drop
the broker's connections get a fleet of their own. tests/e2e/test_fleet_cli.py keeps a smoke set
of the same on real processes, RabbitMQ and libvirt's test driver.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from inproc import HostShape, InProcessFleet, inprocess_fleet
from vfsupport import SHORT_DOWN_AFTER_S, CliResult, wait_until

from common.errors import HypervisorError, InternalError, VirtfleetError
from common.messages import api
from common.transport.memory import MemoryConsumer
from controller.cli.client import ApiClient
from controller.cli.runner import exit_code
from controller.cli.vm_options import parse_disks

SIZES = {"small": (8, 16384), "medium": (16, 65536), "large": (32, 131072)}
SHAPES = {name: HostShape(name) for name in SIZES}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessFleet]:
    with inprocess_fleet(tmp_path_factory.mktemp("fleet"), SHAPES) as f:
        yield f


@pytest.fixture
def short_fleet(tmp_path: Path) -> Iterator[InProcessFleet]:
    """A fleet of its own whose hosts go down soon after their heartbeats stop (for tests that stop
    them; the others keep the long default, so that a starved heartbeat never changes what they see)."""
    with inprocess_fleet(tmp_path, SHAPES, down_after_s=SHORT_DOWN_AFTER_S) as f:
        yield f


@pytest.fixture
def own_fleet(tmp_path: Path) -> Iterator[InProcessFleet]:
    """A fleet for one test that takes hosts down or breaks the broker."""
    with inprocess_fleet(tmp_path, SHAPES) as f:
        yield f


def _reason(fleet: InProcessFleet, name: str, host: str) -> dict[str, str]:
    refused = fleet.cli("vm", "create", name, "--memory", "64", "--disk", "1", "--host", host)
    assert refused.code == 4, refused.stdout + refused.stderr
    return next(r for r in refused.json["error"]["details"]["reasons"] if r["host"] == host)


def _vm_names(fleet: InProcessFleet) -> list[str]:
    return [v["name"] for v in fleet.cli_ok("vm", "list")["vms"]]


# ----------------------------------------------------------------------------- moved from e2e


def test_hosts_report_their_size(fleet: InProcessFleet) -> None:
    hosts = fleet.hosts()
    for name, (cpus, memory) in SIZES.items():
        assert hosts[name]["status"] == "up"
        assert hosts[name]["cpus"] == cpus
        assert hosts[name]["memory_mib"] == memory
        assert hosts[name]["hypervisor_type"].lower() == "test"
    by_resource = fleet.resources("medium")
    assert by_resource["MEMORY_MIB"]["reserved"] == 512
    assert by_resource["MEMORY_MIB"]["capacity"] == 65536 - 512
    assert by_resource["VCPU"]["capacity"] == 16 * 4


def test_vm_lands_only_where_it_fits(fleet: InProcessFleet) -> None:
    # 20 GiB cannot fit the small host (15.5 GiB usable): it must go elsewhere.
    args = ("vm", "create", "fits-big", "--vcpus", "2", "--memory", "20480", "--disk", "5")
    explained = fleet.cli_ok(*args, "--dry-run")
    rejected = {r["host"]: r for r in explained["placement"]["rejected"]}
    assert rejected["small"]["rule"] == "capacity"
    assert "memory short by" in rejected["small"]["message"]
    created = fleet.cli_ok(*args)
    assert created["vm"]["host"] in {"medium", "large"}
    assert created["vm"]["status"] == "active"
    assert created["vm"]["power_state"] == "running"
    assert created["placement"]["host"] == created["vm"]["host"] == explained["placement"]["host"]

    forced = fleet.cli_ok("vm", "create", "on-small", "--memory", "1024", "--disk", "2", "--host", "small")
    assert forced["vm"]["host"] == "small"
    shown = fleet.cli_ok("vm", "show", "on-small")
    assert shown["host"] == "small"
    assert shown["power_state"] == "running"
    listed = {v["name"]: v for v in fleet.cli_ok("vm", "list")["vms"]}
    assert {"fits-big", "on-small"} <= set(listed)
    # In process the hosts' own state can be read too: each VM runs where the controller says.
    assert fleet.fake(created["vm"]["host"]).hypervisor.uuid_for_name("fits-big") == created["vm"]["uuid"]
    assert fleet.fake("small").hypervisor.uuid_for_name("on-small") == forced["vm"]["uuid"]


def test_vm_that_fits_nowhere_is_refused_with_reasons_per_host(fleet: InProcessFleet) -> None:
    result = fleet.cli("vm", "create", "too-big", "--memory", "400000", "--disk", "1")
    assert result.code == 4, result.stdout + result.stderr
    error = result.json["error"]
    assert error["type"] == "NoValidHost"
    reasons = {r["host"]: r for r in error["details"]["reasons"]}
    assert set(reasons) == set(SIZES)
    for host, reason in reasons.items():
        assert reason["rule"] == "capacity", reason
        assert reason["resource"] == "MEMORY_MIB"
        assert reason["short_by"] > 0
        assert f"{host}: " not in reason["message"]  # the message is per host, the host is a field
    assert "memory short by" in error["message"]
    assert fleet.cli("vm", "show", "too-big").code == 3  # nothing was recorded

    text = fleet.cli("vm", "create", "too-big", "--memory", "400000", output="table")
    assert text.code == 4
    for host in SIZES:
        assert host in text.stderr


def test_bad_input_gets_a_clear_error_and_changes_nothing(fleet: InProcessFleet) -> None:
    before = fleet.cli_ok("vm", "list")["vms"]
    bad_name = fleet.cli("vm", "create", "bad name!", "--memory", "64")
    assert bad_name.code == 2
    assert "invalid VM name" in bad_name.json["error"]["message"]
    zero = fleet.cli("vm", "create", "zero-cpu", "--vcpus", "0")
    assert zero.code == 2
    assert "vcpus must be a positive integer" in zero.json["error"]["message"]
    unknown_host = fleet.cli("vm", "create", "nowhere", "--host", "no-such-host")
    assert unknown_host.code == 3
    assert "no-such-host" in unknown_host.json["error"]["message"]
    fleet.cli_ok("vm", "create", "dup", "--memory", "256", "--disk", "1")
    dup = fleet.cli("vm", "create", "dup", "--memory", "256", "--disk", "1")
    assert dup.code == 4
    assert dup.json["error"]["type"] == "AlreadyExists"
    missing = fleet.cli("vm", "start", "no-such-vm")
    assert missing.code == 3
    after = fleet.cli_ok("vm", "list")["vms"]
    assert {v["name"] for v in after} == {v["name"] for v in before} | {"dup"}


def test_dry_run_claims_nothing(fleet: InProcessFleet) -> None:
    before = fleet.cli_ok("host", "show", "large")["resources"]
    calls_before = {h: list(fleet.fake(h).hypervisor.calls) for h in SIZES}
    plan = fleet.cli_ok("vm", "create", "dry", "--memory", "2048", "--disk", "1", "--dry-run")
    assert plan["dry_run"] is True
    assert plan["vm"] is None
    assert plan["placement"]["host"] in SIZES
    assert plan["placement"]["candidates"][0]["host"] == plan["placement"]["host"]
    assert fleet.cli_ok("host", "show", "large")["resources"] == before
    assert fleet.cli("vm", "show", "dry").code == 3
    # No host was asked to do anything.
    assert {h: list(fleet.fake(h).hypervisor.calls) for h in SIZES} == calls_before


def test_disabled_and_maintenance_hosts_take_nothing_and_say_why(fleet: InProcessFleet) -> None:
    fleet.cli_ok("host", "disable", "large", "--reason", "PSU swap")
    fleet.cli_ok("host", "maintenance", "medium", "--reason", "BIOS 2.1")
    try:
        shown = fleet.cli_ok("host", "show", "large")
        assert (shown["enabled"], shown["state_reason"]) == (False, "PSU swap")
        assert "PSU swap" in fleet.cli("host", "show", "large", output="table").stdout
        large = _reason(fleet, "to-large", "large")
        assert (large["rule"], large["message"]) == ("disabled", "disabled by an operator: PSU swap")
        medium = _reason(fleet, "to-medium", "medium")
        assert (medium["rule"], medium["message"]) == ("maintenance", "in maintenance: BIOS 2.1")
        # A second switch without a reason keeps the first one.
        fleet.cli_ok("host", "disable", "medium")
        assert fleet.cli_ok("host", "show", "medium")["state_reason"] == "BIOS 2.1"
        placed = fleet.cli_ok("vm", "create", "only-small", "--memory", "64", "--disk", "1")
        assert placed["vm"]["host"] == "small"
        fleet.cli_ok("vm", "delete", "only-small")
    finally:
        fleet.cli_ok("host", "enable", "large")
        fleet.cli_ok("host", "enable", "medium")
        fleet.cli_ok("host", "maintenance", "medium", "--off")
    # Back in service: the reason is forgotten, and the hosts take VMs again.
    assert fleet.cli_ok("host", "show", "large")["state_reason"] is None
    assert fleet.cli_ok("host", "show", "medium")["state_reason"] is None
    assert fleet.cli_ok(
        "vm", "create", "to-large", "--memory", "64", "--disk", "1", "--host", "large", "--dry-run"
    )


def test_lifecycle_through_the_cli(fleet: InProcessFleet) -> None:
    fleet.cli_ok("vm", "create", "life", "--memory", "512", "--disk", "1")
    assert fleet.cli_ok("vm", "destroy", "life")["vm"]["power_state"] == "shutoff"
    assert fleet.cli_ok("vm", "start", "life")["vm"]["power_state"] == "running"
    assert fleet.cli_ok("vm", "shutdown", "life", "--grace", "10")["vm"]["power_state"] == "shutoff"
    host = fleet.cli_ok("vm", "show", "life")["host"]
    used_before = fleet.used(host)
    fleet.cli_ok("vm", "delete", "life", "--delete-disks")
    assert fleet.cli("vm", "show", "life").code == 3
    used_after = fleet.used(host)
    assert used_before["MEMORY_MIB"] - used_after["MEMORY_MIB"] == 512
    # The host's side: the domain is gone, and so is the volume virtfleet made for it.
    hv = fleet.fake(host).hypervisor
    assert hv.uuid_for_name("life") is None
    assert not [path for path in hv.volumes().values() if "life" in path]


def test_a_new_vm_of_a_deleted_vms_name_is_not_given_the_disk_that_delete_kept(fleet: InProcessFleet) -> None:
    fleet.cli_ok("vm", "create", "kept", "--host", "small", "--memory", "256", "--disk", "1")
    fleet.cli_ok("vm", "delete", "kept")  # disks kept (no --delete-disks)
    used = fleet.used("small")

    again = fleet.cli("vm", "create", "kept", "--host", "small", "--memory", "256", "--disk", "1")

    assert again.code == 4, again.stdout + again.stderr
    error = again.json["error"]
    assert error["type"] == "AlreadyExists"
    assert "volume default/kept-vda.qcow2 exists already" in error["message"]
    assert fleet.cli("vm", "show", "kept").code == 3, "the refused VM is not left behind"
    assert fleet.used("small") == used, "nor its claim"
    hv = fleet.fake("small").hypervisor
    assert hv.uuid_for_name("kept") is None
    # The kept disk is the old VM's, as it was: still there, for vm import or --disk path=.
    assert [path for path in hv.volumes().values() if "kept" in path] == [
        "/var/lib/virtfleet/images/kept-vda.qcow2"
    ]


def test_50_concurrent_creates_never_exceed_capacity(own_fleet: InProcessFleet) -> None:
    fleet = own_fleet
    size = {"VCPU": 1, "MEMORY_MIB": 4096, "DISK_GIB": 1}
    expected = 0
    for host in SIZES:
        res = fleet.resources(host)
        expected += min(res[r]["free"] // amount for r, amount in size.items())
    assert 0 < expected < 50, f"the fleet must be over-subscribed by 50 creates; it fits {expected}"

    # What `virtfleet vm create burst-NN --memory 4096 --disk 1` sends, from 50 clients at once, each
    # on its own connection. (Not through fleet.cli: the CLI runner swaps the process's
    # stdout/stderr, which threads cannot share; the CLI's exit code is runner.exit_code.)
    def create(i: int) -> int:
        body = api.VmCreate(name=f"burst-{i:02d}", vcpus=1, memory_mib=4096, disks=parse_disks(["1"]) or ())
        client = ApiClient(fleet.broker.transport(f"cli-burst-{i:02d}", user="operator"))
        try:
            client.call(api.API_VM_CREATE, body)
        except VirtfleetError as exc:
            return exit_code(exc)
        finally:
            client.close()
        return 0

    with ThreadPoolExecutor(max_workers=50) as pool:
        codes = list(pool.map(create, range(50)))
    assert sorted(set(codes)) <= [0, 4], f"unexpected exit codes {codes}"
    assert codes.count(0) == expected, f"{codes.count(0)} created, {expected} fit"
    for host in SIZES:
        for name, r in fleet.resources(host).items():
            assert r["used"] <= r["capacity"], f"{host} {name} over capacity: {r}"
            assert r["free"] >= 0
    burst = [v for v in fleet.cli_ok("vm", "list")["vms"] if v["name"].startswith("burst-")]
    assert len(burst) == expected
    assert all(v["status"] == "active" for v in burst)
    # Every VM the controller counts exists on its host, and no host runs one it does not count.
    on_hosts = sorted(
        s.name for h in SIZES for s in fleet.fake(h).hypervisor.list_statuses() if s.name.startswith("burst-")
    )
    assert on_hosts == sorted(v["name"] for v in burst)


def test_fleet_recovers_when_the_broker_drops_every_connection(own_fleet: InProcessFleet) -> None:
    fleet = own_fleet
    controller = fleet.controller
    assert controller is not None
    dropped = fleet.broker.kill_connections("")  # every connection: controller's and agents'
    assert dropped >= 3 + len(SIZES)  # at least the controller's three consumers and each agent's
    # Agents reconnect, heartbeat again; the controller serves the API again.
    wait_until(controller.api.healthy, 30, "the controller's API consumer to reconnect")
    for name in SIZES:
        agent = fleet.hosts_by_name[name].agent
        assert agent is not None
        wait_until(agent.server.healthy, 30, f"the agent of {name} to reconnect")
    fleet.wait_hosts(set(SIZES), timeout=30)

    def create() -> CliResult | None:
        # The idempotency key makes a retry after an ambiguous failure create the VM once.
        args = ("vm", "create", "after-drop", "--memory", "64", "--disk", "1", "--idempotency-key", "k-drop")
        result = fleet.cli(*args)
        return result if result.code == 0 else None

    created = wait_until(create, 30, "a create to succeed after the drop")
    assert created.json["vm"]["name"] == "after-drop"
    assert _vm_names(fleet).count("after-drop") == 1
    for consumer in (controller.api, controller.reports, controller.heartbeats):
        assert isinstance(consumer, MemoryConsumer) and consumer.reconnects >= 1


def test_killed_agent_marks_host_down_and_it_is_not_chosen(short_fleet: InProcessFleet) -> None:
    fleet = short_fleet
    fleet.kill_agent("small")
    fleet.wait_hosts({"small"}, status="down", timeout=SHORT_DOWN_AFTER_S + 60)
    refused = fleet.cli("vm", "create", "after-kill", "--memory", "64", "--disk", "1", "--host", "small")
    assert refused.code == 4
    reasons = refused.json["error"]["details"]["reasons"]
    assert any(r["host"] == "small" and r["rule"] == "host_down" for r in reasons), reasons
    placed = [
        fleet.cli_ok("vm", "create", f"after-kill-{i}", "--memory", "64", "--disk", "1") for i in range(3)
    ]
    assert all(p["vm"]["host"] != "small" for p in placed)
    fleet.wait_hosts({"medium"}, timeout=10)  # the other hosts stay up

    # A restarted agent brings its host back, and it takes VMs again.
    fleet.start_agent("small")
    fleet.wait_hosts({"small"}, timeout=30)
    back = fleet.cli_ok("vm", "create", "after-restart", "--memory", "64", "--disk", "1", "--host", "small")
    assert back["vm"]["host"] == "small" and back["vm"]["power_state"] == "running"


# ----------------------------------------------------------------------------- in-process only


def test_a_silent_host_is_down_and_its_vms_are_refused_naming_it(short_fleet: InProcessFleet) -> None:
    fleet = short_fleet
    on_medium = fleet.cli_ok("vm", "create", "quiet", "--memory", "64", "--disk", "1", "--host", "medium")
    assert on_medium["vm"]["host"] == "medium"
    hv = fleet.fake("medium").hypervisor
    # Only the heartbeats stop: the agent still consumes its queue, so whatever is refused now is
    # refused by the controller, from the heartbeats alone.
    agent = fleet.hosts_by_name["medium"].agent
    assert agent is not None
    agent.reporter.stop(final_report=False)
    fleet.wait_hosts({"medium"}, status="down", timeout=SHORT_DOWN_AFTER_S + 60)
    down = fleet.cli_ok("host", "show", "medium")
    assert down["status"] == "down" and down["down_since"] is not None
    assert "quiet" in down["vms"]

    calls = list(hv.calls)
    for verb in ("destroy", "reboot", "delete"):
        refused = fleet.cli("vm", verb, "quiet")
        assert refused.code == 4, (verb, refused.stdout + refused.stderr)
        error = refused.json["error"]
        assert error["type"] == "HostDown" and error["retryable"] is True
        assert error["details"] == {"host": "medium"}
        assert "host medium of VM quiet is down" in error["message"]
    assert hv.calls == calls  # nothing reached the host
    shown = fleet.cli_ok("vm", "show", "quiet")
    assert (shown["power_state"], shown["task"]) == ("running", None)  # no task left behind
    assert _reason(fleet, "to-medium", "medium")["rule"] == "host_down"
    text = fleet.cli("vm", "destroy", "quiet", output="table")
    assert text.code == 4 and "host medium of VM quiet is down" in text.stderr

    # Heartbeats again (a new agent over the same host): the VM can be operated again.
    fleet.stop_agent("medium")
    fleet.start_agent("medium")
    fleet.wait_hosts({"medium"}, timeout=30)
    assert fleet.cli_ok("vm", "destroy", "quiet")["vm"]["power_state"] == "shutoff"
    assert hv.count("destroy") == 1
    fleet.cli_ok("vm", "delete", "quiet")


def _first_choice(fleet: InProcessFleet, *args: str) -> tuple[str, list[str]]:
    plan = fleet.cli_ok("vm", "create", *args, "--dry-run")["placement"]
    return plan["host"], plan["alternates"]


def test_a_build_that_fails_on_one_host_is_rescheduled_on_the_next(
    fleet: InProcessFleet, caplog: pytest.LogCaptureFixture
) -> None:
    args = ("resched", "--memory", "64", "--disk", "1")
    first, alternates = _first_choice(fleet, *args)
    assert len(alternates) == 2
    failing = fleet.fake(first).hypervisor
    failing.fail_next("start", HypervisorError("cannot start VM: could not open kernel file"))
    with caplog.at_level(logging.WARNING, logger="controller.service"):
        created = fleet.cli_ok("vm", "create", *args)
    assert created["vm"]["host"] == alternates[0]
    assert created["vm"]["status"] == "active" and created["vm"]["power_state"] == "running"
    assert f"build of resched failed on {first}" in caplog.text
    # Nothing was left behind on the host that failed: no domain, no volume, no claim.
    assert failing.count("start") >= 1 and failing.count("undefine") >= 1
    assert failing.uuid_for_name("resched") is None
    assert not [path for path in failing.volumes().values() if "resched" in path]
    used_by = {h: fleet.used(h)["MEMORY_MIB"] for h in SIZES}
    fleet.cli_ok("vm", "delete", "resched", "--delete-disks")
    after = {h: fleet.used(h)["MEMORY_MIB"] for h in SIZES}
    assert used_by[alternates[0]] - after[alternates[0]] == 64
    assert used_by[first] == after[first]  # the failed host held no claim for it


def test_a_build_that_fails_everywhere_is_an_error_that_can_be_deleted(fleet: InProcessFleet) -> None:
    before = {h: fleet.used(h) for h in SIZES}
    for host in SIZES:
        fleet.fake(host).hypervisor.fail_next("start", HypervisorError(f"{host} says no"))
    failed = fleet.cli("vm", "create", "doomed", "--memory", "64", "--disk", "1")
    assert failed.code == 1, failed.stdout + failed.stderr
    error = failed.json["error"]
    assert error["type"] == "HypervisorError"
    assert "failed on every host tried" in error["message"]
    assert sorted(error["details"]["hosts"]) == sorted(SIZES)
    for host in SIZES:
        assert f"{host}: " in error["message"] and f"{host} says no" in error["message"]
    shown = fleet.cli_ok("vm", "show", "doomed")
    assert (shown["status"], shown["host"]) == ("error", None)
    assert "says no" in shown["last_error"]
    assert {h: fleet.used(h) for h in SIZES} == before  # every claim released
    assert all(fleet.fake(h).hypervisor.uuid_for_name("doomed") is None for h in SIZES)
    # A VM without a host can only be deleted.
    stuck = fleet.cli("vm", "start", "doomed")
    assert stuck.code == 4 and stuck.json["error"]["type"] == "Conflict"
    assert "VM doomed has no host (status error); only delete is possible" in stuck.json["error"]["message"]
    fleet.cli_ok("vm", "delete", "doomed")
    assert fleet.cli("vm", "show", "doomed").code == 3


def test_a_forced_host_that_fails_the_build_is_not_replaced(fleet: InProcessFleet) -> None:
    fleet.fake("small").hypervisor.fail_next("start", HypervisorError("small says no"))
    failed = fleet.cli("vm", "create", "pinned", "--memory", "64", "--disk", "1", "--host", "small")
    assert failed.code == 4, failed.stdout + failed.stderr
    error = failed.json["error"]
    assert error["type"] == "NoValidHost"
    assert "failed on small and no other host can take it" in error["message"]
    assert "small says no" in error["message"]
    assert fleet.cli_ok("vm", "show", "pinned")["status"] == "error"
    fleet.cli_ok("vm", "delete", "pinned")


def test_a_build_failing_with_an_error_of_no_host_is_not_rescheduled(fleet: InProcessFleet) -> None:
    first, _alternates = _first_choice(fleet, "odd-fail", "--memory", "64", "--disk", "1")
    before = {h: fleet.used(h) for h in SIZES}
    starts = {h: fleet.fake(h).hypervisor.count("start") for h in SIZES}
    fleet.fake(first).hypervisor.fail_next("start", InternalError("the fake's bug of the day"))
    failed = fleet.cli("vm", "create", "odd-fail", "--memory", "64", "--disk", "1")
    assert failed.code == 1, failed.stdout + failed.stderr
    assert failed.json["error"]["type"] == "InternalError"
    # Only the first host was tried: an error that is not the host's fault is not retried elsewhere.
    assert {h: fleet.fake(h).hypervisor.count("start") - starts[h] for h in SIZES} == {
        h: int(h == first) for h in SIZES
    }
    shown = fleet.cli_ok("vm", "show", "odd-fail")
    assert (shown["status"], shown["host"]) == ("error", None)
    assert "bug of the day" in shown["last_error"]
    assert {h: fleet.used(h) for h in SIZES} == before  # the claim was released
    fleet.cli_ok("vm", "delete", "odd-fail")


def test_a_failed_operation_records_the_error_and_clears_the_task(fleet: InProcessFleet) -> None:
    made = fleet.cli_ok("vm", "create", "flaky", "--memory", "64", "--disk", "1")
    hv = fleet.fake(made["vm"]["host"]).hypervisor
    hv.fail_next("destroy", HypervisorError("cannot destroy VM: device busy"))
    failed = fleet.cli("vm", "destroy", "flaky")
    assert failed.code == 1 and failed.json["error"]["type"] == "HypervisorError"
    shown = fleet.cli_ok("vm", "show", "flaky")
    assert (shown["power_state"], shown["task"]) == ("running", None)
    assert "device busy" in shown["last_error"]
    hv.fail_next("undefine", HypervisorError("cannot undefine VM: locked"))
    kept = fleet.cli("vm", "delete", "flaky")
    assert kept.code == 1 and "locked" in kept.json["error"]["message"]
    assert "flaky" in _vm_names(fleet)  # still known, still claimed
    assert "locked" in fleet.cli_ok("vm", "show", "flaky")["last_error"]
    # The next attempts go through.
    assert fleet.cli_ok("vm", "destroy", "flaky")["vm"]["power_state"] == "shutoff"
    fleet.cli_ok("vm", "delete", "flaky", "--delete-disks")
    assert hv.uuid_for_name("flaky") is None


def test_a_request_the_agent_refuses_is_not_retried_and_leaves_nothing(fleet: InProcessFleet) -> None:
    before = {h: fleet.used(h) for h in SIZES}
    defines = {h: fleet.fake(h).hypervisor.count("define") for h in SIZES}
    refused = fleet.cli(
        "vm", "create", "no-image", "--memory", "64", "--disk", "path=/srv/images/missing.qcow2"
    )
    assert refused.code == 3, refused.stdout + refused.stderr
    assert "/srv/images/missing.qcow2 does not exist" in refused.json["error"]["message"]
    assert fleet.cli("vm", "show", "no-image").code == 3  # forgotten, claim released
    assert {h: fleet.used(h) for h in SIZES} == before
    assert {h: fleet.fake(h).hypervisor.count("define") for h in SIZES} == defines


def test_an_idempotency_key_creates_once(fleet: InProcessFleet) -> None:
    args = ("vm", "create", "keyed", "--memory", "128", "--disk", "1", "--idempotency-key", "order-17")
    defines = {h: fleet.fake(h).hypervisor.count("define") for h in SIZES}
    first = fleet.cli_ok(*args)
    again = fleet.cli_ok(*args)
    assert again["vm"]["uuid"] == first["vm"]["uuid"]
    assert again["vm"]["host"] == first["vm"]["host"] == again["placement"]["host"]
    assert _vm_names(fleet).count("keyed") == 1
    assert sum(fleet.fake(h).hypervisor.count("define") - defines[h] for h in SIZES) == 1
    other = fleet.cli("vm", "create", "keyed-2", "--memory", "128", "--idempotency-key", "order-17")
    assert other.code == 4
    assert other.json["error"]["type"] == "Conflict"
    assert "idempotency key was used for VM 'keyed'" in other.json["error"]["message"]
    assert fleet.cli("vm", "show", "keyed-2").code == 3
    fleet.cli_ok("vm", "delete", "keyed", "--delete-disks")


def test_dry_runs_refuse_and_explain_like_creates(fleet: InProcessFleet) -> None:
    too_big = fleet.cli("vm", "create", "dream", "--memory", "400000", "--dry-run")
    assert too_big.code == 4 and too_big.json["error"]["type"] == "NoValidHost"
    assert fleet.cli("vm", "show", "dream").code == 3
    forced = fleet.cli_ok("vm", "create", "plan", "--memory", "64", "--host", "small", "--dry-run")
    assert forced["placement"]["host"] == "small"
    assert [c["host"] for c in forced["placement"]["candidates"]] == ["small"]
    table = fleet.cli("vm", "create", "plan", "--memory", "64", "--disk", "1", "--dry-run", output="table")
    assert table.code == 0
    assert "dry run: plan would go to" in table.stdout
    assert fleet.cli("vm", "show", "plan").code == 3


def test_a_create_without_waiting_returns_at_once_and_finishes_in_the_background(
    fleet: InProcessFleet,
) -> None:
    started = fleet.cli_ok("vm", "create", "later", "--memory", "64", "--disk", "1", "--no-wait")
    assert started["vm"]["name"] == "later"
    assert started["vm"]["host"] == started["placement"]["host"]
    assert started["vm"]["status"] in {"building", "active"}
    wait_until(lambda: fleet.cli_ok("vm", "show", "later")["status"] == "active", 30, "the background build")
    shown = fleet.cli_ok("vm", "show", "later")
    assert shown["power_state"] == "running"
    assert fleet.fake(shown["host"]).hypervisor.uuid_for_name("later") == shown["uuid"]
    fleet.cli_ok("vm", "delete", "later", "--delete-disks")

    # A background build that fails leaves the VM in error, with the reason.
    fleet.fake("small").hypervisor.fail_next("start", HypervisorError("small says no"))
    doomed = fleet.cli_ok(
        "vm", "create", "later-2", "--memory", "64", "--disk", "1", "--host", "small", "--no-wait"
    )
    assert doomed["vm"]["host"] == "small"
    wait_until(lambda: fleet.cli_ok("vm", "show", "later-2")["status"] == "error", 30, "the build to fail")
    assert "small says no" in fleet.cli_ok("vm", "show", "later-2")["last_error"]
    fleet.cli_ok("vm", "delete", "later-2")


def test_tables_for_people(fleet: InProcessFleet) -> None:
    made = fleet.cli(
        "vm", "create", "shown", "--memory", "64", "--disk", "1", "--host", "medium", output="table"
    )
    assert made.code == 0, made.stdout + made.stderr
    assert "shown created on host medium (active, running)" in made.stdout
    assert "shown: done" in made.stderr  # the progress lines
    hosts = fleet.cli("host", "list", output="table")
    assert hosts.code == 0 and all(h in hosts.stdout for h in SIZES)
    host = fleet.cli("host", "show", "medium", output="table")
    assert host.code == 0 and "MEMORY_MIB" in host.stdout and "shown" in host.stdout
    vms = fleet.cli("vm", "list", "--host", "medium", output="table")
    assert vms.code == 0 and "shown" in vms.stdout
    vm = fleet.cli("vm", "show", "shown", output="table")
    assert vm.code == 0 and "medium" in vm.stdout
    stopped = fleet.cli("vm", "destroy", "shown", output="table")
    assert stopped.code == 0 and "shown: shutoff" in stopped.stdout
    # --running leaves out what is off; --host keeps to one host.
    assert "shown" not in [v["name"] for v in fleet.cli_ok("vm", "list", "--running")["vms"]]
    assert "shown" in [v["name"] for v in fleet.cli_ok("vm", "list", "--host", "medium")["vms"]]
    assert "shown" not in [v["name"] for v in fleet.cli_ok("vm", "list", "--host", "small")["vms"]]
    gone = fleet.cli("vm", "delete", "shown", "--delete-disks", output="table")
    assert gone.code == 0 and "deleted shown and its disks" in gone.stdout
    missing = fleet.cli("host", "show", "no-such-host", output="table")
    assert missing.code == 3 and "no-such-host" in missing.stderr
