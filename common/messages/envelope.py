"""The versioned envelope every virtfleet message travels in.

On the wire an envelope is a MessagePack map::

    {"v": "1.0", "kind": "<kind>", "id": "<uuid hex>", "correlation_id": null,
     "sender": "controller:node1:4242", "sent_at": 1764111111.5, "expires_at": 1764111141.5,
     "body": {...}, "key_id": "hv1:2", "sig": b"<32 bytes>"}

``idem`` (optional, API requests only) is the caller's idempotency key: a retry of a call with a
new ``id`` and the same key is answered with the first call's answer instead of running again
(at most :data:`~common.messages.limits.MAX_KEY_CHARS` characters, or the controller answers
``InvalidRequest``; docs/operations.md, "Request journal"). A peer that does not know the field
ignores it.

``key_id`` and ``sig`` (protocol 1.1) are present only on signed messages: ``sig`` is the
HMAC-SHA256 of the canonical bytes of every other field under the key ``key_id`` names
(:mod:`common.signing`; docs/security.md, "Message signatures").

A reply has ``kind == "reply"``, ``correlation_id`` equal to the request's ``id`` and a body
``{"ok": true, "result": {...}}`` or ``{"ok": false, "error": {"type", "message",
"retryable", "details"}}``. See docs/protocol.md.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

from common import codec
from common.errors import DecodeError, UnsupportedVersion, VirtfleetError

PROTOCOL_MAJOR = 1
PROTOCOL_MINOR = 1
PROTOCOL_VERSION = f"{PROTOCOL_MAJOR}.{PROTOCOL_MINOR}"
REPLY_KIND = "reply"


def new_id() -> str:
    """A fresh message id."""
    return uuid.uuid4().hex


@dataclass(frozen=True, slots=True)
class Envelope:
    """One message: routing metadata plus a plain-data body."""

    kind: str
    body: dict[str, Any]
    sender: str
    id: str = field(default_factory=new_id)
    correlation_id: str | None = None
    sent_at: float = field(default_factory=time.time)
    expires_at: float | None = None
    version: str = PROTOCOL_VERSION
    #: which key signed it (``<host id>:<generation>``; :mod:`common.signing`), None when unsigned
    key_id: str | None = None
    #: HMAC-SHA256 over :func:`common.signing.canonical_bytes`, None when unsigned
    signature: bytes | None = None
    #: the caller's idempotency key (API requests), None when the caller gave none
    idempotency_key: str | None = None

    def expired(self, now: float) -> bool:
        """True when the sender said the message is worthless after ``expires_at``."""
        return self.expires_at is not None and now > self.expires_at

    def to_wire(self) -> dict[str, Any]:
        """The envelope as the plain map that goes through the codec (signature fields only when set)."""
        wire: dict[str, Any] = {
            "v": self.version,
            "kind": self.kind,
            "id": self.id,
            "correlation_id": self.correlation_id,
            "sender": self.sender,
            "sent_at": self.sent_at,
            "expires_at": self.expires_at,
            "body": self.body,
        }
        if self.key_id is not None:
            wire["key_id"] = self.key_id
        if self.signature is not None:
            wire["sig"] = self.signature
        if self.idempotency_key is not None:
            wire["idem"] = self.idempotency_key
        return wire

    def encode(self) -> bytes:
        """MessagePack bytes of this envelope."""
        return codec.encode(self.to_wire())

    def reply_ok(self, result: dict[str, Any], sender: str) -> Envelope:
        """The success reply to this request."""
        return Envelope(
            kind=REPLY_KIND, body={"ok": True, "result": result}, sender=sender, correlation_id=self.id
        )

    def reply_error(self, error: VirtfleetError, sender: str) -> Envelope:
        """The error reply to this request."""
        return Envelope(
            kind=REPLY_KIND,
            body={"ok": False, "error": error.to_wire()},
            sender=sender,
            correlation_id=self.id,
        )

    def with_body(self, body: dict[str, Any]) -> Envelope:
        """A copy with another body (same id, no signature: it covered the old body)."""
        return replace(self, body=body, key_id=None, signature=None)


def parse_version(text: str) -> tuple[int, int]:
    """Split "major.minor"; DecodeError when it is not that."""
    major, sep, minor = text.partition(".")
    if not sep or not (major.isascii() and major.isdigit() and minor.isascii() and minor.isdigit()):
        raise DecodeError(f"bad protocol version {text!r}")
    return int(major), int(minor)


def _optional_fields(data: dict[str, Any]) -> tuple[str | None, bytes | None, str | None]:
    """``key_id``, ``sig`` and ``idem``, checked (None when absent)."""
    key_id, signature, idem = data.get("key_id"), data.get("sig"), data.get("idem")
    if key_id is not None and (not isinstance(key_id, str) or not key_id):
        raise DecodeError("envelope field 'key_id' must be a non-empty string or absent")
    if signature is not None and not isinstance(signature, bytes):
        raise DecodeError("envelope field 'sig' must be bytes (MessagePack bin) or absent")
    # Its length is the receiver's to refuse with an answer (InvalidRequest), not a malformed envelope.
    if idem is not None and (not isinstance(idem, str) or not idem):
        raise DecodeError("envelope field 'idem' must be a non-empty string or absent")
    return key_id, signature, idem


def decode_envelope(raw: bytes) -> Envelope:
    """Decode and validate an envelope; DecodeError or UnsupportedVersion if it is not one of ours.

    A newer minor version is accepted (unknown fields are ignored); another major is not.
    """
    data = codec.decode(raw)
    if not isinstance(data, dict):
        raise DecodeError(f"envelope must be a map, got {type(data).__name__}")
    version = data.get("v")
    if not isinstance(version, str):
        raise DecodeError("envelope has no protocol version 'v'")
    major, _minor = parse_version(version)
    if major != PROTOCOL_MAJOR:
        raise UnsupportedVersion(f"protocol {version} is not supported (this side speaks {PROTOCOL_VERSION})")
    kind, msg_id, sender, body = data.get("kind"), data.get("id"), data.get("sender"), data.get("body")
    corr, sent_at, expires_at = data.get("correlation_id"), data.get("sent_at"), data.get("expires_at")
    if not isinstance(kind, str) or not kind:
        raise DecodeError("envelope field 'kind' must be a non-empty string")
    if not isinstance(msg_id, str) or not msg_id:
        raise DecodeError("envelope field 'id' must be a non-empty string")
    if not isinstance(sender, str):
        raise DecodeError("envelope field 'sender' must be a string")
    if not isinstance(body, dict):
        raise DecodeError("envelope field 'body' must be a map")
    if corr is not None and not isinstance(corr, str):
        raise DecodeError("envelope field 'correlation_id' must be a string or null")
    if isinstance(sent_at, bool) or not isinstance(sent_at, int | float):
        raise DecodeError("envelope field 'sent_at' must be a number")
    if expires_at is not None and (isinstance(expires_at, bool) or not isinstance(expires_at, int | float)):
        raise DecodeError("envelope field 'expires_at' must be a number or null")
    key_id, signature, idem = _optional_fields(data)
    return Envelope(
        kind=kind,
        body=body,
        sender=sender,
        id=msg_id,
        correlation_id=corr,
        sent_at=float(sent_at),
        expires_at=None if expires_at is None else float(expires_at),
        version=version,
        key_id=key_id,
        signature=signature,
        idempotency_key=idem,
    )
