"""The CLI's connection to the controller: RPC on the ``virtfleet.api`` queue."""

from __future__ import annotations

from typing import TypeVar

from common.errors import ControllerUnavailable, TransportError
from common.messages.catalogue import lookup, timeout_for
from common.transport.amqp import RpcClient
from common.transport.rpc import request, unwrap
from common.transport.topology import API_QUEUE

T = TypeVar("T")


class ApiClient:
    """Calls controller API kinds; fails fast and clearly when no controller is running."""

    def __init__(self, url: str, *, timeout: float | None = None, sender: str = "cli") -> None:
        self._url = url
        self._timeout = timeout
        self._sender = sender
        self._rpc = RpcClient(url, "virtfleet-cli")
        self._checked = False

    def close(self) -> None:
        self._rpc.close()

    def _check_controller(self) -> None:
        try:
            consumers = self._rpc.consumer_count(API_QUEUE.name)
        except TransportError as exc:
            raise ControllerUnavailable(
                f"{exc.message}. Is RabbitMQ running? (--amqp-url / VIRTFLEET_AMQP_URL)"
            ) from exc
        if not consumers:
            raise ControllerUnavailable(
                "no virtfleet controller is running: nothing consumes the virtfleet.api queue. "
                "Start one with `virtfleet-controller` (or check --amqp-url)."
            )
        self._checked = True

    def call(self, kind: str, body: object) -> object:
        """Send ``kind`` with ``body`` and return the typed result."""
        entry = lookup(kind)
        if not self._checked:
            self._check_controller()
        timeout = self._timeout if self._timeout is not None else timeout_for(kind)
        env = request(kind, body, self._sender, timeout=timeout)
        reply = self._rpc.call(
            "",
            API_QUEUE.name,
            env,
            timeout,
            persistent=False,
            # A request nobody took before the CLI gave up must not run later by surprise.
            expiration_ms=int(timeout * 1000),
            unroutable=lambda: ControllerUnavailable(
                "no virtfleet controller has ever started on this broker"
            ),
        )
        assert entry.result is not None
        return unwrap(reply, entry.result)

    def typed(self, kind: str, body: object, result_type: type[T]) -> T:
        result = self.call(kind, body)
        assert isinstance(result, result_type)
        return result
