"""Typed operation descriptors: the one declaration of every message kind virtfleet sends.

An operation is declared once, next to its body and result types, as one of three kinds of
descriptor; every layer binds to the descriptor object, never to the kind string:

* :class:`Command`: controller -> agent, with a reply (``virtfleet.commands``, key = host id).
* :class:`ApiCall`: client -> controller, with a reply (the ``virtfleet.api`` queue).
* :class:`Report`: agent -> controller, no reply (the ``virtfleet.reports`` exchange).

The descriptor is generic in its body and result types, so registering a handler or calling an
operation with the wrong body or result type is a mypy error (``AgentClient.call(host,
vm.START, VmAction(...))`` type-checks, ``call(host, vm.START, DeleteVm(...))`` does not).

Versioning (oslo.messaging's model): each :class:`Family` has a ``major.minor`` version; an
operation names the minor that introduced it (``since``) and a body names the minor that added
each newer field (``__since__``). A sender capped at an older version (``[rpc] version_cap``, or
the version an agent reports) refuses, before sending, an operation or a field value the peer
cannot understand (:func:`check_sendable`), instead of letting the peer silently ignore it.
A message type that gained fields declares ``__since__: ClassVar[Mapping[str, Version]]``
(field name -> the family version that added it); fields not named are as old as the family.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar, Generic, TypeVar, final

from common.errors import InvalidRequest, Unsupported

B = TypeVar("B")
R = TypeVar("R")


class Timeout(StrEnum):
    """Timeout classes: a command's seconds come from its class, not from each call site."""

    FAST = "fast"  # lookups and state flips
    NORMAL = "normal"  # domain define/start, disk create
    SLOW = "slow"  # shutdown with a guest-side timeout, image conversion


#: Seconds a caller waits for the reply of each timeout class.
TIMEOUT_SECONDS: Mapping[Timeout, float] = {Timeout.FAST: 30.0, Timeout.NORMAL: 120.0, Timeout.SLOW: 600.0}


class Side(StrEnum):
    """Which process serves an operation."""

    AGENT = "agent"
    CONTROLLER = "controller"


class Route(StrEnum):
    """How an operation travels (derived from the descriptor's class)."""

    COMMAND = "command"  # controller -> agent, reply expected
    API = "api"  # client -> controller, reply expected
    REPORT = "report"  # agent -> controller, no reply


class Role(StrEnum):
    """Who may call an operation (issue: roles and audit). Ordered: each role includes the ones before."""

    READER = "reader"  # read-only API calls
    OPERATOR = "operator"  # VM lifecycle and VM changes
    ADMIN = "admin"  # hosts, networks, tuning, fleet settings
    CONTROLLER = "controller"  # agent commands: only the controller sends them
    AGENT = "agent"  # reports: only the host the broker authenticated


@dataclass(frozen=True, slots=True, order=True)
class Version:
    """``major.minor``; a receiver understands the same major at a lower or equal minor."""

    major: int
    minor: int

    @classmethod
    def parse(cls, text: str) -> Version:
        """``"1.2"`` -> Version(1, 2); InvalidRequest for anything else."""
        major, sep, minor = text.strip().partition(".")
        if not sep or not (major.isascii() and major.isdigit() and minor.isascii() and minor.isdigit()):
            raise InvalidRequest(f"bad version {text!r}: expected MAJOR.MINOR such as 1.0")
        return cls(int(major), int(minor))

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}"


@dataclass(frozen=True, slots=True)
class Family:
    """A group of operations versioned together (``vm``, ``net``, ``api``...)."""

    name: str
    version: Version
    doc: str = ""


@dataclass(frozen=True, slots=True, eq=False)
class Op(Generic[B, R]):
    """One operation: its kind, body and result types, and how it is served and called.

    Descriptors compare by identity (there is exactly one per kind).
    """

    kind: str
    body: type[B]
    result: type[R]
    family: Family
    timeout: Timeout
    doc: str
    role: Role
    #: safe to run twice (a redelivery or a client retry changes nothing more)
    idempotent: bool = False
    #: the family minor version that introduced the operation
    since: Version | None = None
    #: changes nothing (a query): the controller's request journal skips it, at no cost, and
    #: never stores its answer (a console or a secure export carries secrets)
    read_only: bool = False

    route: ClassVar[Route]
    served_by: ClassVar[Side]

    @property
    def introduced(self) -> Version:
        """The family version that introduced this operation."""
        return self.since or Version(self.family.version.major, 0)

    @property
    def changes(self) -> bool:
        """Whether a call may change state: what the controller's request journal records (a
        reader's call, or one declared ``read_only``, cannot)."""
        return not self.read_only and self.role is not Role.READER

    @property
    def replies(self) -> bool:
        """Whether the caller waits for a reply."""
        return self.route is not Route.REPORT

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.kind!r})"


@final
@dataclass(frozen=True, slots=True, eq=False, repr=False)
class Command(Op[B, R]):
    """Controller -> agent, on ``virtfleet.commands`` with the host id as routing key."""

    route: ClassVar[Route] = Route.COMMAND
    served_by: ClassVar[Side] = Side.AGENT
    role: Role = Role.CONTROLLER


class Forward:
    """How the controller serves an API call by forwarding it to an agent (see :class:`ApiCall`).

    The controller has one generic path per kind of forward, so such an operation needs no
    controller code of its own.
    """

    __slots__ = ()


@final
@dataclass(frozen=True, slots=True, eq=False, repr=False)
class ApiCall(Op[B, R]):
    """Client (the CLI) -> controller, on the ``virtfleet.api`` queue.

    ``forward`` set: the controller serves it generically by sending an agent command.
    """

    route: ClassVar[Route] = Route.API
    served_by: ClassVar[Side] = Side.CONTROLLER
    forward: Forward | None = None


@final
@dataclass(frozen=True, slots=True)
class ToHostAgent(Forward, Generic[B, R]):
    """Served by sending the body unchanged to the agent of the host the body names (``body.host``)."""

    command: Command[B, R]


@final
@dataclass(frozen=True, slots=True, eq=False, repr=False)
class Report(Op[B, None]):
    """Agent -> controller, published on ``virtfleet.reports`` with key ``<kind>.<host id>``; no reply."""

    route: ClassVar[Route] = Route.REPORT
    served_by: ClassVar[Side] = Side.CONTROLLER
    role: Role = Role.AGENT


def command(
    family: Family,
    kind: str,
    body: type[B],
    result: type[R],
    timeout: Timeout,
    doc: str,
    *,
    idempotent: bool = False,
    since: Version | None = None,
) -> Command[B, R]:
    """Declare a controller -> agent command."""
    return Command(kind, body, result, family, timeout, doc, Role.CONTROLLER, idempotent, since)


def api_call(
    family: Family,
    kind: str,
    body: type[B],
    result: type[R],
    timeout: Timeout,
    doc: str,
    *,
    role: Role,
    idempotent: bool = False,
    since: Version | None = None,
    read_only: bool = False,
) -> ApiCall[B, R]:
    """Declare a client -> controller call; ``role`` is the least role allowed to make it,
    ``read_only`` says it changes nothing (see :attr:`Op.read_only`)."""
    if role in (Role.CONTROLLER, Role.AGENT):
        raise ValueError(f"{kind}: API calls are made by people: reader, operator or admin")
    if read_only and not idempotent:
        raise ValueError(f"{kind}: a call that changes nothing is idempotent")
    return ApiCall(kind, body, result, family, timeout, doc, role, idempotent, since, read_only)


def query(
    family: Family, kind: str, body: type[B], result: type[R], doc: str, *, timeout: Timeout = Timeout.FAST
) -> ApiCall[B, R]:
    """Declare a client -> controller call that only reads: any reader may make it, and it is
    idempotent (asking twice changes nothing)."""
    return api_call(
        family, kind, body, result, timeout, doc, role=Role.READER, idempotent=True, read_only=True
    )


#: An API call waits one timeout class longer than the command it wraps, so that the
#: controller's own wait for the agent ends first and its answer reaches the client.
LONGER: Mapping[Timeout, Timeout] = {
    Timeout.FAST: Timeout.NORMAL,
    Timeout.NORMAL: Timeout.SLOW,
    Timeout.SLOW: Timeout.SLOW,
}


def host_twin(cmd: Command[B, R], *, role: Role, doc: str = "") -> ApiCall[B, R]:
    """The API call ``api.<kind>`` that the controller serves by forwarding ``cmd`` to ``body.host``.

    A twin belongs to its command's family and is as old as it: one version says what both sides
    of the operation understand.
    """
    return ApiCall(
        f"api.{cmd.kind}",
        cmd.body,
        cmd.result,
        cmd.family,
        LONGER[cmd.timeout],
        doc or f"virtfleet: {cmd.doc}",
        role,
        cmd.idempotent,
        cmd.since,
        forward=ToHostAgent(cmd),
    )


def report(family: Family, kind: str, body: type[B], doc: str, *, since: Version | None = None) -> Report[B]:
    """Declare an agent -> controller report (no reply; always idempotent: the newest wins)."""
    return Report(kind, body, type(None), family, Timeout.FAST, doc, Role.AGENT, True, since)


def check_sendable(op: Op[Any, Any], body: object, cap: Version | None, peer: str) -> None:
    """Refuse to send ``op`` with ``body`` to a peer that understands only ``cap`` of its family.

    The operation must be no newer than the cap, and every field newer than the cap must hold
    its default (an older peer would silently ignore it). ``None`` means no cap.
    """
    if cap is None:
        return
    family = op.family
    if cap.major != family.version.major:
        raise Unsupported(
            f"{peer} speaks {family.name} {cap}, this side {family.name} {family.version}: "
            "no common major version"
        )
    if op.introduced > cap:
        raise Unsupported(
            f"{peer} speaks {family.name} {cap}; {op.kind} needs {family.name} {op.introduced}: "
            "upgrade its agent first"
        )
    since: Mapping[str, Version] = getattr(type(body), "__since__", {})
    for name, added in since.items():
        if added <= cap:
            continue
        defaults = _defaults(type(body))
        if name in defaults and getattr(body, name) != defaults[name]:
            raise Unsupported(
                f"{peer} speaks {family.name} {cap}; field {name!r} of {op.kind} needs "
                f"{family.name} {added}: upgrade its agent first, or leave {name} at its default"
            )


def _defaults(cls: type) -> dict[str, Any]:
    """Field name -> default value of a message type (fields without a default are left out)."""
    import msgspec  # noqa: PLC0415 - only needed on the rare capped path

    out: dict[str, Any] = {}
    for info in msgspec.structs.fields(cls):
        if info.default is not msgspec.NODEFAULT:
            out[info.name] = info.default
        elif info.default_factory is not msgspec.NODEFAULT:
            out[info.name] = info.default_factory()
    return out


__all__ = [
    "LONGER",
    "TIMEOUT_SECONDS",
    "ApiCall",
    "Command",
    "Family",
    "Forward",
    "Op",
    "Report",
    "Role",
    "Route",
    "Side",
    "Timeout",
    "ToHostAgent",
    "Version",
    "api_call",
    "check_sendable",
    "command",
    "host_twin",
    "query",
    "report",
]
