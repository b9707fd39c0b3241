"""The codec: message objects <-> plain data <-> MessagePack bytes.

The only module that imports msgpack. Every decode failure, whatever msgpack raised, becomes one
:class:`DecodeError`; plain data that does not fit a message type becomes :class:`InvalidRequest`
naming the field.
"""

from __future__ import annotations

from typing import Any, TypeVar

import msgpack

from common.errors import DecodeError
from common.schema import from_plain, to_plain

T = TypeVar("T")

#: Refuse absurd messages before allocating for them (16 MiB is far above any real command).
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


def encode(data: Any) -> bytes:
    """Encode plain data (dict, list, str, int, float, bool, None, bytes) to MessagePack."""
    try:
        out = msgpack.packb(data, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise DecodeError(f"cannot encode message: {exc}") from exc
    assert isinstance(out, bytes)
    return out


def decode(raw: bytes) -> Any:
    """Decode MessagePack bytes to plain data; raise DecodeError on any failure."""
    if len(raw) > MAX_MESSAGE_BYTES:
        raise DecodeError(f"message of {len(raw)} bytes exceeds the {MAX_MESSAGE_BYTES} byte limit")
    try:
        return msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises many unrelated types on garbage
        raise DecodeError(f"not valid MessagePack: {type(exc).__name__}: {exc}") from exc


def to_wire(message: Any) -> Any:
    """A message object (recursively) as the plain data the wire carries."""
    return to_plain(message)


def from_wire(cls: type[T], data: object, path: str = "body") -> T:
    """Rebuild a message of type ``cls`` from plain data; InvalidRequest naming the field on a mismatch.

    Unknown fields are ignored (a newer peer may send more), missing ones take their defaults
    (an older peer may send less).
    """
    return from_plain(cls, data, path)
