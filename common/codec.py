"""MessagePack encoding of plain data: the only module that imports msgpack.

Every decode failure, whatever msgpack raised, becomes one :class:`DecodeError`.
"""

from __future__ import annotations

from typing import Any

import msgpack

from common.errors import DecodeError

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
