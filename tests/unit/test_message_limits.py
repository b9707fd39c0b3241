"""Bounds of message fields (common.messages.limits): a value past a bound is an InvalidRequest
naming the field, the bound and what came; a value at the bound passes."""

from __future__ import annotations

import types
import typing
from typing import Any

import msgspec
import pytest

from common import codec
from common.codec import from_wire
from common.errors import InvalidRequest
from common.messages import limits
from common.messages.api import VmCreate, VmShutdownRequest
from common.messages.catalogue import CATALOGUE
from common.messages.descriptor import ApiCall, Command
from common.messages.tuning import PinVm
from common.messages.vm import VmSpec

BASE: dict[str, Any] = {"name": "web1", "vcpus": 1, "memory_mib": 256, "disk_gib": 1}
SPEC: dict[str, Any] = {"uuid": "u", "name": "web1", "vcpus": 1, "memory_mib": 256}
NIC = {"kind": "network", "source": "default"}
VM_REF = {"uuid": "u", "name": "web1"}
PIN = {"vcpu": 0, "cpuset": "0-3"}


@pytest.mark.parametrize(
    ("cls", "body", "field", "at_bound", "past", "words"),
    [
        (
            VmCreate,
            BASE,
            "memory_mib",
            limits.MAX_MEMORY_MIB,
            99999999999999999999,
            "must be at most 16777216",
        ),
        (VmCreate, BASE, "memory_mib", limits.MAX_MEMORY_MIB, -1, "must be at least 0"),
        (VmCreate, BASE, "vcpus", limits.MAX_VCPUS, limits.MAX_VCPUS + 1, "must be at most 4096"),
        (VmCreate, BASE, "disk_gib", limits.MAX_DISK_GIB, 2**64, "must be at most 1048576"),
        (VmCreate, BASE, "idempotency_key", "k" * 128, "k" * 10_000, "must have at most 128 characters"),
        (VmCreate, BASE, "name", "a" * 64, "a" * 65, "must have at most 64 characters"),
        (VmCreate, BASE, "cdrom", "/" + "x" * 4095, "/" + "x" * 4096, "must have at most 4096 characters"),
        (VmCreate, BASE, "nics", [NIC] * limits.MAX_NICS, [NIC] * 33, "must have at most 32 items"),
        (VmShutdownRequest, {"name": "web1"}, "timeout_s", 86400.0, 1e300, "must be at most 86400.0"),
        (VmSpec, SPEC, "description", "d" * 4096, "d" * 4097, "must have at most 4096 characters"),
        (VmSpec, SPEC, "max_vcpus", 4096, 2**63, "must be at most 4096"),
        # a VM of 4096 vCPUs re-pinned at once: every pin in one command
        (PinVm, {"vm": VM_REF}, "vcpu_pins", [PIN] * 4096, [PIN] * 4097, "must have at most 4096 items"),
    ],
)
def test_a_value_past_its_bound_is_refused_naming_field_bound_and_value(
    cls: type[Any], body: dict[str, Any], field: str, at_bound: Any, past: Any, words: str
) -> None:
    from_wire(cls, {**body, field: at_bound})  # the bound itself is a valid value
    with pytest.raises(InvalidRequest) as refused:
        from_wire(cls, {**body, field: past})
    message = refused.value.message
    assert message.startswith(f"body.{field}: {words}"), message
    shown = len(past) if isinstance(past, str | list) else past
    assert f"(got {shown!r})" in message, message
    assert refused.value.details["field"] == f"body.{field}"


@pytest.mark.parametrize("field", ["name", "idempotency_key", "cdrom", "cpuset", "machine"])
def test_a_nul_character_is_refused_in_any_string(field: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        from_wire(VmCreate, {**BASE, field: "/a\x00b"})
    assert refused.value.message == f"body.{field}: must not contain a NUL character"


def test_the_path_of_a_nested_field_is_named() -> None:
    body = {**BASE, "disk_gib": 0, "disks": [{"target": "vda", "size_gib": 2**70}]}
    with pytest.raises(InvalidRequest, match=r"^body\.disks\[0\]\.size_gib: must be at most 1048576 \(got"):
        from_wire(VmCreate, body)


def test_an_integer_msgpack_cannot_carry_is_refused_by_the_bound_not_the_encoder() -> None:
    # A client checks its body (from_wire(to_wire(...))) before encoding: the bound speaks first.
    with pytest.raises(InvalidRequest, match=r"body\.memory_mib: must be at most"):
        from_wire(VmCreate, {**BASE, "memory_mib": 2**64})
    with pytest.raises(Exception, match="cannot encode message"):
        codec.encode({**BASE, "memory_mib": 2**64})


@pytest.mark.parametrize("cpuset", ["0-99999999999", "16384", "0-3,^99999"])
def test_a_cpuset_past_the_highest_cpu_id_is_refused(cpuset: str) -> None:
    with pytest.raises(InvalidRequest, match="above the limit 16383") as refused:
        from_wire(VmCreate, {**BASE, "cpuset": cpuset})
    assert refused.value.message.startswith(f"body: invalid cpuset {cpuset!r}")


def _unbounded(tp: Any, where: str, seen: set[type], out: list[str]) -> None:
    """Collect the int, str and list/map fields reachable from ``tp`` that carry no msgspec bound."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Annotated:
        for inner in typing.get_args(args[0]):  # a bounded list's items have bounds of their own
            if inner is not Ellipsis:
                _unbounded(inner, f"{where}[]", seen, out)
        return
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            _unbounded(arg, where, seen, out)
        return
    if tp in (int, str) or origin in (tuple, dict, list, frozenset):
        out.append(where)
        return
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct) and tp not in seen:
        seen.add(tp)
        hints = typing.get_type_hints(tp, include_extras=True)
        for field in msgspec.structs.fields(tp):
            _unbounded(hints[field.name], f"{tp.__name__}.{field.name}", seen, out)


def test_every_integer_string_and_list_of_every_api_and_command_body_has_a_bound() -> None:
    missing: list[str] = []
    seen: set[type] = set()
    for op in CATALOGUE.values():
        if isinstance(op, ApiCall | Command):  # commands: what the controller builds from API bodies
            _unbounded(op.body, op.kind, seen, missing)
    assert missing == [], "declare these with a common.messages.limits alias"
