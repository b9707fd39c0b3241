"""controller.agent_api.AgentClient's bounded waits: a call ends when its host is declared down
or when the controller stops, on the in-memory broker with an agent queue nobody consumes."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import pytest

from common.errors import HostDown
from common.messages.vm import VM_START, VmAction, VmRef
from common.transport.memory import MemoryBroker
from common.transport.port import Interrupted
from common.transport.topology import COMMANDS_EXCHANGE, agent_queue
from controller.agent_api import AgentClient

WAIT = 30.0


class DownSwitch:
    """A stand-in for FleetState.watch_down: the test declares a host down."""

    def __init__(self) -> None:
        self.watchers: dict[str, list[Callable[[], None]]] = {}
        self.subscribed = threading.Event()

    def __call__(self, host: str, down: Callable[[], None]) -> Callable[[], None]:
        self.watchers.setdefault(host, []).append(down)
        self.subscribed.set()
        return lambda: self.watchers[host].remove(down)

    def declare_down(self, host: str) -> None:
        for down in list(self.watchers.get(host, [])):
            down()


def _client(broker: MemoryBroker, down: DownSwitch) -> AgentClient:
    transport = broker.transport("controller")
    transport.declare_exchange(COMMANDS_EXCHANGE)
    transport.declare(agent_queue("h1"))  # an agent queue nobody consumes: no reply ever
    return AgentClient(transport, "controller", down=down)


def _start(client: AgentClient, pool: ThreadPoolExecutor) -> Future[object]:
    return pool.submit(client.call, "h1", VM_START, VmAction(VmRef("u-1", "web")))


def test_a_call_ends_with_host_down_naming_the_host_when_its_host_is_declared_down() -> None:
    broker, down = MemoryBroker(), DownSwitch()
    client = _client(broker, down)
    with ThreadPoolExecutor(1) as pool:
        pending = _start(client, pool)
        assert down.subscribed.wait(WAIT)
        down.declare_down("h2")  # another host: nothing happens
        assert not pending.done()
        down.declare_down("h1")
        with pytest.raises(HostDown) as info:
            pending.result(WAIT)
    assert info.value.details["host"] == "h1"
    assert "waited_s" in info.value.details
    assert down.watchers["h1"] == []  # unsubscribed when the call ended
    assert client.waiting == 0


def test_interrupt_ends_waiting_calls_and_refuses_new_ones() -> None:
    broker, down = MemoryBroker(), DownSwitch()
    client = _client(broker, down)
    with ThreadPoolExecutor(1) as pool:
        pending = _start(client, pool)
        assert down.subscribed.wait(WAIT)
        assert client.interrupt() == 1
        with pytest.raises(Interrupted):
            pending.result(WAIT)
    with pytest.raises(Interrupted):
        client.call("h1", VM_START, VmAction(VmRef("u-2", "db")))
    assert len(broker.messages(agent_queue("h1").name)) == 1  # the later call sent nothing
