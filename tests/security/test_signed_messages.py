"""Attack 4 of issue 12 against a live, signed fleet: a recorded command re-published.

An attacker with a login on the broker records a real ``vm.destroy`` as it is published (a queue
of its own bound to the commands exchange with the host's routing key), lets the VM be started
again, then re-publishes the recording: re-dated (a new id, ``sent_at`` in 2020, no
``expires_at``), stripped of its signature, and as it was. None of it may power the VM off: the
first two are dead-lettered with the reason; the third is a replay of a command the agent ran, so
its journal answers it and nothing runs. The agent keeps serving.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pika
import pytest
from vfsupport import Fleet, running_fleet, wait_until

from common.messages.envelope import Envelope, decode_envelope
from common.messages.vm import VM_DESTROY
from common.transport.topology import COMMANDS_EXCHANGE, DEAD_LETTER_QUEUE, agent_queue

# SQLite only (deploy/test.sh): signatures are checked on the bus; the database only holds the fleet.
pytestmark = [pytest.mark.broker, pytest.mark.db, pytest.mark.backend_neutral]

HOST = "h1"
TAP = "attacker.tap"
#: 2020-01-01T00:00:00Z
IN_2020 = 1_577_836_800.0


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    with running_fleet(tmp_path_factory.mktemp("signed"), {HOST: ("small",)}) as f:
        yield f


@pytest.fixture
def channel(fleet: Fleet) -> Iterator[pika.adapters.blocking_connection.BlockingChannel]:
    """The attacker's own connection to the fleet's vhost."""
    conn = pika.BlockingConnection(pika.URLParameters(fleet.amqp_url))
    try:
        yield conn.channel()
    finally:
        conn.close()


def depth(channel: pika.adapters.blocking_connection.BlockingChannel, queue: str) -> int:
    return int(channel.queue_declare(queue, passive=True).method.message_count)


def recorded(channel: pika.adapters.blocking_connection.BlockingChannel, kind: str) -> Envelope:
    while True:
        _method, _props, body = channel.basic_get(TAP, auto_ack=True)
        assert body is not None, f"no {kind} was recorded"
        env = decode_envelope(body)
        if env.kind == kind:
            return env


def power_state(fleet: Fleet) -> str:
    return str(fleet.cli_ok("vm", "show", "victim")["power_state"])


def test_a_recorded_command_republished_does_not_run(
    fleet: Fleet, channel: pika.adapters.blocking_connection.BlockingChannel
) -> None:
    channel.queue_declare(TAP, exclusive=True)
    channel.queue_bind(TAP, COMMANDS_EXCHANGE.name, routing_key=HOST)
    assert fleet.cli_ok("vm", "create", "victim", "--memory", "256", "--disk", "1")["vm"]["host"] == HOST
    fleet.cli_ok("vm", "destroy", "victim")
    assert fleet.cli_ok("vm", "start", "victim")["vm"]["power_state"] == "running"
    destroy = recorded(channel, VM_DESTROY.kind)
    assert destroy.signature is not None, "the fleet is not signed: the test would prove nothing"

    dead_before = depth(channel, DEAD_LETTER_QUEUE.name)
    forged = [
        dataclasses.replace(destroy, id="a" * 32, sent_at=IN_2020, expires_at=None),
        dataclasses.replace(destroy, id="b" * 32, key_id=None, signature=None),
    ]
    for env in [*forged, destroy]:
        channel.basic_publish(COMMANDS_EXCHANGE.name, HOST, env.encode())
    wait_until(
        lambda: depth(channel, DEAD_LETTER_QUEUE.name) >= dead_before + len(forged),
        60,
        "the re-dated and the unsigned command to be dead-lettered",
    )
    wait_until(lambda: depth(channel, agent_queue(HOST).name) == 0, 60, "the agent to consume the replay")

    dead = []
    while (got := channel.basic_get(DEAD_LETTER_QUEUE.name, auto_ack=True))[2] is not None:
        dead.append(decode_envelope(got[2]).id)
    assert {"a" * 32, "b" * 32} <= set(dead)
    assert destroy.id not in dead  # the as-is replay was answered from the journal, not refused
    log = (fleet.tmp / f"agent-{HOST}.log").read_text()
    assert f"vm.destroy {'a' * 32}: bad signature" in log  # its id, date and expiry are not what was signed
    assert f"unsigned vm.destroy {'b' * 32}" in log

    # The agent still serves, and its reply is ordered after the attacks: the VM never went down.
    assert fleet.cli_ok("vm", "reboot", "victim")["vm"]["power_state"] == "running"
    assert power_state(fleet) == "running"
