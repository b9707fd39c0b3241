"""The controller's one way to call an agent: ``agents.call(host_id, COMMAND, body) -> result``.

The command descriptor fixes the body and result types (a mismatch is a mypy error), the
timeout class and the family version; the envelope expires when the timeout runs out, so an
agent never executes a command its caller has given up on. Before anything is sent, the
command and its body are checked against the version the host's agent speaks (the operator's
``[rpc] version_cap``), so an old agent is never sent something it would misread.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import Protocol, TypeVar

from common.errors import HostDown, TransportError
from common.messages.catalogue import timeout_of
from common.messages.descriptor import Command, Family, Version, check_sendable
from common.messages.envelope import Envelope
from common.transport.port import Abort, Interrupted, Transport
from common.transport.rpc import request, unwrap
from common.transport.topology import COMMANDS_EXCHANGE

B = TypeVar("B")
R = TypeVar("R")

#: (host id, family) -> the newest version of that family the host's agent may be sent (None: no cap)
VersionCap = Callable[[str, Family], Version | None]


class AgentCalls(Protocol):
    """What the controller's use cases need from agents (a transport client, or a test double)."""

    def call(self, host_id: str, op: Command[B, R], body: B) -> R: ...


#: subscribe a callback to "this host was declared down" (run at once if it is down already);
#: returns the unsubscribe (FleetState.watch_down)
DownWatch = Callable[[str, Callable[[], None]], Callable[[], None]]


def configured_cap(caps: Mapping[str, Version]) -> VersionCap:
    """A cap from configuration: the same per-family version for every host."""

    def cap(_host_id: str, family: Family) -> Version | None:
        return caps.get(family.name)

    return cap


def _uncapped(_host_id: str, _family: Family) -> Version | None:
    return None


def _never_down(_host_id: str, _down: Callable[[], None]) -> Callable[[], None]:
    return lambda: None


class AgentClient:
    """Agent commands over a transport: persistent, confirmed, routed by host id."""

    def __init__(
        self,
        transport: Transport,
        sender: str,
        *,
        cap: VersionCap = _uncapped,
        sign: Callable[[Envelope, str], Envelope] | None = None,
        check_reply: Callable[[Envelope, str], None] | None = None,
        down: DownWatch = _never_down,
    ) -> None:
        self._transport = transport
        self._sender = sender
        self._cap = cap
        #: signs a command with the key of the host it goes to (common.signing.Signer); None: unsigned
        self._sign = sign
        #: raises Unauthenticated unless a reply is signed with its host's key; None: not checked
        self._check_reply = check_reply
        #: where a call learns that its host was declared down
        self._down = down
        self._lock = threading.Lock()
        #: the aborts of the calls waiting now (interrupt() sets them all)
        self._waiting: set[Abort] = set()
        self._interrupted: Interrupted | None = None

    def call(self, host_id: str, op: Command[B, R], body: B) -> R:
        """Send ``op`` to ``host_id``'s agent and return its typed result (or raise its error).

        HostDown (retryable, ``details["host"]`` and ``["waited_s"]``) when the host is declared
        down before the reply comes; Interrupted when the controller stops meanwhile.
        """
        check_sendable(op, body, self._cap(host_id, op.family), f"the agent of host {host_id}")
        timeout = timeout_of(op)
        env = request(op, body, self._sender, timeout=timeout)
        if self._sign is not None:
            env = self._sign(env, host_id)
        abort = Abort()
        started = time.monotonic()

        def went_down() -> None:
            waited = time.monotonic() - started
            abort.set(
                HostDown(
                    f"host {host_id} was declared down after {waited:.0f} s waiting for its agent's "
                    f"reply to {op.kind}; the command may still have been carried out (the host's "
                    "next report tells)",
                    details={"host": host_id, "waited_s": round(waited, 1)},
                )
            )

        with self._lock:
            if self._interrupted is not None:
                raise self._interrupted
            self._waiting.add(abort)
        unwatch = self._down(host_id, went_down)
        try:
            reply = self._transport.call(
                COMMANDS_EXCHANGE.name,
                host_id,
                env,
                timeout,
                persistent=True,
                unroutable=lambda: TransportError(
                    f"host {host_id} has no command queue: its agent has never started", retryable=False
                ),
                abort=abort,
            )
        finally:
            unwatch()
            with self._lock:
                self._waiting.discard(abort)
        if self._check_reply is not None:
            self._check_reply(reply, host_id)
        return unwrap(reply, op)

    @property
    def waiting(self) -> int:
        """How many calls wait for an agent's reply now."""
        with self._lock:
            return len(self._waiting)

    def interrupt(self) -> int:
        """The controller is stopping: every call waiting now, and every later one, ends with
        :class:`Interrupted` (its API request goes back to the queue). Returns how many waited."""
        error = Interrupted("the controller is stopping; the request goes back to the queue")
        with self._lock:
            self._interrupted = error
            waiting = list(self._waiting)
        for abort in waiting:
            abort.set(error)
        return len(waiting)
