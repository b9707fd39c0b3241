"""The base of every message body and result: a frozen msgspec Struct.

msgspec converts and validates message objects in C (``msgspec.convert`` / ``to_builtins``,
used only by :mod:`common.codec`); MessagePack bytes stay the wire format. A message's
``__post_init__`` checks what types cannot say (names, ranges, cross-field rules) and runs both
when a message is built in code and when one is decoded; it may normalise a field with
:func:`force_setattr` (frozen structs refuse plain assignment).
"""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec
from msgspec.structs import force_setattr

from common.messages.limits import Int64

M = TypeVar("M", bound="Message")


class Message(msgspec.Struct, frozen=True):
    """A message body or result (immutable, hashable, compared by value)."""


def replace(message: M, **changes: Any) -> M:
    """A copy of ``message`` with ``changes`` (validated again by its ``__post_init__``)."""
    return msgspec.structs.replace(message, **changes)


__all__ = ["Int64", "Message", "force_setattr", "replace"]
