"""Audit family: the record of what each broker login asked the controller to change.

Every state-changing API call (role operator or admin), and every refused call, is recorded by
the controller with who (the broker login), what (the kind), its target, its result and its
request id (see docs/security.md, "Audit"); ``api.audit.list`` reads the record back.
"""

from __future__ import annotations

import math

from common.errors import InvalidRequest
from common.messages.api import API
from common.messages.base import Message
from common.messages.descriptor import Role, Timeout, Version, api_call
from common.messages.limits import Count, Token

#: The most entries one ``api.audit.list`` answers with.
MAX_AUDIT_LIMIT = 10_000


class AuditListRequest(Message, frozen=True):
    """Filters, all optional: the login, entries at or after ``since`` (Unix seconds), the kind;
    the newest ``limit`` entries first."""

    user: Token | None = None
    since: float | None = None
    kind: Token | None = None
    limit: Count = 100

    def __post_init__(self) -> None:
        if not 1 <= self.limit <= MAX_AUDIT_LIMIT:
            raise InvalidRequest(f"limit must be between 1 and {MAX_AUDIT_LIMIT}, got {self.limit}")
        if self.since is not None and not math.isfinite(self.since):
            raise InvalidRequest("since must be a time")


class AuditEntryView(Message, frozen=True):
    """One recorded call. ``result`` is ``ok`` or the error type; ``message`` the error's text."""

    at: float
    login: str | None
    kind: str
    target: str | None
    result: str
    message: str | None
    request_id: str


class AuditList(Message, frozen=True):
    entries: tuple[AuditEntryView, ...] = ()


API_AUDIT_LIST = api_call(
    API,
    "api.audit.list",
    AuditListRequest,
    AuditList,
    Timeout.FAST,
    "virtfleet audit list",
    role=Role.ADMIN,
    idempotent=True,
    read_only=True,
    since=Version(1, 1),
)
