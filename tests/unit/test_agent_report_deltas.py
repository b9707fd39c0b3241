"""VM deltas (``host.vm_changes``): the pure builder, the reporter's delta path driven step by step,
and the fake hypervisor's lifecycle events that feed it."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

from agent.drivers.fake import FakeHypervisor
from agent.host_runtime import telling
from agent.ports import NodeFacts
from agent.report_scheduler import ReportScheduler
from agent.reporter import DELTA_DELAY_S, Reporter, build_vm_changes, same_state
from common.errors import HypervisorError, TransportError
from common.messages.base import replace
from common.messages.descriptor import Report, Side
from common.messages.host import (
    HOST_REPORT,
    HOST_REPORT_NOW,
    HOST_VM_CHANGES,
    CpuTopology,
    HostReport,
    ReportAck,
    ReportRequest,
    VmChanges,
)
from common.messages.vm import VM_DELETE, VM_START, DeleteVm, PowerState, VmAction, VmRef, VmResult, VmStatus
from common.transport.rpc import HandlerTable


def vm(name: str, state: PowerState, memory_mib: int) -> VmStatus:
    return VmStatus(
        uuid=f"00000000-0000-0000-0000-{name:0>12}",
        name=name,
        state=state,
        vcpus=1,
        max_vcpus=1,
        memory_mib=memory_mib,
        max_memory_mib=memory_mib,
    )


class RecordingSink:
    """A :class:`~agent.reporter.ReportSink` that keeps what is sent; ``fail_next`` fails publishes."""

    def __init__(self) -> None:
        self.sent: list[tuple[Report[Any], Any]] = []
        self.fail_next = 0
        self.cond = threading.Condition()

    def send(self, op: Report[Any], body: Any, *, sent_at: float, ttl_s: float) -> None:
        with self.cond:
            if self.fail_next:
                self.fail_next -= 1
                raise TransportError("broker down")
            self.sent.append((op, body))
            self.cond.notify_all()

    def reports(self) -> list[HostReport]:
        with self.cond:
            return [b for op, b in self.sent if op is HOST_REPORT]

    def deltas(self) -> list[VmChanges]:
        with self.cond:
            return [b for op, b in self.sent if op is HOST_VM_CHANGES]

    def wait_for(self, predicate: Callable[[], object]) -> None:
        with self.cond:
            assert self.cond.wait_for(predicate, timeout=10.0), "condition not reached"


UUID_A = vm("a", PowerState.RUNNING, 512).uuid


def test_build_vm_changes_lists_changed_vms_by_name_and_gone_uuids_sorted() -> None:
    b, a = vm("b", PowerState.SHUTOFF, 256), vm("a", PowerState.RUNNING, 512)
    gone = "ffffffff-0000-0000-0000-000000000000"
    delta = build_vm_changes(
        host_id="hv1",
        started_at=10.0,
        seq=7,
        reported_at=20.0,
        found={b.uuid: b, gone: None, a.uuid: a, "00000000-gone": None},
    )
    assert delta == VmChanges(
        host_id="hv1",
        started_at=10.0,
        seq=7,
        reported_at=20.0,
        vms=(a, b),
        gone=("00000000-gone", gone),
    )


class FindingHypervisor:
    """What the reporter reads: facts and the listing for full reports, ``find`` for deltas."""

    def __init__(self, clock: list[float]) -> None:
        self.clock = clock
        self.vms: tuple[VmStatus, ...] = ()
        self.found: list[tuple[str, float]] = []
        self.fail_find = 0

    def node_facts(self) -> NodeFacts:
        return NodeFacts(
            hostname="node1",
            hypervisor_type="TEST",
            hypervisor_version="0.0.2",
            libvirt_version="9.0.0",
            cpu=CpuTopology(cpus=8),
            memory_mib=16384,
            free_memory_mib=0,
            storage=None,
            networks=(),
            bridges=(),
            hw_virt=True,
        )

    def list_statuses(self) -> tuple[VmStatus, ...]:
        return self.vms

    def find(self, uuid: str) -> VmStatus | None:
        self.found.append((uuid, self.clock[0]))
        if self.fail_find:
            self.fail_find -= 1
            raise HypervisorError("libvirt went away")
        return next((v for v in self.vms if v.uuid == uuid), None)


class Stepped:
    """A reporter driven by hand: ``tick(dt)`` moves both clocks, ``step()`` is one loop pass."""

    def __init__(self, *, report_interval: float = 300.0) -> None:
        self.now = [1000.0]
        self.sink = RecordingSink()
        self.hv = FindingHypervisor(self.now)
        self.reporter = Reporter(
            "hv1",
            "test:///default",
            self.hv,  # type: ignore[arg-type]  # only what the reporter uses
            self.sink,
            report_interval=report_interval,
            heartbeat_interval=report_interval,
            agent_version="0.1.0",
            clock=lambda: self.now[0],
            monotonic=lambda: self.now[0],
        )
        self.reporter.begin(self.now[0])

    def tick(self, seconds: float) -> None:
        self.now[0] += seconds

    def step(self) -> float:
        return self.reporter.step()

    def deltas(self) -> list[VmChanges]:
        return self.sink.deltas()


@pytest.fixture
def stepped() -> Stepped:
    s = Stepped()
    s.step()  # the first full report (seq 1) and heartbeat
    assert [r.seq for r in s.sink.reports()] == [1]
    return s


def test_a_changed_vm_goes_out_in_a_delta_after_the_delay_not_in_a_full_report(stepped: Stepped) -> None:
    stepped.hv.vms = (vm("a", PowerState.SHUTOFF, 512),)
    stepped.reporter.vm_changed(UUID_A)
    assert stepped.step() == pytest.approx(stepped.now[0] + DELTA_DELAY_S), "due once the delay is over"
    assert stepped.deltas() == []
    stepped.tick(DELTA_DELAY_S)
    stepped.step()
    [delta] = stepped.deltas()
    assert (delta.host_id, delta.seq, delta.vms, delta.gone) == ("hv1", 2, stepped.hv.vms, ())
    assert delta.started_at == stepped.reporter.started_at
    assert len(stepped.sink.reports()) == 1, "no full report for a VM change"
    assert stepped.reporter.deltas_sent == 1
    stepped.tick(1.0)
    stepped.step()
    assert len(stepped.deltas()) == 1, "nothing changed since"


def test_changes_within_the_delay_go_out_together_and_a_vanished_vm_as_gone(stepped: Stepped) -> None:
    b = vm("b", PowerState.RUNNING, 256)
    stepped.hv.vms = (b,)
    for uuid in (UUID_A, b.uuid, UUID_A):
        stepped.reporter.vm_changed(uuid)
        stepped.tick(DELTA_DELAY_S / 4)
        stepped.step()
    assert stepped.deltas() == []
    stepped.tick(DELTA_DELAY_S / 4)
    stepped.step()
    [delta] = stepped.deltas()
    assert (delta.vms, delta.gone) == ((b,), (UUID_A,))
    assert sorted(u for u, _ in stepped.hv.found) == sorted([UUID_A, b.uuid]), "each domain read once"


def test_a_delta_is_stamped_before_the_domains_are_read(stepped: Stepped) -> None:
    stepped.hv.vms = (vm("a", PowerState.RUNNING, 512),)
    original = stepped.hv.find

    def slow_find(uuid: str) -> VmStatus | None:
        found = original(uuid)
        stepped.tick(5.0)  # meanwhile the controller changes the VM: the delta must look older
        return found

    stepped.hv.find = slow_find  # type: ignore[method-assign]
    stepped.reporter.vm_changed(UUID_A)
    stepped.tick(DELTA_DELAY_S)
    stepped.step()
    [delta] = stepped.deltas()
    assert delta.reported_at <= stepped.hv.found[0][1]


def test_deltas_and_full_reports_share_one_seq(stepped: Stepped) -> None:
    stepped.hv.vms = (vm("a", PowerState.RUNNING, 512),)
    stepped.reporter.vm_changed(UUID_A)
    stepped.tick(DELTA_DELAY_S)
    stepped.step()
    assert stepped.reporter.request_report() == 3
    stepped.step()
    assert [d.seq for d in stepped.deltas()] == [2]
    assert [r.seq for r in stepped.sink.reports()] == [1, 3]


def test_a_full_report_carries_the_changes_noted_before_it(stepped: Stepped) -> None:
    stepped.hv.vms = (vm("a", PowerState.PAUSED, 512),)
    stepped.reporter.vm_changed(UUID_A)
    stepped.reporter.request_report()
    stepped.step()
    stepped.tick(1.0)
    stepped.step()
    assert stepped.deltas() == []
    assert stepped.sink.reports()[-1].vms == stepped.hv.vms


def test_a_failed_delta_keeps_its_changes_and_is_retried_later_without_spinning(stepped: Stepped) -> None:
    stepped.hv.vms = (vm("a", PowerState.SHUTOFF, 512),)
    stepped.hv.fail_find = 1
    stepped.reporter.vm_changed(UUID_A)
    stepped.tick(DELTA_DELAY_S)
    due = stepped.step()
    assert stepped.deltas() == [] and stepped.reporter.failures == 1
    assert due >= stepped.now[0] + 299.0, "retried at the retry interval, not at once"
    stepped.tick(300.0)
    stepped.step()  # the periodic full report is due too: it carries the change
    assert stepped.sink.reports()[-1].vms == stepped.hv.vms
    # A broker failure on the delta itself: the same.
    stepped.reporter.vm_changed(UUID_A)
    stepped.sink.fail_next = 1
    stepped.tick(DELTA_DELAY_S)
    stepped.step()
    assert stepped.deltas() == [] and stepped.reporter.failures == 2
    stepped.reporter.vm_changed(UUID_A)  # a new change does not bring the retry forward
    stepped.tick(DELTA_DELAY_S)
    stepped.step()
    assert stepped.deltas() == []
    stepped.tick(300.0)
    stepped.step()
    assert stepped.sink.reports()[-1].vms == stepped.hv.vms, "(the periodic report came first again)"


def test_the_scheduler_sends_a_delta_when_a_vm_changes() -> None:
    """The multi-host agent's one reporting thread hears of a change as of a requested report."""
    sink, hv = RecordingSink(), FindingHypervisor([0.0])
    hv.vms = (vm("a", PowerState.SHUTOFF, 512),)
    reporter = Reporter(
        "hv1",
        "test:///default",
        hv,  # type: ignore[arg-type]
        sink,
        report_interval=3600,
        heartbeat_interval=3600,
        agent_version="0.1.0",
    )
    scheduler = ReportScheduler([reporter], spread=0.0)
    scheduler.start()
    try:
        sink.wait_for(lambda: len(sink.reports()) == 1)
        reporter.vm_changed(UUID_A)
        sink.wait_for(sink.deltas)
    finally:
        scheduler.stop(final_report=False)
    assert len(sink.reports()) == 1
    assert sink.deltas()[0].vms == hv.vms


# ------------------------------------------------------------------------------- the fake's events


def _domain_xml(name: str) -> str:
    return (
        f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>256</memory><vcpu>1</vcpu>"
        "<os><type arch='x86_64'>hvm</type></os></domain>"
    )


@pytest.fixture
def watched() -> tuple[FakeHypervisor, list[str], Callable[[], None]]:
    hv = FakeHypervisor()
    events: list[str] = []
    unwatch = hv.watch_lifecycle(events.append)
    return hv, events, unwatch


def test_the_fake_emits_lifecycle_events_like_libvirt(
    watched: tuple[FakeHypervisor, list[str], Callable[[], None]],
) -> None:
    hv, events, unwatch = watched
    uuid = hv.define(_domain_xml("ev"))
    assert events == [uuid], "defined"
    for act in (hv.start, hv.suspend, hv.resume, hv.destroy):
        act(uuid)
    assert events == [uuid] * 5, "started, suspended, resumed, stopped"
    hv.set_autostart(uuid, True)  # no lifecycle event in libvirt either
    hv.set_vcpus(uuid, 1, live=False, config=True)
    assert len(events) == 5
    hv.undefine(uuid)
    assert events == [uuid] * 6, "undefined"
    unwatch()
    hv.define(_domain_xml("quiet"))
    assert len(events) == 6, "no events after unwatch"


def test_the_fake_emits_no_event_for_a_refused_change(
    watched: tuple[FakeHypervisor, list[str], Callable[[], None]],
) -> None:
    hv, events, _unwatch = watched
    uuid = hv.define(_domain_xml("off"))
    events.clear()
    with pytest.raises(HypervisorError):
        hv.suspend(uuid)  # not running
    assert events == []


def test_a_transient_domain_stopping_is_one_event(
    watched: tuple[FakeHypervisor, list[str], Callable[[], None]],
) -> None:
    hv, events, _unwatch = watched
    uuid = hv.define(_domain_xml("transient"))
    hv.start(uuid)
    hv.undefine(uuid)  # running: becomes transient
    events.clear()
    hv.destroy(uuid)
    assert events == [uuid] and hv.find(uuid) is None


# ------------------------------------------------------------------- deltas a reply already told


def test_a_vm_as_its_commands_reply_said_is_left_out_and_an_empty_delta_not_sent(stepped: Stepped) -> None:
    running = vm("a", PowerState.RUNNING, 512)
    stepped.hv.vms = (replace(running, cpu_time_ns=99),)  # the guest's CPU time ran on: not news
    stepped.reporter.vm_told(running)
    stepped.reporter.vm_changed(UUID_A)
    stepped.tick(DELTA_DELAY_S)
    stepped.step()
    assert stepped.deltas() == [], "the reply said it all"
    assert stepped.hv.found, "the domain was re-read all the same"
    assert (stepped.reporter.deltas_sent, stepped.reporter.deltas_skipped) == (0, 1)


def test_a_vm_changed_since_the_reply_or_not_told_goes_out(stepped: Stepped) -> None:
    b = vm("b", PowerState.RUNNING, 256)
    stepped.hv.vms = (vm("a", PowerState.SHUTOFF, 512), b)
    stepped.reporter.vm_told(vm("a", PowerState.RUNNING, 512))  # then shut off behind its back
    stepped.reporter.vm_told(b)
    for uuid in (UUID_A, b.uuid, "00000000-gone"):
        stepped.reporter.vm_changed(uuid)
    stepped.tick(DELTA_DELAY_S)
    stepped.step()
    [delta] = stepped.deltas()
    assert (delta.vms, delta.gone) == ((stepped.hv.vms[0],), ("00000000-gone",))


def test_a_told_state_serves_one_delta_only_and_a_full_report_forgets_them_all(stepped: Stepped) -> None:
    running = vm("a", PowerState.RUNNING, 512)
    stepped.hv.vms = (running,)
    stepped.reporter.vm_told(running)
    stepped.reporter.vm_changed(UUID_A)
    stepped.tick(DELTA_DELAY_S)
    stepped.step()
    stepped.reporter.vm_changed(UUID_A)  # a lifecycle event later, nothing told since
    stepped.tick(DELTA_DELAY_S)
    stepped.step()
    assert [d.vms for d in stepped.deltas()] == [(running,)]
    stepped.reporter.vm_told(running)
    stepped.reporter.request_report()
    stepped.step()  # the full report carries every VM: what was told is forgotten
    stepped.reporter.vm_changed(UUID_A)
    stepped.tick(DELTA_DELAY_S)
    stepped.step()
    assert [d.vms for d in stepped.deltas()] == [(running,), (running,)]


def test_same_state_compares_what_the_controller_stores_but_the_cpu_time() -> None:
    running = vm("a", PowerState.RUNNING, 512)
    assert same_state(replace(running, cpu_time_ns=5), running)
    assert not same_state(replace(running, memory_mib=256), running)
    assert not same_state(replace(running, autostart=True), running)
    assert not same_state(None, running)
    assert not same_state(running, None)


def test_telling_passes_each_vm_result_status_on_and_leaves_other_results_alone() -> None:
    running = vm("a", PowerState.RUNNING, 512)
    table = HandlerTable(Side.AGENT)
    table.register(VM_START, lambda body: VmResult(status=running, message="started"))
    table.register(VM_DELETE, lambda body: VmResult(message="deleted"))
    table.register(HOST_REPORT_NOW, lambda body: ReportAck(seq=3))
    told: list[VmStatus] = []
    wrapped = telling(table, told.append)
    assert list(wrapped.ops()) == list(table.ops())
    ref = VmAction(VmRef(running.uuid, "a"))
    assert wrapped.handler(VM_START)(ref) == VmResult(status=running, message="started")
    assert wrapped.handler(VM_DELETE)(DeleteVm(vm=VmRef(running.uuid, "a"))) == VmResult(message="deleted")
    assert wrapped.handler(HOST_REPORT_NOW)(ReportRequest()) == ReportAck(seq=3)
    assert told == [running]
