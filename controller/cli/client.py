"""The CLI's connection to the controller: typed calls on the ``virtfleet.api`` queue."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import TypeVar

from common.codec import from_wire, to_wire
from common.errors import ControllerUnavailable, InvalidRequest, TransportError
from common.messages.catalogue import timeout_of
from common.messages.descriptor import ApiCall
from common.messages.limits import MAX_KEY_CHARS
from common.transport.port import Transport
from common.transport.rpc import request, unwrap
from common.transport.topology import API_EXCHANGE, API_QUEUE, api_queue
from controller.cli.progress import describe

#: shows what a call waits for while it waits (given the call's description: controller.cli.progress)
Progress = Callable[[str], AbstractContextManager[object]]

B = TypeVar("B")
R = TypeVar("R")


class ApiClient:
    """Calls controller API operations; fails fast and clearly when no controller is running."""

    def __init__(
        self,
        transport: Transport,
        *,
        timeout: float | None = None,
        sender: str = "cli",
        progress: Progress | None = None,
        idempotency_key: str | None = None,
    ) -> None:
        self._transport = transport
        self._key = idempotency_key
        #: state-changing calls made so far (each gets its own key: see :meth:`_key_of`)
        self._changes = 0
        self._progress = progress
        self._timeout = timeout
        self._sender = sender
        self._checked = False

    def close(self) -> None:
        self._transport.close()

    def _check_controller(self) -> None:
        try:
            consumers = self._transport.consumer_count(API_QUEUE.name)
        except TransportError as exc:
            raise ControllerUnavailable(
                f"{exc.message}. Is RabbitMQ running? (--amqp-url / VIRTFLEET_AMQP_URL)"
            ) from exc
        if not consumers:
            raise ControllerUnavailable(
                f"no virtfleet controller is running: nothing consumes the {API_QUEUE.name} queue. "
                "Start one with `virtfleet-controller` (or check --amqp-url)."
            )
        self._checked = True

    def call(self, op: ApiCall[B, R], body: B) -> R:
        """Send ``op`` with ``body`` and return its typed result (or raise its error).

        The body is checked against its bounds first, as the controller will check it: a value
        out of range (``--memory 99999999999999999999``, which MessagePack cannot even carry)
        is an InvalidRequest naming the field and its range, and nothing is sent.
        """
        from_wire(type(body), to_wire(body))
        key = self._key_of(op)
        if not self._checked:
            self._check_controller()
        timeout = self._timeout if self._timeout is not None else timeout_of(op)
        env = request(op, body, self._sender, timeout=timeout, idempotency_key=key)
        waiting = nullcontext() if self._progress is None else self._progress(describe(op.kind, env.body))
        with waiting:
            reply = self._transport.call(
                API_EXCHANGE.name,
                api_queue(op.role).name,
                env,
                timeout,
                persistent=False,
                # A request nobody took before the CLI gave up must not run later by surprise.
                expiration_ms=int(timeout * 1000),
                unroutable=lambda: ControllerUnavailable(
                    "no virtfleet controller has ever started on this broker"
                ),
            )
        return unwrap(reply, op)

    def _key_of(self, op: ApiCall[B, R]) -> str | None:
        """The idempotency key of this call: the caller's for the first state-changing call,
        ``<key>/<n>`` for the n-th (so that a retry of the whole command sends the same keys);
        none for a query. InvalidRequest for a key out of bounds (nothing is sent)."""
        if self._key is None or not op.changes:
            return None
        self._changes += 1
        key = self._key if self._changes == 1 else f"{self._key}/{self._changes}"
        if not 0 < len(key) <= MAX_KEY_CHARS:
            raise InvalidRequest(
                f"--idempotency-key must have 1-{MAX_KEY_CHARS} characters, got {len(key)}",
                details={"field": "idempotency_key", "max_length": MAX_KEY_CHARS},
            )
        return key
