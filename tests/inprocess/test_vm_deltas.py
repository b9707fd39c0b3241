"""VM deltas end to end: what changes on a host reaches ``vm show`` in a ``host.vm_changes`` long
before the next full report (every 300 s here), and commands no longer cost a full report.

Host ``a`` runs its agent throughout. Host ``b``'s agent is stopped once its VM exists, so that the
controller's rules for deltas can be checked with deltas made up here, undisturbed by its reports.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest
from inproc import HostShape, InProcessFleet, inprocess_fleet
from vfsupport import wait_until

from agent.reporter import Reporter
from common.messages.base import replace
from common.messages.host import VmChanges
from common.messages.vm import PowerState, VmStatus
from controller.db import repository as repo
from controller.db.models import Host
from controller.service import ControllerService

#: Far beyond every wait here: a state seen in time came in a delta, not in a periodic report.
REPORT_INTERVAL = 300.0
#: How long a delta may take to show (it is sent 50 ms after the change).
SOON = 10.0


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessFleet]:
    hosts = {"a": HostShape("small"), "b": HostShape("small")}
    with inprocess_fleet(tmp_path_factory.mktemp("deltas"), hosts, report_interval=REPORT_INTERVAL) as f:
        yield f


def reporter_of(fleet: InProcessFleet, host: str) -> Reporter:
    agent = fleet.hosts_by_name[host].agent
    assert agent is not None
    return agent.reporter


def service_of(fleet: InProcessFleet) -> ControllerService:
    assert fleet.controller is not None
    return fleet.controller.service


def vm_show(fleet: InProcessFleet, name: str) -> dict[str, Any]:
    return dict(fleet.cli_ok("vm", "show", name))


def reported_vms(fleet: InProcessFleet, host: str) -> tuple[VmStatus, ...]:
    with service_of(fleet).tx() as s:
        return repo.get_host(s, host).reported_vms


def test_a_create_costs_neither_a_full_report_nor_a_delta_repeating_its_reply(fleet: InProcessFleet) -> None:
    reporter = reporter_of(fleet, "a")
    reports, deltas, skipped = reporter.reports_sent, reporter.deltas_sent, reporter.deltas_skipped
    created = fleet.cli_ok("vm", "create", "quiet", "--memory", "128", "--disk", "1", "--host", "a")["vm"]
    # The define and start were noted (command and lifecycle events): the reporter re-read the
    # domain and found it as the create's reply had said, so it sent nothing.
    wait_until(lambda: reporter.deltas_skipped > skipped, SOON, "the create's delta left out")
    # Give a full report or a delta every chance to show up: the create's own reporting is over.
    time.sleep(0.5)
    assert reporter.reports_sent == reports, "a create costs no full host report"
    assert reporter.deltas_sent == deltas, "nor a delta saying what its reply said"
    assert created["power_state"] == "running"
    assert vm_show(fleet, "quiet")["power_state"] == "running", "the reply's state is recorded"
    fleet.cli_ok("vm", "delete", "quiet", "--delete-disks")


def test_a_vm_powered_off_behind_the_controllers_back_shows_in_vm_show_long_before_a_full_report(
    fleet: InProcessFleet, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="controller.service")
    uuid = fleet.cli_ok("vm", "create", "event", "--memory", "128", "--disk", "1", "--host", "a")["vm"][
        "uuid"
    ]
    assert vm_show(fleet, "event")["power_state"] == "running"
    reporter = reporter_of(fleet, "a")
    reports = reporter.reports_sent
    listed = reported_vms(fleet, "a")
    hv = fleet.fake("a").hypervisor

    hv.destroy(uuid)  # virsh destroy event: libvirt emits a lifecycle event, so does the fake
    wait_until(lambda: vm_show(fleet, "event")["power_state"] == "shutoff", SOON, "the delta of the destroy")
    wait_until(lambda: "drift on a: event: running -> shutoff" in caplog.text, SOON, "the drift logged")
    hv.start(uuid)
    wait_until(lambda: vm_show(fleet, "event")["power_state"] == "running", SOON, "the delta of the start")
    hv.destroy(uuid)
    hv.undefine(uuid)  # gone from the host
    wait_until(lambda: vm_show(fleet, "event")["power_state"] == "missing", SOON, "the VM reported gone")
    wait_until(lambda: "drift on a: event: missing on a" in caplog.text, SOON, "the drift logged")
    assert reporter.reports_sent == reports, "all of it came in deltas"
    # The host's last full report is left as it was (capacity drift reads it).
    assert reported_vms(fleet, "a") == listed
    fleet.cli_ok("vm", "delete", "event")


def test_a_deleted_vm_is_not_shown_as_an_unknown_domain_until_the_next_full_report(
    fleet: InProcessFleet,
) -> None:
    fleet.cli_ok("vm", "create", "listed", "--memory", "128", "--disk", "1", "--host", "a")
    reporter_of(fleet, "a").request_report()
    wait_until(lambda: "listed" in {vm.name for vm in reported_vms(fleet, "a")}, SOON, "a report listing it")
    reports = reporter_of(fleet, "a").reports_sent
    fleet.cli_ok("vm", "delete", "listed", "--delete-disks")
    # The undefine's delta says it is gone: the stored list (what drift and reported use read)
    # loses it now, not at the next full report (300 s away here).
    wait_until(lambda: "listed" not in {vm.name for vm in reported_vms(fleet, "a")}, SOON, "the gone delta")
    (entry,) = fleet.cli_ok("host", "capacity", "a")["hosts"]
    assert entry["drift"] == []
    assert reporter_of(fleet, "a").reports_sent == reports, "it came in a delta"


# ------------------------------------------------------------------------ the controller's rules


def _host_row(fleet: InProcessFleet) -> tuple[int, float, str]:
    """Host b's report seq, row update time and stored full-report VM list."""
    with service_of(fleet).tx() as s:
        row = s.get(Host, "b")
        assert row is not None
        return row.report_seq, row.updated_at, row.reported_vms


def test_the_controller_applies_a_delta_in_order_to_the_vms_it_names_only(fleet: InProcessFleet) -> None:
    uuid = fleet.cli_ok("vm", "create", "ruled", "--memory", "128", "--disk", "1", "--host", "b")["vm"][
        "uuid"
    ]
    reporter = reporter_of(fleet, "b")
    started_at = reporter.started_at
    fleet.stop_agent("b")  # no more reports of b: the deltas below are the only news
    last = reporter.last_report
    assert last is not None
    wait_until(lambda: _host_row(fleet)[0] == last.seq, SOON, "b's last report recorded")
    seq, updated_at, stored_vms = _host_row(fleet)
    running = fleet.fake("b").hypervisor.status(uuid)
    assert running.state is PowerState.RUNNING
    service = service_of(fleet)

    def delta(
        seq: int, *, state: PowerState | None, started: float = started_at, at: float | None = None
    ) -> VmChanges:
        return VmChanges(
            host_id="b",
            started_at=started,
            seq=seq,
            reported_at=time.time() if at is None else at,
            vms=() if state is None else (replace(running, state=state),),
            gone=(uuid,) if state is None else (),
        )

    service.record_vm_changes(delta(seq + 1, state=PowerState.PAUSED))
    assert vm_show(fleet, "ruled")["power_state"] == "paused"
    assert _host_row(fleet) == (seq + 1, updated_at, stored_vms), "only the seq of the host row moves"
    # Older than the newest applied (or the same one redelivered): dropped.
    service.record_vm_changes(delta(seq + 1, state=PowerState.SHUTOFF))
    service.record_vm_changes(delta(seq, state=PowerState.SHUTOFF))
    assert vm_show(fleet, "ruled")["power_state"] == "paused"
    # From another agent run than the last full report's: dropped (its first full report lists all).
    service.record_vm_changes(delta(seq + 5, state=PowerState.SHUTOFF, started=started_at + 1))
    service.record_vm_changes(delta(seq + 5, state=PowerState.SHUTOFF, started=started_at - 1))
    assert vm_show(fleet, "ruled")["power_state"] == "paused"
    # Taken before the controller last changed the VM: that VM is left alone (the rule of full reports).
    changed_at = vm_show(fleet, "ruled")["updated_at"]
    service.record_vm_changes(delta(seq + 2, state=PowerState.SHUTOFF, at=changed_at - 1))
    assert vm_show(fleet, "ruled")["power_state"] == "paused"
    assert _host_row(fleet)[0] == seq + 2
    # Gone from the host: missing, and no longer in the host's last full report's list.
    assert uuid in {vm.uuid for vm in reported_vms(fleet, "b")}
    service.record_vm_changes(delta(seq + 3, state=None))
    assert vm_show(fleet, "ruled")["power_state"] == "missing"
    assert _host_row(fleet)[:2] == (seq + 3, updated_at)
    assert {vm.uuid for vm in reported_vms(fleet, "b")} == {vm.uuid for vm in last.vms} - {uuid}
    fleet.start_agent("b")  # its first full report puts things right
    wait_until(
        lambda: vm_show(fleet, "ruled")["power_state"] == "running", SOON, "b's report after its restart"
    )
    fleet.cli_ok("vm", "delete", "ruled", "--delete-disks")
