"""ReportScheduler: many hosts' reporters driven from one thread, staggered, requests served first."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from agent.ports import NodeFacts
from agent.report_scheduler import ReportScheduler
from agent.reporter import Reporter
from common.messages.descriptor import Report
from common.messages.host import HOST_HEARTBEAT, HOST_REPORT, CpuTopology
from common.messages.vm import VmStatus

WAIT = 10.0


class Hypervisor:
    def node_facts(self) -> NodeFacts:
        return NodeFacts(
            hostname="sim",
            hypervisor_type="TEST",
            hypervisor_version="0.0.2",
            libvirt_version="9.0.0",
            cpu=CpuTopology(cpus=1, sockets=1, cores=1, threads=1, numa_cells=1, mhz=1000, model="x86_64"),
            memory_mib=1024,
            free_memory_mib=0,
            storage=None,
            networks=(),
            bridges=(),
            hw_virt=True,
        )

    def list_statuses(self) -> tuple[VmStatus, ...]:
        return ()


class Log:
    """Every report and heartbeat sent, in order, as (kind, host, monotonic time, thread)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str, float, str]] = []
        self.cond = threading.Condition()

    def sink(self, host: str) -> Any:
        log = self

        class Sink:
            def send(self, op: Report[Any], body: Any, *, sent_at: float, ttl_s: float) -> None:
                del body, sent_at, ttl_s
                with log.cond:
                    log.sent.append((op.kind, host, time.monotonic(), threading.current_thread().name))
                    log.cond.notify_all()

        return Sink()

    def of(self, kind: str, host: str | None = None) -> list[tuple[str, str, float, str]]:
        with self.cond:
            return [s for s in self.sent if s[0] == kind and (host is None or s[1] == host)]

    def wait_for(self, kind: str, count: int, host: str | None = None) -> list[tuple[str, str, float, str]]:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.of(kind, host)) >= count, WAIT), self.sent
            return self.of(kind, host)


def reporters(log: Log, count: int, *, interval: float = 3600.0) -> list[Reporter]:
    return [
        Reporter(
            f"h{i}",
            "test:///default",
            Hypervisor(),  # type: ignore[arg-type]  # only what the reporter uses
            log.sink(f"h{i}"),
            report_interval=interval,
            heartbeat_interval=interval,
            agent_version="0.1.0",
        )
        for i in range(count)
    ]


@pytest.fixture
def log() -> Log:
    return Log()


@pytest.fixture
def hosts(log: Log) -> Iterator[list[Reporter]]:
    """Five hosts' reporters (hourly reports) on a started scheduler."""
    made = reporters(log, 5)
    scheduler = ReportScheduler(made, spread=0.4, name="t")
    before = threading.active_count()
    scheduler.start()
    assert threading.active_count() == before + 1  # one thread for every host
    yield made
    scheduler.stop(final_report=False)


def test_first_reports_and_heartbeats_are_staggered_over_the_spread_from_one_thread(
    log: Log, hosts: list[Reporter]
) -> None:
    del hosts
    reports = log.wait_for(HOST_REPORT.kind, 5)
    beats = log.wait_for(HOST_HEARTBEAT.kind, 5)
    assert [r[1] for r in reports] == ["h0", "h1", "h2", "h3", "h4"]
    assert {b[1] for b in beats} == {"h0", "h1", "h2", "h3", "h4"}
    assert reports[-1][2] - reports[0][2] >= 0.25  # 4/5 of the spread, less scheduling slack
    assert {r[3] for r in reports + beats} == {"t-scheduler"}


def test_a_requested_report_is_sent_soon_and_for_that_host_only(log: Log, hosts: list[Reporter]) -> None:
    log.wait_for(HOST_REPORT.kind, 5)
    asked = time.monotonic()
    hosts[3].request_report()
    # Served on request: its next due report is an hour away, and wait_for gives up after WAIT
    # seconds (no wall-clock bound of its own here: a loaded machine delays a thread by seconds).
    (_first, again) = log.wait_for(HOST_REPORT.kind, 2, host="h3")
    assert again[2] >= asked
    assert len(log.of(HOST_REPORT.kind)) == 6  # the others' next reports are an hour away


def test_due_reports_repeat_and_stop_sends_every_final_report(log: Log) -> None:
    scheduler = ReportScheduler(reporters(log, 3, interval=0.2), spread=0.1, name="t")
    scheduler.start()
    log.wait_for(HOST_REPORT.kind, 3, host="h2")
    scheduler.stop(final_report=True)
    count = {h: len(log.of(HOST_REPORT.kind, h)) for h in ("h0", "h1", "h2")}
    assert all(n >= 4 for n in count.values()), count  # three due + the final one
    assert len(log.of(HOST_HEARTBEAT.kind, "h1")) >= 3
