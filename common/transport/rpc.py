"""Typed request/reply on top of the transport: handler tables, dispatching, building requests.

A :class:`HandlerTable` maps operation descriptors to handler functions; registering a handler
whose body or result type does not match the descriptor is a mypy error, and registering an
operation the other side serves is refused at start. :class:`Dispatcher` turns a
:class:`~common.transport.port.Delivery` into an :class:`~common.transport.port.Outcome`: it
looks the kind up, refuses expired requests, decodes the body into its type, runs the handler
and wraps the result or error as a reply (a handler that raises
:class:`~common.transport.port.Interrupted` -- its process is stopping -- hands the delivery
back to its queue, unanswered). Malformed messages (unknown kind, body that does not
fit its type) are answered with an error *and* dead-lettered.

The journal seam: an optional journal makes a redelivered request be answered instead of
executed twice. A :class:`Journal` (the agent's) records each reply by message id and is asked
before anything else. A :class:`RequestJournal` (the controller's API journal) is asked once the
body is decoded, and decides per request: :class:`Replay` a recorded reply, or :class:`Proceed`
(run the operation's handler, or the one it names, with the body it gives: a redelivery whose
first run died is answered by a handler that finds out what that run did), and is told the
outcome afterwards (:meth:`RequestJournal.finish`).

Admission (the trust model: nothing on the bus is trusted for what it says about itself): each
:data:`Admission` check runs on a delivery of a known kind before the journal and the handler.
A check raises :class:`~common.errors.Unauthenticated` (the sender is not proven: wrong broker
login, bad signature, expired, replayed) -- the message is dead-lettered and answered with the
error when it expects a reply -- or :class:`~common.errors.PermissionDenied` (a proven caller
whose role does not allow it) -- answered, not dead-lettered. Refusals are counted per error
type in :attr:`Dispatcher.refused`.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, runtime_checkable

from common import codec
from common.errors import (
    InternalError,
    InvalidRequest,
    PermissionDenied,
    Replayed,
    RequestTimeout,
    Unauthenticated,
    Unsupported,
    VirtfleetError,
    error_from_wire,
)
from common.messages.catalogue import CATALOGUE, timeout_of
from common.messages.descriptor import Op, Side
from common.messages.envelope import REPLY_KIND, Envelope, decode_envelope
from common.transport.port import Delivery, Interrupted, Outcome

log = logging.getLogger(__name__)

B = TypeVar("B")
R = TypeVar("R")


#: A check of who sent a delivery of operation ``op``; raises Unauthenticated or PermissionDenied.
Admission = Callable[[Delivery, Op[Any, Any]], None]


class Journal(Protocol):
    """Where replies are remembered by request id (the agent's exactly-once store)."""

    def get(self, message_id: str) -> bytes | None: ...

    def put(self, message_id: str, kind: str, reply: bytes) -> None: ...


@dataclass(frozen=True, slots=True)
class Replay:
    """A :class:`RequestJournal`'s answer: reply with this; the handler does not run."""

    reply: Envelope


@dataclass(frozen=True, slots=True)
class Proceed:
    """A :class:`RequestJournal`'s answer: run ``handler`` (None: the operation's) on ``body``.

    ``record``: the journal recorded the request as started and wants :meth:`RequestJournal.finish`
    called with the outcome.
    """

    body: Any
    handler: Callable[[Any], Any] | None = None
    record: bool = False


@runtime_checkable
class RequestJournal(Protocol):
    """A journal that records a request as started before its handler runs and done after
    (the controller's API journal: controller.request_journal)."""

    def begin(self, delivery: Delivery, op: Op[Any, Any], body: Any) -> Replay | Proceed:
        """What to do with a decoded, unexpired request; raises a VirtfleetError to refuse it."""
        ...

    def finish(self, delivery: Delivery, op: Op[Any, Any], outcome: Outcome) -> None:
        """The outcome of a request that :meth:`begin` answered with ``Proceed(record=True)``."""
        ...


class HandlerTable:
    """The handlers of one side (agent or controller), one per operation descriptor."""

    def __init__(self, side: Side) -> None:
        self.side = side
        self._entries: dict[str, tuple[Op[Any, Any], Callable[[Any], Any]]] = {}

    def register(self, op: Op[B, R], handler: Callable[[B], R]) -> None:
        """Serve ``op`` with ``handler``; ValueError when it is served elsewhere or twice."""
        if op.served_by is not self.side:
            raise ValueError(f"{op.kind} is served by the {op.served_by.value}, not the {self.side.value}")
        if CATALOGUE.get(op.kind) is not op:
            raise ValueError(f"{op.kind} is not the catalogue's descriptor")
        if op.kind in self._entries:
            raise ValueError(f"{op.kind} is handled twice")
        self._entries[op.kind] = (op, handler)

    def update(self, other: HandlerTable) -> None:
        """Add every handler of ``other`` (a feature area's table)."""
        for op, handler in other._entries.values():
            self.register(op, handler)

    def handler(self, op: Op[B, R]) -> Callable[[B], R]:
        """The handler of ``op`` (KeyError when it is not handled here), typed by the descriptor."""
        registered, handler = self._entries[op.kind]
        if registered is not op:
            raise KeyError(op.kind)
        return handler

    def get(self, kind: str) -> tuple[Op[Any, Any], Callable[[Any], Any]] | None:
        """The descriptor and handler of ``kind``, or None when it is not handled here."""
        return self._entries.get(kind)

    def ops(self) -> Iterator[Op[Any, Any]]:
        """The operations handled, in registration order."""
        return (op for op, _fn in self._entries.values())

    def __contains__(self, op: object) -> bool:
        return isinstance(op, Op) and self._entries.get(op.kind, (None,))[0] is op

    def __len__(self) -> int:
        return len(self._entries)


class Dispatcher:
    """Routes decoded requests to typed handler functions and builds replies."""

    def __init__(
        self,
        sender: str,
        table: HandlerTable,
        *,
        journal: Journal | RequestJournal | None = None,
        clock: Callable[[], float] = time.time,
        admit: Sequence[Admission] = (),
    ) -> None:
        self.sender = sender
        self._table = table
        #: the agent's kind of journal (asked first), or the controller's (asked after decoding)
        self._journal: Journal | None = None
        self._requests: RequestJournal | None = None
        if isinstance(journal, RequestJournal):
            self._requests = journal
        else:
            self._journal = journal
        self._clock = clock
        self._admit = tuple(admit)
        #: deliveries refused by an admission check, by error type name
        self.refused: Counter[str] = Counter()

    def __call__(self, delivery: Delivery) -> Outcome:
        env = delivery.envelope
        op = CATALOGUE.get(env.kind)
        if op is not None and self._admit:
            refusal = self._admission(delivery, op)
            if refusal is not None:
                return refusal
        if self._journal is not None:
            recorded = self._journal.get(env.id)
            if recorded is not None:
                log.info("answering redelivered %s %s from the journal", env.kind, env.id)
                return Outcome(reply=decode_envelope(recorded))
        outcome = self._handle(delivery)
        if self._journal is not None and outcome.reply is not None and not outcome.dead_letter:
            self._journal.put(env.id, env.kind, outcome.reply.encode())
        return outcome

    def _admission(self, delivery: Delivery, op: Op[Any, Any]) -> Outcome | None:
        """None when every check admits the delivery, else the refusal's outcome."""
        env = delivery.envelope
        try:
            for check in self._admit:
                check(delivery, op)
        except (Unauthenticated, PermissionDenied) as exc:
            self.refused[type(exc).__name__] += 1
            unproven = isinstance(exc, Unauthenticated)
            log.warning(
                "%s %s from login %r (sender %r): %s",
                "dead-lettering" if unproven else "refusing",
                env.kind,
                delivery.user_id,
                env.sender,
                exc.message,
            )
            # A replayed or re-published copy is not answered: its requester (if it is one)
            # waits for the answer of the copy that runs, which a refusal would overtake.
            answers = op.replies and not isinstance(exc, Replayed)
            reply = env.reply_error(exc, self.sender) if answers else None
            return Outcome(reply, dead_letter=unproven)
        return None

    def _handle(self, delivery: Delivery) -> Outcome:
        env = delivery.envelope
        op = CATALOGUE.get(env.kind)
        if op is None:
            log.warning("dead-lettering message of unknown kind %r from %s", env.kind, env.sender)
            return Outcome(
                env.reply_error(InvalidRequest(f"unknown message kind {env.kind!r}"), self.sender), True
            )
        if env.expired(self._clock()):
            if not op.replies:
                log.debug("skipping expired %s from %s", env.kind, env.sender)
                return Outcome()
            return Outcome(
                env.reply_error(RequestTimeout(f"{env.kind} expired before it could be handled"), self.sender)
            )
        try:
            body = codec.from_wire(op.body, env.body, "body")
        except InvalidRequest as exc:
            log.warning("dead-lettering malformed %s from %s: %s", env.kind, env.sender, exc.message)
            return Outcome(env.reply_error(exc, self.sender), True)
        entry = self._table.get(env.kind)
        if entry is None:
            return Outcome(env.reply_error(Unsupported(f"{env.kind} is not handled here"), self.sender))
        _op, handler = entry
        if self._requests is None:
            return self._run(env, op, handler, body)
        try:
            step = self._requests.begin(delivery, op, body)
        except VirtfleetError as exc:
            log.info("%s %s refused by the request journal: %s", env.kind, env.id, exc.message)
            return Outcome(env.reply_error(exc, self.sender))
        if isinstance(step, Replay):
            log.info("answering redelivered %s %s from the request journal", env.kind, env.id)
            return Outcome(reply=step.reply)
        outcome = self._run(env, op, step.handler or handler, step.body)
        if step.record:
            try:
                self._requests.finish(delivery, op, outcome)
            except VirtfleetError as exc:
                # The answer stands; only its record is missing (a redelivery then finds the
                # request started and answers it as a request whose first run died).
                log.warning("could not record the answer to %s %s: %s", env.kind, env.id, exc.message)
        return outcome

    def _run(self, env: Envelope, op: Op[Any, Any], handler: Callable[[Any], Any], body: Any) -> Outcome:
        """Run ``handler`` on ``body`` and wrap its result or error as the reply."""
        try:
            result = handler(body)
        except Interrupted as exc:
            # This process is stopping: the request goes back to its queue, unanswered, for the
            # next process (nothing is journalled: it was not answered).
            log.info("handing %s %s back to its queue: %s", env.kind, env.id, exc.message)
            return Outcome(requeue=True)
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
        if not op.replies:
            return Outcome()
        return Outcome(env.reply_ok(codec.to_wire(result) if result is not None else {}, self.sender))


def request(
    op: Op[B, Any],
    body: B,
    sender: str,
    *,
    timeout: float | None = None,
    now: float | None = None,
    idempotency_key: str | None = None,
) -> Envelope:
    """An envelope for ``op`` whose ``expires_at`` is its timeout from now (``idempotency_key``:
    the caller's key, which a controller's request journal answers a retry by)."""
    if not isinstance(body, op.body):
        raise TypeError(f"{op.kind} takes {op.body.__name__}, not {type(body).__name__}")
    sent = time.time() if now is None else now
    seconds = timeout if timeout is not None else timeout_of(op)
    return Envelope(
        kind=op.kind,
        body=codec.to_wire(body),
        sender=sender,
        sent_at=sent,
        expires_at=sent + seconds,
        idempotency_key=idempotency_key,
    )


def unwrap(reply: Envelope, op: Op[Any, R]) -> R:
    """The typed result of a reply to ``op``, or the error it carries raised."""
    if reply.kind != REPLY_KIND:
        raise InvalidRequest(f"expected a reply, got {reply.kind!r}")
    body = reply.body
    if body.get("ok") is True:
        return codec.from_wire(op.result, body.get("result", {}), "result")
    raise error_from_wire(body.get("error"))


__all__ = [
    "Admission",
    "Dispatcher",
    "HandlerTable",
    "Journal",
    "Proceed",
    "Replay",
    "RequestJournal",
    "request",
    "unwrap",
]
