"""The building blocks of the message catalogue (kept apart so family modules can use them)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class Timeout(StrEnum):
    """Timeout classes: a command's seconds come from its class, not from each call site."""

    FAST = "fast"  # lookups and state flips: 30 s
    NORMAL = "normal"  # domain define/start, disk create: 120 s
    SLOW = "slow"  # shutdown with a guest-side timeout, image conversion: 600 s


TIMEOUT_SECONDS: dict[Timeout, float] = {Timeout.FAST: 30.0, Timeout.NORMAL: 120.0, Timeout.SLOW: 600.0}


class Route(StrEnum):
    AGENT = "agent"  # controller -> agent, reply expected
    API = "api"  # client -> controller, reply expected
    REPORT = "report"  # agent -> controller, no reply


@dataclass(frozen=True, slots=True)
class Kind:
    name: str
    route: Route
    body: type[Any]
    result: type[Any] | None
    timeout: Timeout
    doc: str


def kind(
    name: str, route: Route, body: type[Any], result: type[Any] | None, timeout: Timeout, doc: str
) -> Kind:
    return Kind(name, route, body, result, timeout, doc)
