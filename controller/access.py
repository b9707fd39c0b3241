"""Who may call which API operation, and how fast: roles and per-login rate limits.

The caller is the broker login that RabbitMQ authenticated (the AMQP ``user_id`` of the delivery),
never anything the message says about itself. Each login has one role from the controller's
configuration (``[access.roles]``); an operation's descriptor names the least role that may call
it (:class:`~common.messages.descriptor.Role`: reader < operator < admin). A login with no role
may call nothing: a deployed controller is closed until its operator names the logins.

Both checks have the Dispatcher's admission signature ``(delivery, op)``:

* :class:`RoleCheck` raises :class:`~common.errors.PermissionDenied` (CLI exit 6) and is passed
  to the API Dispatcher's ``admit`` hook;
* :class:`RateLimiter` raises :class:`~common.errors.RateLimited` (retryable, CLI exit 7, with
  ``details.retry_after_s``); the Dispatcher's hook answers only Unauthenticated and
  PermissionDenied, so the API's front (:class:`controller.audit.AuditedApi`) runs it before the
  Dispatcher and answers its refusal itself.

:class:`TokenBucket` is the pure rate arithmetic, with the time passed in.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from common.errors import PermissionDenied, RateLimited
from common.messages.descriptor import Op, Role
from common.transport.port import Delivery

#: The roles a person's login can hold, least first; each includes the ones before it.
RANKED: tuple[Role, ...] = (Role.READER, Role.OPERATOR, Role.ADMIN)


def allows(held: Role | None, needed: Role) -> bool:
    """Whether a login holding ``held`` may call an operation that needs ``needed``.

    Only the person roles rank; an operation for the controller or the agents (commands,
    reports) is never allowed through the API, whatever the login holds.
    """
    if held not in RANKED or needed not in RANKED:
        return False
    return RANKED.index(held) >= RANKED.index(needed)


def changes_state(op: Op[Any, Any]) -> bool:
    """Operations above reader change something: they are rate limited apart and audited."""
    return op.role is not Role.READER


class RoleCheck:
    """Admission check: the delivery's broker login must hold the operation's role."""

    def __init__(self, roles: Mapping[str, Role]) -> None:
        self._roles = dict(roles)

    def role_of(self, login: str | None) -> Role | None:
        """The role configured for ``login`` (None: not named, so no rights)."""
        return None if login is None else self._roles.get(login)

    def __call__(self, delivery: Delivery, op: Op[Any, Any]) -> None:
        login = delivery.user_id
        held = self.role_of(login)
        if allows(held, op.role):
            return
        who = "a message without a broker login" if login is None else f"login {login!r}"
        has = f"has role {held.value}" if held is not None else "has no role"
        raise PermissionDenied(
            f"{who} {has}; {op.kind} needs role {op.role.value}",
            details={"login": login, "role": held.value if held else None, "needed": op.role.value},
        )


@dataclass(slots=True)
class TokenBucket:
    """``burst`` tokens, refilled at ``rate`` per second; a call takes one (pure: time passed in)."""

    rate: float
    burst: int
    tokens: float
    updated: float

    @classmethod
    def full(cls, rate: float, burst: int, now: float) -> TokenBucket:
        return cls(rate, burst, float(burst), now)

    def take(self, now: float) -> float:
        """Take a token: 0.0 when there was one, else the seconds until there will be (none taken)."""
        elapsed = max(0.0, now - self.updated)  # a clock that steps back refills nothing
        self.tokens = min(float(self.burst), self.tokens + elapsed * self.rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


@dataclass(frozen=True, slots=True)
class Rate:
    """A limit: ``per_s`` calls per second, ``burst`` at once; ``per_s`` 0 means no limit."""

    per_s: float
    burst: int

    @property
    def unlimited(self) -> bool:
        return self.per_s == 0


class RateLimiter:
    """Admission check: one token bucket per login and lane (state-changing calls, reads).

    Buckets are kept per broker login (bounded by the broker's users); a call without a login is
    limited under the empty name. Thread-safe: API workers call it concurrently.
    """

    def __init__(self, changes: Rate, reads: Rate, clock: Callable[[], float] = time.monotonic) -> None:
        self._rates = {True: changes, False: reads}
        self._clock = clock
        self._buckets: dict[tuple[str, bool], TokenBucket] = {}
        self._lock = threading.Lock()

    def __call__(self, delivery: Delivery, op: Op[Any, Any]) -> None:
        lane = changes_state(op)
        rate = self._rates[lane]
        if rate.unlimited:
            return
        login = delivery.user_id or ""
        with self._lock:
            now = self._clock()
            bucket = self._buckets.get((login, lane))
            if bucket is None:
                bucket = self._buckets[(login, lane)] = TokenBucket.full(rate.per_s, rate.burst, now)
            wait = bucket.take(now)
        if wait > 0:
            retry_after = math.ceil(wait * 1000) / 1000
            what = "state-changing calls" if lane else "reads"
            raise RateLimited(
                f"login {login!r} sent {what} faster than {rate.per_s:g}/s (burst {rate.burst}); "
                f"retry in {retry_after:g} s",
                details={"retry_after_s": retry_after, "login": login, "kind": op.kind},
            )


__all__ = ["RANKED", "Rate", "RateLimiter", "RoleCheck", "TokenBucket", "allows", "changes_state"]
