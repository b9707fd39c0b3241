"""Typed message structs <-> plain data (what the codec carries).

Message bodies are frozen dataclasses. :func:`to_plain` turns one into dicts, lists and
scalars; :func:`from_plain` rebuilds it from decoded data, checking every field against
the dataclass's type hints. Unknown fields are ignored (a newer peer may send more),
missing fields take their defaults (an older peer may send less), and anything else that
does not fit raises :class:`~common.errors.InvalidRequest` naming the field path.

Supported field types: ``str``, ``int``, ``float``, ``bool``, ``None``, ``X | None``,
unions of dataclasses are not supported on purpose (use a ``kind`` field), ``tuple[T, ...]``,
``dict[str, T]``, ``Literal[...]``, ``enum.Enum`` subclasses with str/int values, nested
dataclasses.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from collections.abc import Mapping
from functools import cache
from typing import Any, TypeVar, Union, get_args, get_origin

from common.errors import InvalidRequest

T = TypeVar("T")


def to_plain(value: Any) -> Any:
    """Convert a dataclass instance (recursively) to plain data for the codec."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple | list | frozenset | set):
        items = sorted(value) if isinstance(value, frozenset | set) else value
        return [to_plain(v) for v in items]
    if isinstance(value, Mapping):
        return {str(k): to_plain(v) for k, v in value.items()}
    return value


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_plain(cls: type[T], data: object, path: str = "body") -> T:
    """Build ``cls`` (a dataclass) from plain data; raise InvalidRequest on a mismatch."""
    result = _convert(cls, data, path)
    return typing.cast(T, result)


def _convert(tp: Any, data: object, path: str) -> Any:  # noqa: PLR0912 - one branch per type form
    origin = get_origin(tp)
    if tp is Any:
        return data
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return _convert_dataclass(tp, data, path)
    if origin is Union or origin is types.UnionType:
        args = get_args(tp)
        if data is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, data, path)
            except InvalidRequest as exc:
                errors.append(exc.message)
        raise InvalidRequest("; ".join(errors) or f"{path}: unexpected value")
    if origin is typing.Literal:
        allowed = get_args(tp)
        if not any(type(data) is type(a) and data == a for a in allowed):
            raise InvalidRequest(f"{path}: must be one of {', '.join(map(repr, allowed))}, got {data!r:.80}")
        return data
    if origin is tuple or origin is frozenset:
        args = get_args(tp)
        if not isinstance(data, list | tuple):
            raise InvalidRequest(f"{path}: expected a list, got {_kind(data)}")
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(args) != len(data):
                raise InvalidRequest(f"{path}: expected {len(args)} items, got {len(data)}")
            return tuple(
                _convert(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, data, strict=True))
            )
        items = [_convert(args[0], v, f"{path}[{i}]") for i, v in enumerate(data)]
        return tuple(items) if origin is tuple else frozenset(items)
    if origin is dict or origin is Mapping:
        key_t, val_t = get_args(tp)
        if not isinstance(data, dict):
            raise InvalidRequest(f"{path}: expected a map, got {_kind(data)}")
        return {
            _convert(key_t, k, f"{path}.<key>"): _convert(val_t, v, f"{path}.{k}") for k, v in data.items()
        }
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(data)
        except ValueError:
            names = ", ".join(repr(m.value) for m in tp)
            raise InvalidRequest(f"{path}: must be one of {names}, got {data!r:.80}") from None
    return _convert_scalar(tp, data, path)


def _convert_scalar(tp: Any, data: object, path: str) -> Any:
    if tp is type(None):
        if data is not None:
            raise InvalidRequest(f"{path}: expected null, got {_kind(data)}")
        return None
    if tp is bool:
        if not isinstance(data, bool):
            raise InvalidRequest(f"{path}: expected true/false, got {_kind(data)}")
        return data
    if tp is int:
        if isinstance(data, bool) or not isinstance(data, int):
            raise InvalidRequest(f"{path}: expected an integer, got {_kind(data)}")
        return data
    if tp is float:
        if isinstance(data, bool) or not isinstance(data, int | float):
            raise InvalidRequest(f"{path}: expected a number, got {_kind(data)}")
        return float(data)
    if tp is str:
        if not isinstance(data, str):
            raise InvalidRequest(f"{path}: expected a string, got {_kind(data)}")
        return data
    if tp is bytes:
        if not isinstance(data, bytes):
            raise InvalidRequest(f"{path}: expected bytes, got {_kind(data)}")
        return data
    raise TypeError(f"unsupported schema type {tp!r} at {path}")


def _convert_dataclass(cls: type, data: object, path: str) -> Any:
    if not isinstance(data, dict):
        raise InvalidRequest(f"{path}: expected a map, got {_kind(data)}")
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.name in data:
            kwargs[f.name] = _convert(hints[f.name], data[f.name], f"{path}.{f.name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise InvalidRequest(f"{path}.{f.name}: required field is missing")
    try:
        return cls(**kwargs)
    except InvalidRequest as exc:
        raise InvalidRequest(f"{path}: {exc.message}", details=exc.details) from None


def _kind(data: object) -> str:
    if data is None:
        return "null"
    return {dict: "a map", list: "a list", str: "a string", bool: "a boolean", bytes: "bytes"}.get(
        type(data), type(data).__name__
    )
