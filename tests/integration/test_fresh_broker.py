"""An agent that starts before any controller, on a broker nobody has prepared, is not lost.

Until a controller declares the reports queues, the reports exchange routes nowhere. The agent
publishes its reports ``mandatory``: an unroutable report is refused, and the agent sends it again
soon (not after the whole report interval), so the host shows up as soon as a controller runs.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from vfsupport import node_uri, private_fleet, wait_until

pytestmark = [pytest.mark.broker, pytest.mark.db]


def test_the_first_report_on_a_fresh_broker_is_not_dropped(tmp_path: Path) -> None:
    with private_fleet(tmp_path) as fleet:
        # A report interval far longer than the test: only a retried first report can make
        # the host known in time.
        agent = fleet.start_agent("early", node_uri("small"), "--report-interval", "3600", heartbeat=1.0)
        wait_until(lambda: "could not send host report" in agent.log(500), 60, "the agent to try reporting")
        assert agent.alive()
        started = time.monotonic()
        fleet.start_controller()
        fleet.wait_hosts({"early"}, timeout=60)
        host = fleet.cli_ok("host", "show", "early")
        assert host["cpus"] > 0 and time.monotonic() - started < 60
