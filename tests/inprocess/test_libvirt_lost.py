"""libvirtd restarts on a host, in-process: the fake hypervisor "loses" libvirt
(:meth:`~agent.drivers.fake.FakeHypervisor.lose_libvirt`) and gets it back.

While libvirt is away the host shows ``degraded`` with the reason, placement skips it, commands
to it fail at once with the retryable ``HypervisorUnavailable`` (nothing changes on the host),
and its VMs keep running. After the reconnect a full report is sent (a guest that powered off
meanwhile, its event missed, shows in it) and the host is ``up`` again.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from inproc import HostShape, InProcessFleet, inprocess_fleet
from vfsupport import wait_until

from agent.drivers.fake import FakeHypervisor
from agent.reporter import Reporter

#: Far beyond every wait here: what shows in time came from the reports the link's news asked for.
REPORT_INTERVAL = 300.0
SOON = 15.0


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessFleet]:
    hosts = {"a": HostShape("small"), "b": HostShape("small")}
    with inprocess_fleet(
        tmp_path_factory.mktemp("libvirt-lost"), hosts, report_interval=REPORT_INTERVAL
    ) as f:
        yield f


def hv(fleet: InProcessFleet, host: str) -> FakeHypervisor:
    return fleet.fake(host).hypervisor


def reporter_of(fleet: InProcessFleet, host: str) -> Reporter:
    agent = fleet.hosts_by_name[host].agent
    assert agent is not None
    return agent.reporter


def host_show(fleet: InProcessFleet, host: str) -> dict[str, Any]:
    return dict(fleet.cli_ok("host", "show", host))


def listed(fleet: InProcessFleet, host: str, status: str) -> dict[str, Any] | None:
    """Host ``host`` as ``host list`` shows it, once its status is ``status``."""
    view = fleet.hosts().get(host)
    return view if view is not None and view["status"] == status else None


def test_a_host_that_loses_libvirt_is_degraded_refuses_commands_and_comes_back_up(
    fleet: InProcessFleet,
) -> None:
    a = hv(fleet, "a")
    uuid = fleet.cli_ok("vm", "create", "steady", "--memory", "128", "--disk", "1", "--host", "a")["vm"][
        "uuid"
    ]
    other = fleet.cli_ok("vm", "create", "quiet", "--memory", "128", "--disk", "1", "--host", "a")["vm"][
        "uuid"
    ]
    assert listed(fleet, "a", "up")

    a.lose_libvirt("libvirtd closed the connection")
    try:
        view = wait_until(lambda: listed(fleet, "a", "degraded"), SOON, "host a degraded")
        assert "libvirt unreachable" in (view["state_reason"] or "")
        assert "libvirtd closed the connection" in host_show(fleet, "a")["state_reason"]
        capacity = fleet.cli_ok("host", "capacity", "a")
        assert [h["status"] for h in capacity["hosts"]] == ["degraded"], capacity

        # A command fails at once with the typed, retryable error; nothing changed on the host.
        calls = list(a.calls)
        result = fleet.cli("vm", "destroy", "steady")
        assert result.code == 5, result.stdout  # unavailable for the moment: retry
        error = result.json["error"]
        assert error["type"] == "HypervisorUnavailable", error
        assert error["retryable"] is True
        assert a.calls == calls
        shown = fleet.cli_ok("vm", "show", "steady")
        # The controller keeps its view of the host's VMs: not missing, not in error.
        assert (shown["status"], shown["power_state"]) == ("active", "running"), shown

        # Placement skips the degraded host and says why; a forced create on it is refused.
        placed = fleet.cli_ok("vm", "create", "elsewhere", "--memory", "128", "--disk", "1")
        assert placed["vm"]["host"] == "b"
        forced = fleet.cli("vm", "create", "forced", "--memory", "128", "--disk", "1", "--host", "a")
        assert forced.code == 4, forced.stdout
        assert "degraded" in forced.stdout

        # The guest powers itself off while libvirt is away: its event is missed.
        a.guest_powered_off(other)
        reports = reporter_of(fleet, "a").reports_sent
    finally:
        a.restore_libvirt()

    wait_until(lambda: listed(fleet, "a", "up"), SOON, "host a up again")
    assert host_show(fleet, "a")["state_reason"] is None
    report = wait_until(
        lambda: (
            reporter_of(fleet, "a").last_report if reporter_of(fleet, "a").reports_sent > reports else None
        ),
        SOON,
        "a full report after the reconnect",
    )
    assert report.hypervisor_error is None
    assert wait_until(
        lambda: fleet.cli_ok("vm", "show", "quiet")["power_state"] == "shutoff", SOON, "the missed power-off"
    )
    assert fleet.cli_ok("vm", "show", "steady")["power_state"] == "running"
    assert a.status(uuid).state.value == "running"

    # Commands work again, and lifecycle events reach the controller as before.
    fleet.cli_ok("vm", "destroy", "steady")
    fleet.cli_ok("vm", "delete", "steady", "--delete-disks")
    fleet.cli_ok("vm", "delete", "quiet", "--delete-disks")
    fleet.cli_ok("vm", "delete", "elsewhere", "--delete-disks")
