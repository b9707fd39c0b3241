"""Malformed messages on a live controller's queues (issue 13, a row that already holds): garbage
bytes, an envelope of a kind nobody knows, and a message over the size limit, on the API queue and
on the reports and heartbeats queues. Each is dead-lettered once (not requeued in a loop) and the
controller process keeps serving: hosts stay up, creates are answered.

tests/fuzz fuzzes the API bodies in process and tests/integration/test_transport_resilience.py
the transport's consumer; this is the whole controller process on the real broker."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from chaoskit import OK, DeadLetterTap, fleet_serves, publish_raw
from vfsupport import Fleet, node_uri, private_fleet

from common.codec import MAX_MESSAGE_BYTES
from common.messages.envelope import Envelope
from common.transport.topology import (
    API_EXCHANGE,
    API_QUEUE,
    HEARTBEATS_QUEUE,
    REPORTS_EXCHANGE,
    REPORTS_QUEUE,
)

pytestmark = [pytest.mark.chaos, pytest.mark.broker]

HOSTS = ("small", "medium")


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    with private_fleet(tmp_path) as f:
        f.start_controller()
        for host in HOSTS:
            f.start_agent(host, node_uri(host))
        f.wait_hosts(set(HOSTS))
        yield f


def malformed(kind: str) -> list[bytes]:
    """Garbage, an envelope of an unknown kind (unsigned), and one byte over the size limit."""
    marker = uuid.uuid4().hex.encode()
    unknown = Envelope(
        kind=kind, body={"marker": marker.decode()}, sender="chaos", expires_at=time.time() + 300
    )
    return [
        b"\xc1 not msgpack " + marker,
        unknown.encode(),
        marker + b"\x00" * (MAX_MESSAGE_BYTES + 1 - len(marker)),
    ]


def test_malformed_messages_are_dead_lettered_and_the_controller_keeps_serving(fleet: Fleet) -> None:
    tap = DeadLetterTap(fleet.amqp_url)
    try:
        api_bad = malformed("api.no_such_kind")
        reports_bad = malformed("host.no_such_kind")
        heartbeat_bad = malformed("host.heartbeat.no_such_kind")[:1]
        publish_raw(fleet.amqp_url, API_EXCHANGE.name, API_QUEUE.name, api_bad)
        publish_raw(fleet.amqp_url, REPORTS_EXCHANGE.name, "host.report.small", reports_bad)
        publish_raw(fleet.amqp_url, REPORTS_EXCHANGE.name, "host.heartbeat.small", heartbeat_bad)
        died_in = tap.wait_for([*api_bad, *reports_bad, *heartbeat_bad])
        print(f"dead-lettered from: {died_in}; {len(tap.seen)} dead letters in all")
        assert died_in == [API_QUEUE.name] * 3 + [REPORTS_QUEUE.name] * 3 + [HEARTBEATS_QUEUE.name]
        # once each: rejected, not requeued in a loop
        assert len(tap.seen) == len(died_in), [(q, b[:40]) for q, b in tap.seen]
    finally:
        tap.close()
    controller = next(p for p in fleet.procs if p.name == "controller")
    assert controller.alive(), controller.log()
    assert fleet_serves(fleet.amqp_url, "after-garbage").result == OK, fleet.logs()
    fleet.wait_hosts(set(HOSTS), timeout=30)  # heartbeats still handled
    log = controller.log(tail=10_000)
    assert "Traceback" not in log and "crashed" not in log, log
