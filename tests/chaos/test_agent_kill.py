"""Agent ``kill -9`` in the middle of creates, then restarted (issue 13, a row that already holds).

The agent is frozen first so that the commands are certainly in flight (delivered to it, not
acknowledged) when it dies: each create then ends with its true answer (the restarted agent takes
the redelivered command) or a typed error (HostDown when the host was declared down first),
nothing is done twice, nothing is lost and no capacity stays claimed for a VM that does not exist.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from chaoskit import (
    NO_ANSWER,
    audit,
    create_body,
    fleet_serves,
    freeze,
    kill9,
    names,
    queue_messages,
    set_aside,
    settled_view,
    start_creates,
)
from vfsupport import SHORT_DOWN_AFTER_S, Fleet, node_uri, private_fleet, wait_until

from common.transport.topology import agent_queue

pytestmark = [pytest.mark.chaos, pytest.mark.broker]

VICTIM, SPARE = "victim", "spare"
IN_FLIGHT = 6


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    with private_fleet(tmp_path) as f:
        f.start_controller(down_after=SHORT_DOWN_AFTER_S)
        f.start_agent(VICTIM, node_uri("medium"))
        f.start_agent(SPARE, node_uri("large"))
        f.wait_hosts({VICTIM, SPARE})
        yield f


def test_creates_in_flight_on_an_agent_killed_and_restarted_end_once_each(fleet: Fleet) -> None:
    agent = next(p for p in fleet.procs if p.name == f"agent-{VICTIM}")
    freeze(agent)
    load = start_creates(fleet.amqp_url, [create_body(n, host=VICTIM) for n in names("inflight", IN_FLIGHT)])
    queue = agent_queue(VICTIM).name
    wait_until(
        lambda: queue_messages(fleet.amqp_url, queue) >= IN_FLIGHT, 60, "the creates' commands in flight"
    )
    kill9(agent)  # SIGKILL works on a stopped process; the commands go back to the queue
    set_aside(fleet, agent)
    time.sleep(2.0)
    fleet.start_agent(VICTIM, node_uri("medium"))  # the same state dir: the same journal

    outcomes = load.wait(180)
    report = audit(outcomes, settled_view(fleet.amqp_url))
    print(f"agent kill -9 with {IN_FLIGHT} creates in flight: {report.summary()}")
    for out in outcomes:
        print(f"  {out.name}: {out.result} {out.message}")
    assert report.clean, report.explain() + fleet.logs()
    assert NO_ANSWER not in {o.result for o in outcomes}, report.explain()
    assert set(report.errors) <= {"HostDown"}, report.explain()
    fleet.wait_hosts({VICTIM})
    assert fleet_serves(fleet.amqp_url, "after-restart", host=VICTIM).result == "ok"
