"""The codec: message objects <-> plain data <-> MessagePack bytes.

The only module that imports msgpack. Every decode failure, whatever msgpack raised, becomes one
:class:`DecodeError`; plain data that does not fit a message type becomes :class:`InvalidRequest`
naming the field.
"""

from __future__ import annotations

import enum
import re
import types
import typing
from typing import Any, TypeVar

import msgpack
import msgspec

from common.errors import DecodeError, InvalidRequest
from common.messages.limits import NO_NUL

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


#: Types msgpack carries natively, so ``to_wire`` leaves them as they are (bytes stay bin, not base64).
_NATIVE = (bytes, bytearray)


def to_wire(message: Any) -> Any:
    """A message object (recursively) as the plain data the wire carries: a map per message
    (every field, in declaration order), enums as their values, tuples as lists."""
    return msgspec.to_builtins(message, builtin_types=_NATIVE)


def from_wire(cls: type[T], data: object, path: str = "body") -> T:
    """Rebuild a message of type ``cls`` from plain data; InvalidRequest naming the field on a mismatch.

    Unknown fields are ignored (a newer peer may send more), missing ones take their defaults
    (an older peer may send less). Types are strict: no string for a number, no 0/1 for a bool,
    no float for an int (an int is accepted for a float).
    """
    try:
        return msgspec.convert(data, cls)
    except msgspec.ValidationError as exc:
        cause = exc.__cause__
        if isinstance(cause, InvalidRequest):  # a message's own __post_init__ check, at some depth
            where = _located(str(exc), path, cls).partition(": ")[0]
            raise InvalidRequest(f"{where}: {cause.message}", details=cause.details) from None
        if (bound := _out_of_bounds(str(exc), path, data)) is not None:
            message, details = bound
            raise InvalidRequest(message, details=details) from None
        raise InvalidRequest(_located(str(exc), path, cls)) from None


#: msgspec's names of wire types -> the words error messages use (what was expected / what came).
_EXPECTED_WORDS = {
    "object": "a map",
    "array": "a list",
    "str": "a string",
    "int": "an integer",
    "float": "a number",
    "bool": "true/false",
    "null": "null",
    "bytes": "bytes",
}
_GOT_WORDS = {**_EXPECTED_WORDS, "bool": "a boolean"}
_EXPECTED = re.compile(r"Expected `([^`]+)`, got `([^`]+)`")
_MISSING = re.compile(r"Object missing required field `([^`]+)`")
_BAD_ENUM = re.compile(r"Invalid enum value (.+)")
_LENGTH = re.compile(r"Expected `array` of length (\d+), got (\d+)")
_STEP = re.compile(r"\.(\w+)|\[(\d+)\]|\[([^\]]+)\]")
#: msgspec's words for a value outside a ``Meta`` bound: ``Expected `int` <= 4096``.
_BOUND = re.compile(r"Expected `(int|float)` (<=|>=|<|>) (\S+)")
_LENGTH_BOUND = re.compile(r"Expected `(str|array|object|bytes)` of length (<=|>=) (\d+)")
_BOUND_WORDS = {"<=": "at most", ">=": "at least", "<": "below", ">": "above"}
_LENGTH_UNITS = {"str": "characters", "array": "items", "object": "entries", "bytes": "bytes"}


def _out_of_bounds(message: str, path: str, data: object) -> tuple[str, dict[str, Any]] | None:
    """msgspec's ``Expected `int` <= 4096 - at `$.spec.vcpus``` -> ``body.spec.vcpus: must be at
    most 4096 (got 5000)`` with details naming the field and the bound, or None for another error.

    msgspec does not say which value it refused: it is read from ``data`` at the same path.
    """
    text, _sep, where = message.rpartition(" - at ")
    steps = where.strip("`")[1:]
    field_path = path + steps
    limit_key = {"<=": "max", "<": "max", ">=": "min", ">": "min"}
    if (number := _BOUND.fullmatch(text)) is not None:
        _kind, op, limit = number.groups()
        got = _value_at(data, steps)
        shown = "" if got is _MISSING_VALUE else f" (got {got!r})"
        details = {"field": field_path, limit_key[op]: _number(limit)}
        return f"{field_path}: must be {_BOUND_WORDS[op]} {limit}{shown}", details
    if (length := _LENGTH_BOUND.fullmatch(text)) is not None:
        kind, op, limit = length.groups()
        got = _value_at(data, steps)
        shown = "" if got is _MISSING_VALUE or not hasattr(got, "__len__") else f" (got {len(got)})"
        details = {"field": field_path, limit_key[op] + "_length": int(limit)}
        return f"{field_path}: must have {_BOUND_WORDS[op]} {limit} {_LENGTH_UNITS[kind]}{shown}", details
    if text == f"Expected `str` matching regex {NO_NUL!r}":
        return f"{field_path}: must not contain a NUL character", {"field": field_path}
    return None


#: What :func:`_value_at` returns when the path does not lead to a value.
_MISSING_VALUE = object()


def _value_at(data: object, steps: str) -> object:
    """The value at ``steps`` (``.spec.disks[0].size_gib``) in plain decoded data."""
    value: Any = data
    for name, index, key in _STEP.findall(steps):
        try:
            if name:
                value = value[name]
            elif index:
                value = value[int(index)]
            else:
                value = value[key.strip("'\"")]
        except (KeyError, IndexError, TypeError, ValueError):
            return _MISSING_VALUE
    return value


def _number(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        return float(text)


def _located(message: str, path: str, root: type) -> str:
    """msgspec's ``Expected `int`, got `str` - at `$.spec.vcpus``` ->
    ``body.spec.vcpus: expected an integer, got a string`` (and the allowed values of an enum)."""
    text, sep, where = message.rpartition(" - at ")
    if not sep:
        text, where = message, "`$`"
    steps = where.strip("`")[1:]
    field_path = path + steps
    if missing := _MISSING.fullmatch(text):
        return f"{field_path}.{missing.group(1)}: required field is missing"
    if expected := _EXPECTED.fullmatch(text):
        want, got = expected.groups()
        wanted = " or ".join(_EXPECTED_WORDS.get(w, w) for w in want.split(" | "))
        return f"{field_path}: expected {wanted}, got {_GOT_WORDS.get(got, got)}"
    if length := _LENGTH.fullmatch(text):
        return f"{field_path}: expected {length.group(1)} items, got {length.group(2)}"
    if (bad := _BAD_ENUM.fullmatch(text)) is not None:
        allowed = _allowed_values(root, steps)
        if allowed:
            return f"{field_path}: must be one of {allowed}, got {bad.group(1)}"
    return f"{field_path}: {text[:1].lower()}{text[1:]}".replace("`", "")


def _allowed_values(root: type, steps: str) -> str:
    """The values an enum or Literal field at ``steps`` (``.disks[0].format``) accepts, or ""."""
    tp: Any = root
    for name, index, _key in _STEP.findall(steps):
        tp = _unwrap(tp)
        args = typing.get_args(tp)
        if name and isinstance(tp, type) and issubclass(tp, msgspec.Struct):
            tp = typing.get_type_hints(tp).get(name)
        elif index and args and args[-1] is not Ellipsis and len(args) > int(index):
            tp = args[int(index)]  # a fixed-size tuple
        elif args:
            tp = args[0] if (index and args[-1] is Ellipsis) else args[-1]  # tuple[T, ...] / dict values
        else:
            return ""
        if tp is None:
            return ""
    tp = _unwrap(tp)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return ", ".join(repr(m.value) for m in tp)
    if typing.get_origin(tp) is typing.Literal:
        return ", ".join(repr(v) for v in typing.get_args(tp))
    return ""


def _unwrap(tp: Any) -> Any:
    """``X | None`` -> X."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return tp
