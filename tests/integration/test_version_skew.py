"""A fleet upgraded controller first: today's controller and CLI against an agent of the previous
release (its code taken from git), on the real broker and libvirt's test driver.

The previous release speaks vm 1.0: it knows nothing of ``vm.reset`` (vm 1.1). Everything of vm 1.0
keeps working; with ``[rpc] version_cap`` (here the env ``VIRTFLEET_RPC_VERSION_CAP=vm=1.0``) the
controller refuses ``vm reset`` before anything is sent, with a clear error, instead of letting the
old agent receive a command it cannot understand.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from vfsupport import REPO, Fleet, node_uri, private_fleet

from common.messages import vm as vm_msgs

# SQLite only (deploy/test.sh): what is tested is the message versions; the database only holds the fleet.
pytestmark = [pytest.mark.broker, pytest.mark.db, pytest.mark.backend_neutral]

#: The last release before the vm family 1.1 (the commit that landed before operation descriptors).
PREVIOUS_RELEASE = "ead0cac"


@pytest.fixture(scope="module")
def previous_release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The previous release's packages, exported from git (nothing of this tree mixed in)."""
    tree = tmp_path_factory.mktemp("previous-release")
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", PREVIOUS_RELEASE, "agent", "common", "controller"],
        check=True,
        capture_output=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    assert not (tree / "common" / "messages" / "descriptor.py").exists(), "not the previous release"
    return tree


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, previous_release: Path) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("skew")
    # The previous release neither signs nor checks signatures: this fleet runs unsigned.
    with private_fleet(tmp, signed=False) as f:
        f.start_controller(env={"VIRTFLEET_RPC_VERSION_CAP": "vm=1.0"})
        f.start_agent(
            "old",
            node_uri("small"),
            command=[sys.executable, "-m", "agent.main"],
            env={"PYTHONPATH": str(previous_release)},
        )
        f.wait_hosts({"old"})
        yield f


def test_the_previous_release_is_what_runs(fleet: Fleet, previous_release: Path) -> None:
    agent = next(p for p in fleet.procs if p.name == "agent-old")
    pid = agent.popen.pid
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    assert f"PYTHONPATH={previous_release}".encode() in environ


def test_vm_1_0_operations_work_across_the_versions(fleet: Fleet) -> None:
    created = fleet.cli_ok("vm", "create", "web1", "--memory", "256", "--disk", "1")
    assert created["vm"]["host"] == "old" and created["vm"]["power_state"] == "running"
    assert fleet.cli_ok("vm", "reboot", "web1")["vm"]["power_state"] == "running"
    assert fleet.cli_ok("vm", "destroy", "web1")["vm"]["power_state"] == "shutoff"
    assert fleet.cli_ok("vm", "start", "web1")["vm"]["power_state"] == "running"
    shown = fleet.cli_ok("host", "show", "old")
    assert shown["status"] == "up" and "web1" in shown["vms"]


def test_a_newer_operation_is_refused_before_it_is_sent(fleet: Fleet) -> None:
    fleet.cli_ok("vm", "create", "web2", "--memory", "256", "--disk", "1")
    result = fleet.cli("vm", "reset", "web2")
    assert result.code == 1, result.stdout + result.stderr
    error = result.json["error"]
    assert error["type"] == "Unsupported"
    assert "speaks vm 1.0" in error["message"] and vm_msgs.VM_RESET.kind in error["message"]
    # Nothing reached the old agent: it would have logged the unknown kind and dead-lettered it.
    agent = next(p for p in fleet.procs if p.name == "agent-old")
    assert vm_msgs.VM_RESET.kind not in agent.log(tail=500)
    # The VM is untouched and its task cleared: the refusal changed nothing.
    vm = fleet.cli_ok("vm", "show", "web2")
    assert (vm["power_state"], vm["task"], vm["last_error"]) == ("running", None, error["message"])


def test_the_old_agent_reports_and_heartbeats_are_understood(fleet: Fleet) -> None:
    # The previous release's report carries no network/tuning facts decoders choke on, and its
    # heartbeats keep the host up well past the down-after interval.
    fleet.wait_hosts({"old"}, timeout=30)
    host = fleet.cli_ok("host", "show", "old")
    assert host["cpus"] > 0 and host["memory_mib"] > 0
