"""Typed request/reply on top of the transport: dispatching to handlers and calling peers.

:class:`Dispatcher` turns a :class:`~common.transport.port.Delivery` into an
:class:`~common.transport.port.Outcome`: it looks the kind up in the catalogue, refuses
expired requests, decodes the body into its dataclass, runs the handler and wraps the
result or error as a reply. Malformed messages (unknown kind, body that does not fit the
schema) are answered with an error *and* dead-lettered. An optional :class:`Journal`
records each reply by message id so that a redelivered command is answered from the
journal instead of being executed twice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol, TypeVar

from common.errors import (
    InternalError,
    InvalidRequest,
    RequestTimeout,
    Unsupported,
    VirtfleetError,
    error_from_wire,
)
from common.messages.catalogue import CATALOGUE, TIMEOUT_SECONDS, lookup
from common.messages.envelope import REPLY_KIND, Envelope, decode_envelope
from common.schema import from_plain, to_plain
from common.transport.port import Delivery, Outcome

log = logging.getLogger(__name__)

T = TypeVar("T")


class Journal(Protocol):
    """Where replies are remembered by request id (the agent's exactly-once store)."""

    def get(self, message_id: str) -> bytes | None: ...

    def put(self, message_id: str, kind: str, reply: bytes) -> None: ...


HandlerFn = Callable[[Any], Any]


class Dispatcher:
    """Routes decoded requests to typed handler functions and builds replies."""

    def __init__(
        self,
        sender: str,
        handlers: Mapping[str, HandlerFn],
        *,
        journal: Journal | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        unknown = set(handlers) - set(CATALOGUE)
        if unknown:
            raise ValueError(f"handlers for kinds not in the catalogue: {sorted(unknown)}")
        self.sender = sender
        self._handlers = dict(handlers)
        self._journal = journal
        self._clock = clock

    def __call__(self, delivery: Delivery) -> Outcome:
        env = delivery.envelope
        if self._journal is not None:
            recorded = self._journal.get(env.id)
            if recorded is not None:
                log.info("answering redelivered %s %s from the journal", env.kind, env.id)
                return Outcome(reply=decode_envelope(recorded))
        outcome = self._handle(env)
        if self._journal is not None and outcome.reply is not None and not outcome.dead_letter:
            self._journal.put(env.id, env.kind, outcome.reply.encode())
        return outcome

    def _handle(self, env: Envelope) -> Outcome:
        kind = CATALOGUE.get(env.kind)
        if kind is None:
            log.warning("dead-lettering message of unknown kind %r from %s", env.kind, env.sender)
            return Outcome(
                env.reply_error(InvalidRequest(f"unknown message kind {env.kind!r}"), self.sender), True
            )
        if env.expired(self._clock()):
            return Outcome(
                env.reply_error(RequestTimeout(f"{env.kind} expired before it could be handled"), self.sender)
            )
        try:
            body = from_plain(kind.body, env.body)
        except InvalidRequest as exc:
            log.warning("dead-lettering malformed %s from %s: %s", env.kind, env.sender, exc.message)
            return Outcome(env.reply_error(exc, self.sender), True)
        handler = self._handlers.get(env.kind)
        if handler is None:
            return Outcome(env.reply_error(Unsupported(f"{env.kind} is not handled here"), self.sender))
        try:
            result = handler(body)
        except VirtfleetError as exc:
            if exc.expected:
                log.info("%s refused: %s: %s", env.kind, type(exc).__name__, exc.message)
            else:
                log.error("%s failed: %s", env.kind, exc.message, exc_info=True)
            return Outcome(env.reply_error(exc, self.sender))
        except Exception as exc:
            log.exception("%s crashed (bug)", env.kind)
            error = InternalError(f"internal error handling {env.kind}: {type(exc).__name__}: {exc}")
            return Outcome(env.reply_error(error, self.sender))
        if kind.result is None:
            return Outcome()
        return Outcome(env.reply_ok(to_plain(result) if result is not None else {}, self.sender))


def request(
    kind: str, body: object, sender: str, *, timeout: float | None = None, now: float | None = None
) -> Envelope:
    """An envelope for ``kind`` whose ``expires_at`` is its timeout from now."""
    entry = lookup(kind)
    if not isinstance(body, entry.body):
        raise TypeError(f"{kind} takes {entry.body.__name__}, not {type(body).__name__}")
    sent = time.time() if now is None else now
    seconds = timeout if timeout is not None else TIMEOUT_SECONDS[entry.timeout]
    return Envelope(
        kind=kind,
        body=to_plain(body),
        sender=sender,
        sent_at=sent,
        expires_at=sent + seconds,
    )


def unwrap(reply: Envelope, result_type: type[T]) -> T:
    """The typed result of a reply, or the rebuilt error raised."""
    if reply.kind != REPLY_KIND:
        raise InvalidRequest(f"expected a reply, got {reply.kind!r}")
    body = reply.body
    if body.get("ok") is True:
        return from_plain(result_type, body.get("result", {}), "result")
    raise error_from_wire(body.get("error"))
