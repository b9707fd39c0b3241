"""Host side of the real-kernel network tests: boot the netlab guest once (session fixture) and
check that each bond/VLAN test passed *inside* it. A failure shows the guest's own output."""

from __future__ import annotations

import pytest
from netlab import NetlabRun

pytestmark = pytest.mark.realnet

#: the guest tests (tests/realnet/test_net_guest_bonds.py) that must have run and passed there
GUEST_TESTS = (
    "test_active_backup_bond_as_in_the_ops_notes",
    "test_active_backup_failover_keeps_the_path",
    "test_other_bond_modes[802.3ad-IEEE 802.3ad Dynamic link aggregation]",
    "test_other_bond_modes[balance-rr-load balancing (round-robin)]",
    "test_bridge_on_top_of_the_bond",
    "test_enslave_then_remove_restores_the_nic",
    "test_bond_rolled_back_when_the_broker_is_unreachable",
    "test_vlan_on_the_bond_is_reported",
)


def test_guest_run_completed(netlab_run: NetlabRun) -> None:
    assert netlab_run.rc == 0, netlab_run.explain()
    assert len(netlab_run.cases) == len(GUEST_TESTS), netlab_run.explain()


@pytest.mark.parametrize("name", GUEST_TESTS)
def test_in_guest(netlab_run: NetlabRun, name: str) -> None:
    case = netlab_run.cases.get(name)
    assert case is not None, f"{name} did not run in the guest\n{netlab_run.explain()}"
    assert case.outcome == "passed", f"{name}: {case.outcome}\n{case.message}\n{netlab_run.explain()}"
