"""Report building (pure) and the reporter thread against a recording sink."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import cast

import pytest

from agent.ports import NodeFacts
from agent.reporter import Reporter, TransportReportSink, build_report, free_memory_mib
from common.codec import from_wire
from common.errors import HypervisorError, TransportError
from common.messages.envelope import Envelope, decode_envelope
from common.messages.host import (
    HOST_HEARTBEAT,
    HOST_REPORT,
    CpuTopology,
    Heartbeat,
    HostReport,
    StoragePoolInfo,
)
from common.messages.vm import PowerState, VmStatus
from common.transport.port import Transport
from common.transport.topology import (
    HEARTBEAT_TTL_MS,
    REPORT_TTL_MS,
    REPORTS_EXCHANGE,
    Exchange,
    report_routing_key,
)

WAIT = 10.0  # generous upper bound for a condition that normally holds within milliseconds


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


def facts(free_mib: int = 0) -> NodeFacts:
    return NodeFacts(
        hostname="node1",
        hypervisor_type="TEST",
        hypervisor_version="0.0.2",
        libvirt_version="9.0.0",
        cpu=CpuTopology(cpus=8, sockets=1, cores=4, threads=2, numa_cells=1, mhz=2600, model="x86_64"),
        memory_mib=16384,
        free_memory_mib=free_mib,
        storage=StoragePoolInfo("default", "/var/lib/virtfleet/images", 200, 10, 190),
        networks=("default",),
        bridges=("br0",),
        hw_virt=True,
    )


def test_free_memory_prefers_the_hypervisor_figure() -> None:
    vms = [vm("a", PowerState.RUNNING, 4096)]
    assert free_memory_mib(16384, 9000, vms) == 9000
    assert free_memory_mib(16384, 99999, vms) == 16384  # never more than there is


def test_free_memory_falls_back_to_active_domains() -> None:
    vms = [
        vm("run", PowerState.RUNNING, 4096),
        vm("paused", PowerState.PAUSED, 2048),
        vm("off", PowerState.SHUTOFF, 8192),
        vm("crashed", PowerState.CRASHED, 1024),
    ]
    assert free_memory_mib(16384, 0, vms) == 16384 - 4096 - 2048
    assert free_memory_mib(1024, 0, vms) == 0


def test_build_report() -> None:
    vms = (vm("a", PowerState.RUNNING, 1024), vm("b", PowerState.SHUTOFF, 2048))
    report = build_report(
        host_id="hv1",
        libvirt_uri="test:///default",
        agent_version="0.1.0",
        facts=facts(),
        vms=vms,
        seq=7,
        started_at=100.0,
        reported_at=200.0,
    )
    assert report.host_id == "hv1"
    assert report.hostname == "node1"
    assert report.hypervisor_type == "TEST"
    assert report.cpu.cpus == 8
    assert report.memory_mib == 16384
    assert report.memory_free_mib == 16384 - 1024
    assert report.storage is not None and report.storage.available_gib == 190
    assert report.networks == ("default",) and report.bridges == ("br0",)
    assert report.vms == vms
    assert (report.seq, report.started_at, report.reported_at) == (7, 100.0, 200.0)
    assert report.hw_virt is True


def test_routing_key() -> None:
    assert report_routing_key(HOST_REPORT.kind, "hv1") == "host.report.hv1"


# ------------------------------------------------------------------------------------------ the thread


class StubHypervisor:
    def __init__(self) -> None:
        self.vms: tuple[VmStatus, ...] = ()
        self.fail_facts = 0

    def node_facts(self) -> NodeFacts:
        if self.fail_facts:
            self.fail_facts -= 1
            raise HypervisorError("libvirt went away", details={"code": 38})
        return facts()

    def list_statuses(self) -> tuple[VmStatus, ...]:
        return self.vms


class RecordingSink:
    """Records what the reporter's sink publishes; can be told to fail the next N publishes."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, str, Envelope]] = []
        self.declared: list[str] = []
        self.fail_next = 0
        self.cond = threading.Condition()

    def declare_exchange(self, exchange: Exchange) -> None:
        with self.cond:
            self.declared.append(exchange.name)

    def as_sink(self, host_id: str) -> TransportReportSink:
        return TransportReportSink(cast(Transport, self), host_id, f"agent:{host_id}")

    def publish(
        self,
        exchange: str,
        routing_key: str,
        env: Envelope,
        *,
        persistent: bool = False,
        mandatory: bool = False,
        expiration_ms: int | None = None,
    ) -> None:
        # Reports are transient (worthless after a restart) and mandatory (not lost before the
        # controller has declared its queues).
        assert persistent is False and mandatory is True and expiration_ms is None
        with self.cond:
            # the exchange is declared before the first publish (a fresh broker has none)
            assert self.declared == [REPORTS_EXCHANGE.name]
            if self.fail_next:
                self.fail_next -= 1
                self.cond.notify_all()
                raise TransportError("broker down")
            # through the wire format, as the controller would see it
            self.messages.append((exchange, routing_key, decode_envelope(env.encode())))
            self.cond.notify_all()

    def reports(self) -> list[HostReport]:
        with self.cond:
            return [from_wire(HostReport, e.body) for _, _, e in self.messages if e.kind == HOST_REPORT.kind]

    def heartbeats(self) -> list[Heartbeat]:
        with self.cond:
            return [
                from_wire(Heartbeat, e.body) for _, _, e in self.messages if e.kind == HOST_HEARTBEAT.kind
            ]

    def wait_for(self, predicate: Callable[[], object]) -> None:
        with self.cond:
            assert self.cond.wait_for(predicate, timeout=WAIT), "condition not reached"


@pytest.fixture
def parts() -> Iterator[tuple[Reporter, RecordingSink, StubHypervisor]]:
    sink, hv = RecordingSink(), StubHypervisor()
    reporter = Reporter(
        "hv1",
        "test:///default",
        hv,  # type: ignore[arg-type]  # only what the reporter uses
        sink.as_sink("hv1"),
        report_interval=3600,
        heartbeat_interval=3600,
        agent_version="0.1.0",
    )
    yield reporter, sink, hv
    reporter.stop(final_report=False)


def test_report_on_start_and_heartbeat(parts: tuple[Reporter, RecordingSink, StubHypervisor]) -> None:
    reporter, sink, _hv = parts
    reporter.start()
    sink.wait_for(lambda: sink.reports() and sink.heartbeats())
    exchange, key, env = next(m for m in sink.messages if m[2].kind == HOST_REPORT.kind)
    assert (exchange, key) == (REPORTS_EXCHANGE.name, "host.report.hv1")
    assert env.sender == "agent:hv1"
    beat = next(m[2] for m in sink.messages if m[2].kind == HOST_HEARTBEAT.kind)
    # Each is skipped by the controller once a newer one must exist: heartbeats sooner than reports.
    assert env.expires_at is not None and env.expires_at - env.sent_at == REPORT_TTL_MS / 1000
    assert beat.expires_at is not None and beat.expires_at - beat.sent_at == HEARTBEAT_TTL_MS / 1000
    assert sink.reports()[0].seq == 1
    assert sink.heartbeats()[0].host_id == "hv1"


def test_requested_report_carries_at_least_the_promised_seq(
    parts: tuple[Reporter, RecordingSink, StubHypervisor],
) -> None:
    reporter, sink, hv = parts
    reporter.start()
    sink.wait_for(lambda: len(sink.reports()) == 1)
    hv.vms = (vm("new", PowerState.RUNNING, 512),)
    promised = reporter.request_report()
    sink.wait_for(lambda: any(r.seq >= promised for r in sink.reports()))
    latest = sink.reports()[-1]
    assert promised == 2
    assert [v.name for v in latest.vms] == ["new"]


def test_failures_do_not_kill_the_thread(parts: tuple[Reporter, RecordingSink, StubHypervisor]) -> None:
    reporter, sink, hv = parts
    hv.fail_facts = 1
    sink.fail_next = 1  # the first heartbeat (the first report fails on the hypervisor)
    reporter.start()
    sink.wait_for(lambda: reporter.failures >= 2)
    assert sink.reports() == []
    reporter.request_report()
    sink.wait_for(lambda: len(sink.reports()) >= 1)
    assert reporter.reports_sent >= 1


def test_stop_sends_a_last_report(parts: tuple[Reporter, RecordingSink, StubHypervisor]) -> None:
    reporter, sink, _hv = parts
    reporter.start()
    sink.wait_for(lambda: len(sink.reports()) == 1)
    reporter.stop(final_report=True)
    assert [r.seq for r in sink.reports()] == [1, 2]


def test_reported_at_is_taken_before_the_hypervisor_is_read() -> None:
    """The controller skips a report for a VM it changed after the report's ``reported_at``.
    A change it applies while the agent is still listing domains (the listing saw the old
    state) must therefore be newer than ``reported_at``, or the stale state overwrites it."""
    now = [1000.0]
    listed_at: list[float] = []

    class SlowListing(StubHypervisor):
        def list_statuses(self) -> tuple[VmStatus, ...]:
            listed_at.append(now[0])
            now[0] += 5.0  # meanwhile a suspend finishes and the controller records it
            return self.vms

    sink, hv = RecordingSink(), SlowListing()
    hv.vms = (vm("a", PowerState.RUNNING, 512),)
    reporter = Reporter(
        "hv1",
        "test:///default",
        hv,  # type: ignore[arg-type]
        sink.as_sink("hv1"),
        report_interval=3600,
        heartbeat_interval=3600,
        agent_version="0.1.0",
        clock=lambda: now[0],
    )
    reporter.start()
    sink.wait_for(lambda: len(sink.reports()) == 1)
    reporter.stop(final_report=False)
    assert sink.reports()[0].reported_at <= listed_at[0]


def test_no_heartbeat_while_the_consumer_is_unhealthy() -> None:
    sink, hv = RecordingSink(), StubHypervisor()
    reporter = Reporter(
        "hv1",
        "test:///default",
        hv,  # type: ignore[arg-type]
        sink.as_sink("hv1"),
        report_interval=3600,
        heartbeat_interval=3600,
        agent_version="0.1.0",
        alive=lambda: False,
    )
    reporter.start()
    sink.wait_for(lambda: len(sink.reports()) == 1)
    reporter.stop(final_report=True)
    assert sink.heartbeats() == []
    assert len(sink.reports()) == 2
