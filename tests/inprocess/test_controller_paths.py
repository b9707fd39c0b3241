"""Controller paths no other in-process test takes: reconciliation, ``vm create --no-wait`` and the
``--wait`` progress, report ingestion edge cases, heartbeats from strangers, configuration loading
with an RPC version cap, and the people-facing tables of controller/cli/render.py.

Two fleets: ``fleet`` (controller defaults; hosts ``a`` and ``b``) and ``configured`` (a
controller configured from a TOML file and the environment: ``vm`` capped at 1.0, a build
timeout of 1 s and a reconciler that runs every 0.1 s).
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from builders import host_report
from inproc import HostShape, InProcessFleet, inprocess_fleet
from vfsupport import CliResult, wait_until

from agent.drivers.fake import FakeHypervisor
from agent.reporter import TransportReportSink
from common.errors import HypervisorError, InternalError
from common.messages.base import replace
from common.messages.descriptor import Report, Version
from common.messages.host import HOST_HEARTBEAT, HOST_REPORT, CpuTopology, Heartbeat, HostReport
from common.messages.vm import VM_RESET
from controller import main as controller_main
from controller.config import ENV_VARS, VERSION_CAP_ENV, load_config
from controller.db import repository as repo
from controller.service import ControllerService


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessFleet]:
    hosts = {"a": HostShape("small"), "b": HostShape("small")}
    with inprocess_fleet(tmp_path_factory.mktemp("paths"), hosts) as f:
        yield f


CONTROLLER_TOML = """\
build_timeout_s = 1.0
reconcile_interval_s = 0.1
down_after_s = 45
n_plus_one = "yes"

[rpc]
version_cap = { vm = "1.1" }
"""


@pytest.fixture(scope="module")
def configured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessFleet]:
    """A controller configured as an operator does: a TOML file, then the environment on top."""
    tmp = tmp_path_factory.mktemp("configured")
    path = tmp / "controller.toml"
    path.write_text(CONTROLLER_TOML)
    assert load_config(path, env={}).version_cap == {"vm": Version(1, 1)}
    # The environment replaces the file's cap (an agent of the fleet was found to speak vm 1.0).
    config = load_config(path, env={VERSION_CAP_ENV: "vm=1.0"})
    assert config.version_cap == {"vm": Version(1, 0)}
    assert (config.build_timeout_s, config.reconcile_interval_s) == (1.0, 0.1)
    assert (config.down_after_s, config.n_plus_one) == (45.0, True), "an int where a float goes; yes"
    with inprocess_fleet(
        tmp,
        {"old": HostShape("small")},
        version_cap=config.version_cap,
        build_timeout_s=config.build_timeout_s,
        reconcile_interval_s=config.reconcile_interval_s,
    ) as f:
        yield f


# ----------------------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def held_define(
    monkeypatch: pytest.MonkeyPatch, hv: FakeHypervisor
) -> Iterator[tuple[threading.Event, threading.Event]]:
    """The host's ``virsh define`` blocks until released: a build that takes as long as the test wants.

    Yields (entered, release); released on the way out whatever happens.
    """
    entered, release = threading.Event(), threading.Event()
    original = hv.define

    def define(xml: str) -> str:
        entered.set()
        release.wait(120)
        return original(xml)

    monkeypatch.setattr(hv, "define", define)
    try:
        yield entered, release
    finally:
        release.set()


def service_of(fleet: InProcessFleet) -> ControllerService:
    assert fleet.controller is not None
    return fleet.controller.service


def vm_show(fleet: InProcessFleet, name: str) -> dict[str, Any]:
    return dict(fleet.cli_ok("vm", "show", name))


def request_report(fleet: InProcessFleet, host: str) -> None:
    agent = fleet.hosts_by_name[host].agent
    assert agent is not None
    agent.reporter.request_report()


def ghost_report(
    seq: int, started_at: float, *, cpus: int = 4, reported_at: float | None = None
) -> HostReport:
    """A report of host ``ghost``, which has no agent. 256 MiB (less than the 512 MiB reserved):
    nothing is ever placed there, so the other tests of the module are not disturbed."""
    return host_report(
        "ghost",
        hostname="ghost.example.net",
        hypervisor_type="QEMU",
        hypervisor_version="7.2.0",
        libvirt_uri="qemu:///system",
        hw_virt=False,
        cpu=CpuTopology(cpus=cpus),
        memory_mib=256,
        memory_free_mib=256,
        seq=seq,
        started_at=started_at,
        reported_at=time.time() if reported_at is None else reported_at,
    )


B = TypeVar("B")


def first_heartbeat(host_id: str) -> Heartbeat:
    return Heartbeat(host_id=host_id, seq=1, started_at=time.time(), sent_at=time.time())


def send_as_agent(fleet: InProcessFleet, host_id: str, op: Report[B], body: B) -> None:
    """Publish a report or heartbeat as the agent of ``host_id`` would, on a connection of its own."""
    transport = fleet.broker.transport(f"agent-{host_id}", user=f"agent-{host_id}")
    try:
        TransportReportSink(transport, host_id, f"agent:{host_id}", sign=fleet.signer(host_id)).send(
            op, body, sent_at=time.time(), ttl_s=60
        )
    finally:
        transport.close()


def create(fleet: InProcessFleet, name: str, *args: str, output: str = "json") -> CliResult:
    return fleet.cli("vm", "create", name, "--memory", "128", "--disk", "1", *args, output=output)


# ----------------------------------------------------------------------------------------- builds


def test_a_build_stuck_past_the_build_timeout_is_failed_by_the_reconciler(
    configured: InProcessFleet, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="virtfleet.controller")
    with held_define(monkeypatch, configured.fake("old").hypervisor) as (entered, release):
        created = create(configured, "stuck", "--no-wait")
        assert created.code == 0, created.stdout
        assert (created.json["vm"]["status"], created.json["vm"]["host"]) == ("building", "old")
        assert entered.wait(30), "the build reached the host"

        def failed() -> dict[str, Any] | None:
            vm = vm_show(configured, "stuck")
            return vm if vm["status"] == "error" else None

        vm = wait_until(failed, 30, "the reconciler to fail the stuck build")
        assert (vm["last_error"], vm["task"], vm["host"]) == ("build timed out", None, "old")
        # The pass commits the change, then logs it: the log line may follow the state by a moment.
        wait_until(
            lambda: "reconcile: stuck: build timed out" in caplog.text, 30, "the reconciler's log line"
        )
        # The failed build keeps its claim: the host still counts the VM until it is deleted.
        used = configured.used("old")
        assert used["MEMORY_MIB"] == 128
        release.set()
        # The agent's answer comes late but says the VM was built: it is taken as the truth.
        wait_until(lambda: vm_show(configured, "stuck")["status"] == "active", 30, "the late answer")
    vm = vm_show(configured, "stuck")
    assert (vm["power_state"], vm["last_error"]) == ("running", None)
    configured.cli_ok("vm", "delete", "stuck", "--delete-disks")


def test_the_reconciler_survives_a_failing_pass(
    configured: InProcessFleet, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="virtfleet.controller")
    assert configured.controller is not None
    recovery = configured.controller.recovery
    original = recovery.step
    passes: list[str] = []

    def step(*, full: bool) -> list[str]:
        passes.append("failed" if not passes else "ok")
        if len(passes) == 1:
            raise RuntimeError("simulated: the database went away")
        return original(full=full)

    monkeypatch.setattr(recovery, "step", step)
    wait_until(lambda: len(passes) >= 3, 30, "more reconciliation passes after the failed one")
    assert "reconciliation pass failed" in caplog.text and "simulated: the database went away" in caplog.text


def test_the_build_timeout_leaves_finished_and_young_builds_alone(fleet: InProcessFleet) -> None:
    created = create(fleet, "young", "--host", "a")
    assert created.code == 0, created.stdout
    assert fleet.controller is not None
    # an active VM is never failed, however old
    assert fleet.controller.recovery.fail_stale_builds() == []
    assert vm_show(fleet, "young")["status"] == "active"
    fleet.cli_ok("vm", "delete", "young", "--delete-disks")


def test_vm_create_no_wait_returns_while_the_build_goes_on(
    fleet: InProcessFleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    with held_define(monkeypatch, fleet.fake("a").hypervisor) as (entered, release):
        created = create(fleet, "nowait", "--host", "a", "--no-wait")
        assert created.code == 0, created.stdout
        vm = created.json["vm"]
        assert (vm["status"], vm["host"], vm["power_state"], vm["task"]) == (
            "building",
            "a",
            "nostate",
            "building",
        )
        assert created.json["placement"]["host"] == "a"
        assert entered.wait(30)
        busy = fleet.cli("vm", "reboot", "nowait")
        assert busy.code == 4 and "still being built" in busy.json["error"]["message"]
        text = create(fleet, "nowait2", "--host", "a", "--no-wait", output="table")
        assert text.code == 0 and text.stdout.strip() == "nowait2 created on host a (building, nostate)"
        release.set()
        wait_until(lambda: vm_show(fleet, "nowait")["status"] == "active", 30, "nowait built")
        wait_until(lambda: vm_show(fleet, "nowait2")["status"] == "active", 30, "nowait2 built")
    assert vm_show(fleet, "nowait")["power_state"] == "running"
    for name in ("nowait", "nowait2"):
        fleet.cli_ok("vm", "delete", name, "--delete-disks")


def test_a_background_build_that_fails_leaves_the_vm_in_error(
    fleet: InProcessFleet, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="controller.service")
    hv = fleet.fake("b").hypervisor
    hv.fail_next("define", HypervisorError("simulated: cannot define the domain"))
    created = create(fleet, "doomed", "--host", "b", "--no-wait")
    assert created.code == 0 and created.json["vm"]["status"] == "building"
    vm = wait_until(
        lambda: (v := vm_show(fleet, "doomed"))["status"] == "error" and v, 30, "the build to fail"
    )
    assert "simulated: cannot define the domain" in vm["last_error"] and vm["host"] is None
    wait_until(lambda: "background build of doomed failed" in caplog.text, 30, "the failure logged")
    assert hv.list_statuses() == ()
    fleet.cli_ok("vm", "delete", "doomed")


def test_a_build_the_host_fails_for_good_is_not_retried_elsewhere(fleet: InProcessFleet) -> None:
    """Only host failures (hypervisor, storage, transport, unsupported) are rescheduled."""
    chosen = create(fleet, "buggy", "--dry-run").json["placement"]["host"]
    other = ({"a", "b"} - {chosen}).pop()
    defines_elsewhere = fleet.fake(other).hypervisor.count("define")
    fleet.fake(chosen).hypervisor.fail_next("define", InternalError("simulated: the agent hit a bug"))
    result = create(fleet, "buggy")
    assert result.code == 1, result.stdout
    assert result.json["error"] == {
        "type": "InternalError",
        "message": "simulated: the agent hit a bug",
        "retryable": False,
        "details": {},
    }
    vm = vm_show(fleet, "buggy")
    assert (vm["status"], vm["host"], vm["last_error"]) == ("error", None, "simulated: the agent hit a bug")
    assert fleet.fake(other).hypervisor.count("define") == defines_elsewhere, "not rescheduled"
    used = fleet.used(chosen)
    assert used["MEMORY_MIB"] == 0, "the claim was released"
    fleet.cli_ok("vm", "delete", "buggy")


def test_every_host_failing_the_build_ends_in_no_valid_host_with_the_history(
    fleet: InProcessFleet, caplog: pytest.LogCaptureFixture
) -> None:
    """Each host fails to start the VM and cannot even undefine it again: the build goes on to the
    next host anyway (the clean-up is best effort, and logged), then runs out of hosts."""
    caplog.set_level(logging.WARNING, logger="controller.service")
    for host in ("a", "b"):
        hv = fleet.fake(host).hypervisor
        hv.fail_next("start", HypervisorError(f"simulated: qemu died on {host}"))
        hv.fail_next("undefine", HypervisorError("simulated: cannot undefine"))
    result = create(fleet, "unlucky")
    assert result.code == 4, result.stdout
    error = result.json["error"]
    assert error["type"] == "NoValidHost"
    assert re.match(
        r"build of unlucky failed on (a, b|b, a) and no other host can take it: ", error["message"]
    )
    assert (
        "a: simulated: qemu died on a" in error["message"]
        and "b: simulated: qemu died on b" in error["message"]
    )
    excluded = {r["host"] for r in error["details"]["reasons"] if r["rule"] == "excluded"}
    assert excluded == {"a", "b"}
    vm = vm_show(fleet, "unlucky")
    assert (vm["status"], vm["host"]) == ("error", None)
    for host in ("a", "b"):
        assert (
            f"could not clean up the failed build of unlucky on {host}: simulated: cannot undefine"
            in caplog.text
        )
        # What the failed clean-up left behind: a domain the controller no longer accounts for.
        hv = fleet.fake(host).hypervisor
        assert [s.name for s in hv.list_statuses()] == ["unlucky"]
        hv.undefine(vm["uuid"])  # the operator's clean-up (virsh undefine)
        used = fleet.used(host)
        assert used["MEMORY_MIB"] == 0
    fleet.cli_ok("vm", "delete", "unlucky")


def test_vm_create_wait_shows_its_progress_on_stderr(
    fleet: InProcessFleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = service_of(fleet)
    polled: list[tuple[str, str | None]] = []
    original = service.show_vm

    def show_vm(name: str) -> Any:
        view = original(name)
        polled.append((str(view.status), view.host))
        return view

    monkeypatch.setattr(service, "show_vm", show_vm)  # what the CLI's progress poller asks
    results: list[CliResult] = []
    with held_define(monkeypatch, fleet.fake("a").hypervisor) as (entered, release):
        cli = threading.Thread(
            target=lambda: results.append(create(fleet, "slow", "--host", "a", output="table")), daemon=True
        )
        cli.start()
        assert entered.wait(30)
        wait_until(lambda: ("building", "a") in polled, 30, "the CLI to poll the VM while it is built")
        release.set()
        cli.join(60)
    assert results, "the CLI call did not return"
    result = results[0]
    assert result.code == 0, result.stdout + result.stderr
    assert re.search(r"^\[ *\d+\.\ds\] slow: building on host a$", result.stderr, re.M), result.stderr
    assert re.search(r"^\[ *\d+\.\ds\] slow: done$", result.stderr, re.M), result.stderr
    assert result.stdout.strip() == "slow created on host a (active, running)"
    fleet.cli_ok("vm", "delete", "slow", "--delete-disks")


def test_vm_create_wait_reports_a_refusal_for_people(fleet: InProcessFleet) -> None:
    refused = create(fleet, "huge", "--vcpus", "64", output="table")
    assert refused.code == 4
    assert "error: no host can take huge" in refused.stderr
    assert "why each host was excluded" in refused.stderr
    assert re.search(r"│ a +│ \w+", refused.stderr), refused.stderr
    assert fleet.cli("vm", "show", "huge").code == 3


# ----------------------------------------------------------------------------------------- reports


def test_reports_out_of_order_and_after_an_agent_restart(fleet: InProcessFleet) -> None:
    service = service_of(fleet)
    started = time.time() - 100
    send_as_agent(fleet, "ghost", HOST_REPORT, ghost_report(5, started, cpus=5))
    wait_until(
        lambda: fleet.hosts().get("ghost", {}).get("cpus") == 5,
        30,
        "the report of ghost (it creates the host)",
    )

    # An older report of the same agent run (overtaken on the way) changes nothing.
    service.record_report(ghost_report(3, started, cpus=64))
    assert fleet.cli_ok("host", "show", "ghost")["cpus"] == 5
    # A report of the same seq is the same report again: taken (it is not older).
    service.record_report(ghost_report(5, started, cpus=6))
    assert fleet.cli_ok("host", "show", "ghost")["cpus"] == 6
    # A restarted agent counts from 1 again: its reports are taken.
    service.record_report(ghost_report(1, started + 50, cpus=16))
    shown = fleet.cli_ok("host", "show", "ghost")
    assert (shown["cpus"], shown["hostname"], shown["hw_virt"]) == (16, "ghost.example.net", False)


def test_a_host_without_network_facts_and_one_long_silent(fleet: InProcessFleet) -> None:
    service = service_of(fleet)
    with service.tx() as s:
        repo.record_report(s, ghost_report(1, time.time() + 1000), time.time() - 600)
    # Written behind the controller's back, as another controller would: its fleet sync
    # (every fleet_sync_s) reads it; do now what that loop would do.
    service.fleet.sync(time.time())
    hosts = fleet.hosts()
    assert hosts["ghost"]["status"] == "down"
    table = fleet.cli("host", "list", output="table")
    assert re.search(r"ghost +│ down +│ yes +│ QEMU +│ no +│ 4 +│ 256 +│ 0 +│ 0 +│ 10m ago", table.stdout), (
        table.stdout
    )
    detail = fleet.cli("host", "show", "ghost", output="table")
    assert detail.code == 0
    for pattern in (r"hostname +│ ghost\.example\.net", r"status +│ down", r"last heartbeat +│ 10m ago",
                    r"networks +│ -", r"MEMORY_MIB +│ 256 +│ 256 +│ 1 +│ 0 +│ 0 +│ 0"):  # fmt: skip
        assert re.search(pattern, detail.stdout), (pattern, detail.stdout)

    # No network facts in its reports: said so, and no networks listed for it.
    shown = fleet.cli_ok("host", "net", "show", "ghost")
    assert shown["errors"] == ["this host has not reported network facts yet"] and shown["interfaces"] == []
    text = fleet.cli("host", "net", "show", "ghost", output="table")
    assert text.code == 0 and re.search(r"error +│ this host has not reported network facts yet", text.stdout)
    assert {e["host"] for e in fleet.cli_ok("net", "list")["entries"]} == {"a", "b"}
    assert fleet.cli_ok("net", "list", "--host", "ghost")["entries"] == []
    no_host = fleet.cli("host", "net", "show", "")
    assert no_host.code == 3 and no_host.json["error"]["message"] == "no host given"

    # A heartbeat brings it back up.
    send_as_agent(fleet, "ghost", HOST_HEARTBEAT, first_heartbeat("ghost"))
    fleet.wait_hosts({"ghost"})  # up again after its heartbeat


def test_a_heartbeat_from_an_unknown_host_creates_nothing(
    fleet: InProcessFleet, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="controller.service")
    send_as_agent(fleet, "stranger", HOST_HEARTBEAT, first_heartbeat("stranger"))
    wait_until(
        lambda: "heartbeat from stranger before its first report" in caplog.text, 30, "the heartbeat handled"
    )
    assert "stranger" not in fleet.hosts()
    assert fleet.cli("host", "show", "stranger").code == 3


def test_vms_changed_by_hand_on_the_host_show_up_at_the_next_report(
    fleet: InProcessFleet, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="controller.service")
    uuid = fleet.cli_ok("vm", "create", "hand", "--memory", "128", "--disk", "1", "--host", "a")["vm"]["uuid"]
    hv = fleet.fake("a").hypervisor

    hv.destroy(uuid)  # virsh destroy hand, by hand
    request_report(fleet, "a")
    wait_until(lambda: vm_show(fleet, "hand")["power_state"] == "shutoff", 30, "the report of the destroy")
    # (logged just after the report's transaction: waited for, not assumed)
    wait_until(lambda: "drift on a: hand: running -> shutoff" in caplog.text, 30, "the drift logged")
    hv.start(uuid)  # virsh start hand
    request_report(fleet, "a")
    wait_until(lambda: vm_show(fleet, "hand")["power_state"] == "running", 30, "the report of the start")

    hv.destroy(uuid)
    hv.undefine(uuid)  # virsh undefine hand: the VM is gone from the host
    request_report(fleet, "a")
    wait_until(lambda: vm_show(fleet, "hand")["power_state"] == "missing", 30, "the VM reported missing")
    wait_until(lambda: "drift on a: hand: missing on a" in caplog.text, 30, "the drift logged")
    vm = vm_show(fleet, "hand")
    assert (vm["status"], vm["host"]) == ("active", "a"), "missing is a power state: the record stays"
    listed = fleet.cli("vm", "list", "--host", "a", output="table")
    assert re.search(r"hand +│ a +│ active +│ missing", listed.stdout), listed.stdout
    running = fleet.cli_ok("vm", "list", "--running", "--host", "a")
    assert "hand" not in {v["name"] for v in running["vms"]}
    assert fleet.cli_ok("vm", "delete", "hand")["message"] == "deleted hand"


def test_a_report_taken_before_the_controller_changed_a_vm_does_not_undo_the_change(
    fleet: InProcessFleet,
) -> None:
    """A report is a snapshot: a VM the controller changed after it was taken is left alone."""
    service = service_of(fleet)
    vm = fleet.cli_ok("vm", "create", "race", "--memory", "128", "--disk", "1", "--host", "b")["vm"]
    agent = fleet.hosts_by_name["b"].agent
    assert agent is not None
    last = wait_until(lambda: agent.reporter.last_report, 30, "a report of b")
    # Another started_at: the crafted reports count as another agent run, never as older ones.
    without_vm = replace(last, vms=(), seq=1, started_at=last.started_at - 1)
    with service.tx() as s:
        stale = repo.record_report(s, replace(without_vm, reported_at=vm["updated_at"] - 1), time.time())
    assert stale == repo.ReportApplied([], deferred=1), (
        "taken before the VM was built: it cannot know about it"
    )
    assert vm_show(fleet, "race")["power_state"] == "running"
    with service.tx() as s:
        fresh = repo.record_report(s, replace(without_vm, reported_at=time.time()), time.time())
    assert fresh == repo.ReportApplied(["race: missing on b"]), (
        "the same report taken afterwards marks it missing"
    )
    # Written behind the controller's back (as another controller would): its fleet sync reads
    # the host's row changed, so the agent's next report is written, not taken as a repeat.
    service.fleet.sync(time.time())
    request_report(fleet, "b")
    wait_until(lambda: vm_show(fleet, "race")["power_state"] == "running", 30, "the agent's own report")
    fleet.cli_ok("vm", "delete", "race", "--delete-disks")


# ----------------------------------------------------------------------------------------- version cap


def test_a_version_cap_refuses_vm_reset_before_sending_it(configured: InProcessFleet) -> None:
    assert VM_RESET.introduced == Version(1, 1)
    created = configured.cli_ok("vm", "create", "capped", "--memory", "128", "--disk", "1")
    assert created["vm"]["power_state"] == "running", "vm.create is 1.0: sent"
    hv = configured.fake("old").hypervisor

    refused = configured.cli("vm", "reset", "capped")
    assert refused.code == 1, refused.stdout
    error = refused.json["error"]
    assert error["type"] == "Unsupported"
    assert error["message"] == (
        f"the agent of host old speaks vm 1.0; {VM_RESET.kind} needs vm 1.1: upgrade its agent first"
    )
    assert hv.count("reset") == 0, "nothing was sent to the agent"
    vm = vm_show(configured, "capped")
    assert (vm["task"], vm["power_state"]) == (None, "running")
    assert vm["last_error"] == error["message"]
    text = configured.cli("vm", "reset", "capped", output="table")
    assert text.code == 1 and "error: the agent of host old speaks vm 1.0" in text.stderr
    assert hv.count("reset") == 0

    # Operations of vm 1.0 still go through.
    assert configured.cli_ok("vm", "reboot", "capped")["vm"]["power_state"] == "running"
    assert hv.count("reboot") == 1
    configured.cli_ok("vm", "delete", "capped", "--delete-disks")


@pytest.mark.parametrize(
    ("toml", "env", "message"),
    [
        pytest.param(
            '[rpc]\nversion_cap = { vm = "2.0" }\n',
            {},
            "cap vm=2.0 must be 1.x and at most 1.1",
            id="cap-new-major",
        ),
        pytest.param(
            '[rpc]\nversion_cap = { vm = "1.9" }\n',
            {},
            "cap vm=1.9 must be 1.x and at most 1.1",
            id="cap-too-new",
        ),
        pytest.param(
            '[rpc]\nversion_cap = { api = "1.0" }\n',
            {},
            "'api' is not a family the agents serve",
            id="cap-not-agent-family",
        ),
        pytest.param("[rpc]\nversion_cap = 3\n", {}, "version_cap must be a table", id="cap-not-table"),
        pytest.param("[rpc]\nretries = 3\n", {}, "[rpc] takes only version_cap", id="rpc-unknown-key"),
        pytest.param(
            "",
            {VERSION_CAP_ENV: "vm1.0"},
            "expected FAMILY=MAJOR.MINOR items, got 'vm1.0'",
            id="env-cap-no-equals",
        ),
        pytest.param("", {VERSION_CAP_ENV: "vm=one"}, "bad version 'one'", id="env-cap-bad-version"),
        pytest.param("overcommit = 3\n", {}, "[overcommit] must be a table", id="overcommit-not-table"),
        pytest.param(
            "[overcommit]\ncpu_ratio = 0.0\n",
            {},
            "overcommit.cpu_ratio must be positive",
            id="overcommit-zero-ratio",
        ),
        pytest.param(
            '[overcommit]\nram_ratio = "lots"\n', {}, "ram_ratio must be a number", id="overcommit-ratio-text"
        ),
        pytest.param('workers = "many"\n', {}, "workers must be a number", id="workers-text"),
        pytest.param(
            "workers = 0\n", {}, "down_after_s, workers and max_attempts must be positive", id="workers-zero"
        ),
        pytest.param("workers = 2.5\n", {}, "workers must be int", id="workers-float"),
        pytest.param('colour = "blue"\n', {}, "unknown setting 'colour'", id="unknown-setting"),
        pytest.param("strategy = [\n", {}, "is not valid TOML", id="bad-toml"),
        pytest.param(
            "",
            {"VIRTFLEET_DOWN_AFTER": "soon"},
            "environment: down_after_s must be a number",
            id="env-down-after-text",
        ),
        pytest.param(
            "", {"VIRTFLEET_STRATEGY": "random"}, "strategy must be 'spread' or 'pack'", id="env-strategy"
        ),
    ],
)
def test_the_controller_refuses_to_start_on_a_bad_configuration(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    toml: str,
    env: dict[str, str],
    message: str,
) -> None:
    for name in (*ENV_VARS, VERSION_CAP_ENV):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    path = tmp_path / "controller.toml"
    path.write_text(toml)
    caplog.set_level(logging.ERROR, logger="virtfleet.controller")
    assert controller_main.main(["--config", str(path)]) == 2
    assert "cannot start: " in caplog.text and message in caplog.text, caplog.text


def test_the_controller_refuses_to_start_without_a_config_file_or_a_broker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    for name in (*ENV_VARS, VERSION_CAP_ENV):
        monkeypatch.delenv(name, raising=False)
    caplog.set_level(logging.ERROR, logger="virtfleet.controller")
    assert controller_main.main(["--config", str(tmp_path / "absent.toml")]) == 2
    assert f"config file {tmp_path / 'absent.toml'} does not exist" in caplog.text
    # A memory:// broker exists only inside one process: a controller process cannot use one.
    caplog.clear()
    database = f"sqlite:///{tmp_path / 'controller.db'}"
    argv = [
        "--amqp-url",
        "memory://nowhere",
        "--database-url",
        database,
        "--workers",
        "2",
        "--strategy",
        "pack",
    ]
    assert controller_main.main(argv) == 2
    assert "memory:// brokers exist only inside one process" in caplog.text


# ----------------------------------------------------------------------------------------- tables


def test_vm_and_placement_tables(fleet: InProcessFleet) -> None:
    # ghost (no room at all) is known to the fleet: the dry run lists why it was left out.
    service_of(fleet).record_report(ghost_report(1, time.time()))
    dry = create(fleet, "tbl", "--dry-run", output="table")
    assert dry.code == 0, dry.stdout + dry.stderr
    assert re.search(r"dry run: tbl would go to [ab]", dry.stdout)
    assert re.search(r"│ 1 +│ [ab] +│ -?\d+\.\d{3} +│ \w+=", dry.stdout), dry.stdout
    assert re.search(r"│ - +│ ghost +│ rejected +│ .+", dry.stdout), "a host that cannot take it is listed"
    assert fleet.cli("vm", "show", "tbl").code == 3, "a dry run claims nothing"

    created = create(fleet, "tbl", "--host", "a", "--vcpus", "2")
    assert created.code == 0, created.stdout
    shown = fleet.cli("vm", "show", "tbl", output="table")
    assert shown.code == 0 and "vm tbl" in shown.stdout
    for pattern in (rf"uuid +│ {created.json['vm']['uuid']}", r"host +│ a", r"status +│ active",
                    r"state +│ running", r"desired power +│ running", r"vcpus +│ 2 \(max 2\)",
                    r"max memory +│ 128 MiB", r"disk +│ 1 GiB", r"cpu time +│ \d+\.\ds",
                    r"autostart +│ disable", r"persistent +│ yes", r"last error +│ -"):  # fmt: skip
        assert re.search(pattern, shown.stdout), (pattern, shown.stdout)
    listed = fleet.cli("vm", "list", output="table")
    assert re.search(r"tbl +│ a +│ active +│ running +│ 2 +│ 128 +│ 1", listed.stdout), listed.stdout
    host = fleet.cli("host", "show", "a", output="table")
    assert re.search(r"vms +│ .*tbl", host.stdout) and re.search(
        r"VCPU +│ 8 +│ 0 +│ 4 +│ 32 +│ \d+ +│ \d+", host.stdout
    )
    assert re.search(r"bridges +│ br0", host.stdout) and re.search(r"networks +│ default", host.stdout)
    done = fleet.cli("vm", "destroy", "tbl", output="table")
    assert done.code == 0 and done.stdout.strip() == "tbl: shutoff (powered off)"
    deleted = fleet.cli("vm", "delete", "tbl", "--delete-disks", output="table")
    assert deleted.code == 0 and deleted.stdout.strip() == "deleted tbl and its disks"
