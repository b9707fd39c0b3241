"""The API's front: rate limit, dispatch, then record the call in the audit log.

:class:`AuditedApi` wraps the API :class:`~common.transport.rpc.Dispatcher` (whose admission hook
runs the role check) and sees each delivery and its outcome. It records, with who (the broker
login), what (the kind), the target (from the body's well-known fields: :func:`audit_target`),
the result (``ok`` or the error type and message), the request id and the time:

* every call that needs more than the reader role (it changes something, or reads a secret or
  the audit log itself), whatever its result;
* every refused call (PermissionDenied, Unauthenticated, RateLimited), reads included.

Successful and failed reads are not recorded. Each recorded call is also one log line.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from common.errors import PermissionDenied, RateLimited, Unauthenticated
from common.messages.catalogue import CATALOGUE
from common.messages.descriptor import Op
from common.transport.port import Delivery, Outcome
from common.transport.rpc import Admission, Dispatcher
from controller.access import changes_state
from controller.db.audit import AuditEntry

log = logging.getLogger("virtfleet.audit")

#: Error types that mean "not done because of who asked, or how often".
REFUSALS = frozenset(cls.__name__ for cls in (PermissionDenied, Unauthenticated, RateLimited))
#: Body fields that name what an operation acts on: the VM, network, bridge, group... and the host.
NAME_FIELDS = ("name", "vm")
HOST_FIELD = "host"
#: The longest target kept (the column's size).
TARGET_MAX = 255


def _text(value: object) -> str | None:
    if isinstance(value, str) and value:
        return value
    if isinstance(value, Mapping):  # a reference such as {"uuid": ..., "name": ...}
        return _text(value.get("name"))
    return None


def audit_target(body: Mapping[str, Any]) -> str | None:
    """What a call acts on, from its body's well-known fields: ``NAME@HOST``, ``NAME`` or ``HOST``.

    The name is the body's ``name`` (or ``vm``), else its ``spec``'s name (a network definition).
    """
    name = next((t for t in (_text(body.get(f)) for f in NAME_FIELDS) if t is not None), None)
    spec = body.get("spec")
    if name is None and isinstance(spec, Mapping):
        name = _text(spec.get("name"))
    host = _text(body.get(HOST_FIELD))
    target = f"{name}@{host}" if name and host else (name or host)
    return None if target is None else target[:TARGET_MAX]


def _result(outcome: Outcome) -> tuple[str, str | None]:
    """``("ok", None)`` or ``(error type, message)`` of an outcome's reply."""
    reply = outcome.reply
    if outcome.requeue:
        return "handed-back", None  # a stopping controller gave it back unanswered
    if reply is None:
        return ("dead-lettered", None) if outcome.dead_letter else ("ok", None)
    if reply.body.get("ok") is True:
        return "ok", None
    error = reply.body.get("error")
    if not isinstance(error, Mapping):
        return "InternalError", None
    message = error.get("message")
    return str(error.get("type", "InternalError")), message if isinstance(message, str) else None


class AuditedApi:
    """A delivery handler: ``limit`` (a rate limit), then ``dispatcher``, then the audit record.

    ``limit`` has the admission signature but runs here, not in the Dispatcher's hook, because
    the hook answers only Unauthenticated and PermissionDenied; its RateLimited is answered here
    (not dead-lettered: the caller may retry after ``retry_after_s``).
    """

    def __init__(
        self,
        dispatcher: Dispatcher,
        record: Callable[[AuditEntry], None],
        *,
        limit: Admission | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._dispatcher = dispatcher
        self._record = record
        self._limit = limit
        self._clock = clock

    def __call__(self, delivery: Delivery) -> Outcome:
        env = delivery.envelope
        op = CATALOGUE.get(env.kind)
        at = self._clock()
        outcome = self._limited(delivery, op) if op is not None else None
        if outcome is None:
            outcome = self._dispatcher(delivery)
        if op is not None:
            self._audit(delivery, op, outcome, at)
        return outcome

    def _limited(self, delivery: Delivery, op: Op[Any, Any]) -> Outcome | None:
        if self._limit is None:
            return None
        try:
            self._limit(delivery, op)
        except RateLimited as exc:
            env = delivery.envelope
            log.warning("refusing %s from login %r: %s", env.kind, delivery.user_id, exc.message)
            return Outcome(env.reply_error(exc, self._dispatcher.sender) if op.replies else None)
        return None

    def _audit(self, delivery: Delivery, op: Op[Any, Any], outcome: Outcome, at: float) -> None:
        result, message = _result(outcome)
        if not changes_state(op) and result not in REFUSALS:
            return
        env = delivery.envelope
        entry = AuditEntry(
            at=at,
            login=delivery.user_id,
            kind=op.kind,
            target=audit_target(env.body),
            result=result,
            message=message,
            request_id=env.id,
        )
        log.info(
            "login=%s kind=%s target=%s result=%s request=%s%s",
            entry.login,
            entry.kind,
            entry.target,
            entry.result,
            entry.request_id,
            f" message={message!r}" if message else "",
        )
        self._record(entry)


__all__ = ["REFUSALS", "AuditedApi", "audit_target"]
