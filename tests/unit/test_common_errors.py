"""The error tree's wire form (common/errors.py): round trips and the allow-list."""

from __future__ import annotations

import inspect
from types import MappingProxyType

import pytest

from common import errors

RETRYABLE_BY_DEFAULT = {
    "TransportError",
    "ControllerUnavailable",
    "RequestTimeout",
    "RateLimited",
    "HostDown",
    "StoreUnavailable",
    "HypervisorUnavailable",
}


def test_every_error_class_of_the_module_is_on_the_allow_list() -> None:
    defined = {
        name
        for name, obj in vars(errors).items()
        if inspect.isclass(obj) and issubclass(obj, errors.VirtfleetError)
    }
    assert defined == set(errors.WIRE_TYPES)
    assert all(errors.WIRE_TYPES[name].__name__ == name for name in errors.WIRE_TYPES)


@pytest.mark.parametrize("name", sorted(errors.WIRE_TYPES))
def test_round_trip_keeps_type_message_retryable_details(name: str) -> None:
    cls = errors.WIRE_TYPES[name]
    original = cls("it went wrong: ünïcode", retryable=True, details={"code": 38, "reasons": ["a", "b"]})
    wire = original.to_wire()
    assert wire == {
        "type": name,
        "message": "it went wrong: ünïcode",
        "retryable": True,
        "details": {"code": 38, "reasons": ["a", "b"]},
    }
    rebuilt = errors.error_from_wire(wire)
    assert type(rebuilt) is cls
    assert rebuilt.message == "it went wrong: ünïcode"
    assert str(rebuilt) == "it went wrong: ünïcode"
    assert rebuilt.retryable is True
    assert rebuilt.details == {"code": 38, "reasons": ["a", "b"]}


@pytest.mark.parametrize("name", sorted(errors.WIRE_TYPES))
def test_round_trip_with_retryable_false_and_no_details(name: str) -> None:
    cls = errors.WIRE_TYPES[name]
    rebuilt = errors.error_from_wire(cls("x", retryable=False).to_wire())
    assert type(rebuilt) is cls
    assert rebuilt.retryable is False
    assert rebuilt.details == {}


@pytest.mark.parametrize("name", sorted(errors.WIRE_TYPES))
def test_retryable_defaults(name: str) -> None:
    cls = errors.WIRE_TYPES[name]
    assert cls("x").retryable is (name in RETRYABLE_BY_DEFAULT)
    # A wire form without a usable "retryable" falls back to the class default too.
    assert errors.error_from_wire({"type": name, "message": "x"}).retryable is (name in RETRYABLE_BY_DEFAULT)


def test_named_retryable_defaults() -> None:
    assert errors.TransportError("x").retryable is True
    assert errors.ControllerUnavailable("x").retryable is True
    assert errors.RequestTimeout("x").retryable is True
    assert errors.InvalidRequest("x").retryable is False
    assert errors.NotFound("x").retryable is False
    assert errors.InternalError("x").retryable is False
    assert errors.TransportError("x", retryable=False).retryable is False


def test_expected_flag() -> None:
    assert errors.InternalError.expected is False
    assert errors.InternalError("x").expected is False
    for name, cls in errors.WIRE_TYPES.items():
        if name != "InternalError":
            assert cls.expected is True, name


def test_details_are_copied_not_aliased() -> None:
    source = {"a": 1}
    err = errors.NotFound("x", details=source)
    source["a"] = 2
    assert err.details == {"a": 1}


def test_repr() -> None:
    assert repr(errors.NotFound("vm 'web' not found")) == "NotFound(\"vm 'web' not found\")"


@pytest.mark.parametrize(
    "type_name",
    ["KeyError", "Exception", "SystemExit", "object", "__class__", "notfound", "", "VirtfleetErrorX"],
)
def test_unknown_type_name_becomes_internal_error(type_name: str) -> None:
    err = errors.error_from_wire(
        {"type": type_name, "message": "boom", "retryable": True, "details": {"k": 1}}
    )
    assert type(err) is errors.InternalError
    assert err.message == f"{type_name}: boom"
    # Only the allow-listed class would be rebuilt with the peer's fields.
    assert err.retryable is False
    assert err.details == {}


@pytest.mark.parametrize("type_value", [None, 7, ["NotFound"], {"NotFound": 1}, b"NotFound", True])
def test_non_string_type_becomes_internal_error(type_value: object) -> None:
    err = errors.error_from_wire({"type": type_value, "message": "boom"})
    assert type(err) is errors.InternalError
    assert err.message == f"{type_value}: boom"


def test_missing_type_becomes_internal_error() -> None:
    err = errors.error_from_wire({"message": "boom"})
    assert type(err) is errors.InternalError
    assert err.message == "None: boom"


@pytest.mark.parametrize("payload", [None, "NotFound", 42, ["NotFound", "x"], b"\x00", 1.5, True])
def test_non_map_payload_becomes_internal_error(payload: object) -> None:
    err = errors.error_from_wire(payload)
    assert type(err) is errors.InternalError
    assert err.message == f"malformed error payload: {payload!r:.200}"
    assert err.retryable is False


def test_non_map_payload_message_is_truncated() -> None:
    err = errors.error_from_wire("x" * 1000)
    assert type(err) is errors.InternalError
    assert err.message == "malformed error payload: " + repr("x" * 1000)[:200]


@pytest.mark.parametrize(
    ("message", "expected"), [(42, "42"), (None, "None"), (["a"], "['a']"), (b"raw", "b'raw'")]
)
def test_non_string_message_is_repr(message: object, expected: str) -> None:
    err = errors.error_from_wire({"type": "NotFound", "message": message})
    assert type(err) is errors.NotFound
    assert err.message == expected


def test_missing_message_is_none_text() -> None:
    err = errors.error_from_wire({"type": "Conflict"})
    assert type(err) is errors.Conflict
    assert err.message == "None"


@pytest.mark.parametrize("retryable", ["yes", 1, 0, None, [], "true"])
def test_non_bool_retryable_takes_class_default(retryable: object) -> None:
    assert (
        errors.error_from_wire({"type": "NotFound", "message": "m", "retryable": retryable}).retryable
        is False
    )
    assert (
        errors.error_from_wire({"type": "RequestTimeout", "message": "m", "retryable": retryable}).retryable
        is True
    )


@pytest.mark.parametrize("details", ["text", 3, ["a", "b"], None, True])
def test_non_map_details_become_empty(details: object) -> None:
    err = errors.error_from_wire({"type": "NoValidHost", "message": "m", "details": details})
    assert type(err) is errors.NoValidHost
    assert err.details == {}


def test_error_from_wire_accepts_any_mapping() -> None:
    err = errors.error_from_wire(
        MappingProxyType({"type": "StorageError", "message": "disk", "retryable": True})
    )
    assert type(err) is errors.StorageError
    assert err.message == "disk"
    assert err.retryable is True


def test_subclass_relations_survive_the_wire() -> None:
    err = errors.error_from_wire(errors.ControllerUnavailable("nobody").to_wire())
    assert isinstance(err, errors.TransportError)
    err = errors.error_from_wire(errors.DecodeError("bad").to_wire())
    assert isinstance(err, errors.ProtocolError)
