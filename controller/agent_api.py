"""Typed client for agent commands: one method per command kind of the catalogue.

Each controller thread that calls agents gets its own :class:`RpcClient` (pika
connections are not thread-safe); the envelope of a call expires when its timeout class
runs out, so an agent never executes a command its caller has given up on.
"""

from __future__ import annotations

import threading
from typing import Protocol, TypeVar

from common.errors import TransportError
from common.messages import host as host_msgs
from common.messages import vm as vm_msgs
from common.messages.catalogue import timeout_for
from common.transport.amqp import RpcClient
from common.transport.rpc import request, unwrap
from common.transport.topology import COMMANDS_EXCHANGE

T = TypeVar("T")


class AgentCalls(Protocol):
    """What the service needs from agents (a real broker client, or a fake in tests)."""

    def call(self, host_id: str, kind: str, body: object, result_type: type[T]) -> T: ...


class AmqpAgentCalls:
    """Agent calls over RabbitMQ: persistent, confirmed, routed by host id."""

    def __init__(self, url: str, sender: str) -> None:
        self._url = url
        self._sender = sender
        self._local = threading.local()

    def _client(self) -> RpcClient:
        client: RpcClient | None = getattr(self._local, "client", None)
        if client is None:
            client = RpcClient(self._url, f"{self._sender}-{threading.current_thread().name}")
            self._local.client = client
        return client

    def call(self, host_id: str, kind: str, body: object, result_type: type[T]) -> T:
        timeout = timeout_for(kind)
        env = request(kind, body, self._sender, timeout=timeout)
        reply = self._client().call(
            COMMANDS_EXCHANGE.name,
            host_id,
            env,
            timeout,
            persistent=True,
            unroutable=lambda: TransportError(
                f"host {host_id} has no command queue: its agent has never started", retryable=False
            ),
        )
        return unwrap(reply, result_type)


class AgentApi:
    """One typed method per agent command."""

    def __init__(self, calls: AgentCalls) -> None:
        self._calls = calls

    def call(self, host_id: str, kind: str, body: object, result_type: type[T]) -> T:
        """Any agent command of the catalogue (feature modules use this for their kinds)."""
        return self._calls.call(host_id, kind, body, result_type)

    def create_vm(self, host_id: str, body: vm_msgs.CreateVm) -> vm_msgs.VmResult:
        return self._calls.call(host_id, "vm.create", body, vm_msgs.VmResult)

    def vm_action(self, host_id: str, action: str, ref: vm_msgs.VmRef) -> vm_msgs.VmResult:
        """``action`` is one of start, destroy, reboot, suspend, resume."""
        if action not in {"start", "destroy", "reboot", "suspend", "resume"}:
            raise ValueError(f"not a simple VM action: {action}")
        return self._calls.call(host_id, f"vm.{action}", vm_msgs.VmAction(ref), vm_msgs.VmResult)

    def shutdown_vm(self, host_id: str, body: vm_msgs.ShutdownVm) -> vm_msgs.VmResult:
        return self._calls.call(host_id, "vm.shutdown", body, vm_msgs.VmResult)

    def delete_vm(self, host_id: str, body: vm_msgs.DeleteVm) -> vm_msgs.VmResult:
        return self._calls.call(host_id, "vm.delete", body, vm_msgs.VmResult)

    def set_autostart(self, host_id: str, body: vm_msgs.SetAutostart) -> vm_msgs.VmResult:
        return self._calls.call(host_id, "vm.autostart", body, vm_msgs.VmResult)

    def report_now(self, host_id: str, reason: str) -> host_msgs.ReportAck:
        return self._calls.call(
            host_id, "host.report_now", host_msgs.ReportRequest(reason), host_msgs.ReportAck
        )
