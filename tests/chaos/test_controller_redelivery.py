"""Controller ``kill -9`` while creates are in flight (issue 13, the table's first row, the half
"every client gets the true answer to its own request"): the real controller and agents on the
broker (a private vhost), libvirt's test driver, the ``virtfleet`` CLI as operators run it.

The agents are frozen (SIGSTOP) so that every create has claimed its VM and waits on its agent
when the controller is killed; the broker then redelivers the unacknowledged ``api.vm.create``
requests to the restarted controller, whose request journal answers each with the VM that
request claimed once it has left ``building``: the recovery (controller.recovery) takes the dead
controller's builds over once its liveness record expires and finds each VM on its host.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session
from vfsupport import BIN, Fleet, node_uri, private_fleet, wait_until

from common.messages.vm import Lifecycle
from controller.db import repository as repo
from controller.db.engine import make_engine

pytestmark = [pytest.mark.chaos, pytest.mark.broker, pytest.mark.db]

CREATES = 10
#: a dead controller's work is taken over this soon (instance_expiry_s), checked this often
EXPIRY_S = 3.0
BOUND_S = 120.0  # liveness bound of every wait: a hang fails the test


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    config = tmp_path / "controller.toml"
    config.write_text(
        f"instance_heartbeat_s = 1.0\ninstance_expiry_s = {EXPIRY_S}\nlease_ttl_s = {EXPIRY_S}\n"
        "recovery_interval_s = 1.0\n"
    )
    with private_fleet(tmp_path) as f:
        f.start_controller("controller", "--config", str(config))
        for host in ("medium", "large"):
            f.start_agent(host, node_uri(host))
        f.wait_hosts({"medium", "large"})
        yield f


def _building(engine: Engine) -> int:
    with Session(engine) as s:
        return len(repo.list_vms(s, status=Lifecycle.BUILDING))


def test_creates_redelivered_after_a_controller_kill_get_their_own_vm(fleet: Fleet, tmp_path: Path) -> None:
    engine = make_engine(fleet.database_url)
    agents = [p for p in fleet.procs if p.name.startswith("agent-")]
    controller = next(p for p in fleet.procs if p.name == "controller")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("VIRTFLEET_")}}
    env["VIRTFLEET_AMQP_URL"] = fleet.amqp_url
    clients: dict[str, subprocess.Popen[str]] = {}
    try:
        for agent in agents:
            agent.popen.send_signal(signal.SIGSTOP)  # every build waits on its agent
        for i in range(CREATES):
            name = f"redeliver{i}"
            clients[name] = subprocess.Popen(
                [str(BIN / "virtfleet"), "-o", "json", "vm", "create", name, "--memory", "64", "--disk", "1"],
                stdout=(tmp_path / f"{name}.out").open("w"),
                stderr=(tmp_path / f"{name}.err").open("w"),
                text=True,
                env=env,
            )
        wait_until(lambda: _building(engine) == CREATES, BOUND_S, f"{CREATES} creates claimed")
        controller.kill()  # kill -9 with every create in flight
        killed_at = time.monotonic()
        for agent in agents:
            agent.popen.send_signal(signal.SIGCONT)
        fleet.procs.remove(controller)
        fleet.start_controller("controller-2", "--config", str(tmp_path / "controller.toml"))
        for client in clients.values():
            client.wait(BOUND_S)
        answered_s = time.monotonic() - killed_at
    finally:
        for agent in agents:
            agent.popen.send_signal(signal.SIGCONT)
        for client in clients.values():
            if client.poll() is None:
                client.kill()
                client.wait()
    answers = {
        name: (proc.returncode, (tmp_path / f"{name}.out").read_text()) for name, proc in clients.items()
    }
    for name, (code, out) in answers.items():
        assert "AlreadyExists" not in out, f"{name}: {out}"
        assert code == 0, f"{name} exited {code}: {out}"
        assert json.loads(out)["vm"]["name"] == name
    states = sorted(json.loads(out)["vm"]["status"] for _code, out in answers.values())
    print(f"{CREATES} creates answered {answered_s:.1f} s after the kill, each with its own VM: {states}")
    # The true answer: each build reached its (frozen, then continued) agent, so each VM runs.
    assert states == [Lifecycle.ACTIVE.value] * CREATES, answers
    with Session(engine) as s:
        names = sorted(v.name for v in repo.list_vms(s))
    assert names == sorted(clients)  # one VM per request, none twice
    engine.dispose()
