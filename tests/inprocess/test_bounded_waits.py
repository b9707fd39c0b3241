"""Bounded waits (issue 13, item 3): a call to an agent ends when its host is declared down, a
stopping controller gives back what it waits for, and the CLI says what it waits for.

A real controller, agents and the CLI in process on the in-memory broker (tests/inproc.py); an
agent is killed (its connections dropped, no more heartbeats), so a command sent to it is never
answered.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
from inproc import HostShape, InProcessFleet, inprocess_fleet
from vfsupport import CliResult, wait_until

from common.messages.vm import VM_SHUTDOWN
from common.transport.topology import API_QUEUE, agent_queue
from controller.main import STOP_GRACE_S

SHAPES = {"small": HostShape("small"), "medium": HostShape("medium")}
#: what a wait may take beyond the host-down time (issue 13: "within the host-down time + 15 s")
MARGIN_S = 15.0
#: Hosts go down this long after their last heartbeat. Every test here waits for it once or twice
#: (the products default is minutes): short, yet ten in-process heartbeats (every 0.5 s), and no
#: claim holds a host's row while these tests wait, so a live host does not go down by mistake.
SHORT_DOWN_AFTER_S = 5.0


@pytest.fixture
def short_fleet(tmp_path: Path) -> Iterator[InProcessFleet]:
    """Hosts go down ``SHORT_DOWN_AFTER_S`` after their last heartbeat."""
    with inprocess_fleet(tmp_path, SHAPES, down_after_s=SHORT_DOWN_AFTER_S) as f:
        yield f


def _command_waiting(fleet: InProcessFleet, host: str) -> bool:
    """A command sits in the host's queue: nobody consumes it (its agent is dead)."""
    return bool(fleet.broker.messages(agent_queue(host).name))


def test_a_shutdown_waiting_on_a_killed_agent_ends_with_host_down_when_the_host_is_declared_down(
    short_fleet: InProcessFleet,
) -> None:
    fleet = short_fleet
    fleet.cli_ok("vm", "create", "orphan", "--memory", "64", "--disk", "1", "--host", "medium")
    fleet.kill_agent("medium")
    started = time.monotonic()
    # The host is still up (its last heartbeat is recent): the command is sent, and nobody answers.
    result = fleet.cli("vm", "shutdown", "orphan")
    waited = time.monotonic() - started

    assert result.code == 4, result.stdout + result.stderr
    error = result.json["error"]  # stdout is one JSON document: progress went to stderr only
    assert error["type"] == "HostDown" and error["retryable"] is True
    assert error["details"]["host"] == "medium"
    assert "declared down" in error["message"] and VM_SHUTDOWN.kind in error["message"]
    assert 0 < error["details"]["waited_s"] <= SHORT_DOWN_AFTER_S + MARGIN_S
    # Far below the shutdown's timeout class; bounded by the configured down time.
    assert waited < SHORT_DOWN_AFTER_S + MARGIN_S
    # The wait showed what it waited for, on stderr.
    assert "waiting for the controller: vm shutdown orphan (" in result.stderr
    assert "waiting for the controller" not in result.stdout
    # Left as a failed operation leaves it: task cleared, the error noted, state for the reports.
    shown = fleet.cli_ok("vm", "show", "orphan")
    assert shown["task"] is None and "declared down" in (shown["last_error"] or "")


def test_a_stopping_controller_hands_a_request_waiting_on_a_dead_agent_back_to_the_queue(
    short_fleet: InProcessFleet,
) -> None:
    fleet = short_fleet
    fleet.cli_ok("vm", "create", "handed-back", "--memory", "64", "--disk", "1", "--host", "small")
    fleet.kill_agent("small")
    controller = fleet.controller
    assert controller is not None
    with ThreadPoolExecutor(1) as pool:
        pending: Future[CliResult] = pool.submit(fleet.cli, "vm", "shutdown", "handed-back")
        wait_until(lambda: _command_waiting(fleet, "small"), 30, "the shutdown command in the agent's queue")

        started = time.monotonic()
        controller.stop()
        stopped_in = time.monotonic() - started

        assert stopped_in < 10  # issue 13: "exits within 10 s", though the agent never answers
        assert STOP_GRACE_S < 10
        assert controller.agents.waiting == 0  # the wait was given up, not left behind
        # Not answered, not acknowledged: the CLI's request is back in the API queue.
        (back,) = fleet.broker.messages(API_QUEUE.name)
        assert back.redelivered is True
        assert not pending.done()

        # The next controller takes it: the host is still up, so it waits on the dead agent in
        # turn, until the host is declared down.
        fleet.start_controller()
        result = pending.result(timeout=SHORT_DOWN_AFTER_S + 60)
    assert result.code == 4, result.stdout + result.stderr
    assert result.json["error"]["type"] == "HostDown"
    assert result.json["error"]["details"]["host"] == "small"
