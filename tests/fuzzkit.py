"""Hypothesis strategies for the fuzz tier (tests/fuzz): wire data for every body type, envelopes, bytes.

Bodies are built from each message type's schema as msgspec describes it (``msgspec.inspect``),
not from the classes: the strategies produce the *plain data* a peer would put on the wire (maps,
lists, strings, numbers), mostly shaped like the type (so that the handlers behind the decoder
are reached with well-formed requests) and, at any depth, sometimes not (a wrong type, a missing
field, an out-of-range number, an odd string), so that the decoder's refusals are reached too.

``VIRTFLEET_FUZZ_EXAMPLES`` sets the examples per test (per kind for the per-kind tests); CI runs
the small default, ``bench/fuzz.py`` the full run (docs/security.md, "Fuzzing").
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import msgspec.inspect as mi
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from common import codec
from common.errors import DecodeError
from common.messages.envelope import PROTOCOL_VERSION, Envelope

#: Examples per test when ``VIRTFLEET_FUZZ_EXAMPLES`` is not set (CI: the tier stays near a minute).
DEFAULT_EXAMPLES = 8
EXAMPLES_ENV = "VIRTFLEET_FUZZ_EXAMPLES"
#: How deep a body may nest before only leaves are produced (the schemas are at most ~5 deep).
MAX_DEPTH = 4
#: One value in this many is replaced by junk (of any type), at every depth.
JUNK_ONE_IN = 8
#: msgpack carries integers in 64 bits; bigger ones cannot reach a decoder from the wire.
INT64 = (-(2**63), 2**64 - 1)

#: Strings an attacker tries: paths out of a pool, XML, control characters, huge, empty.
NASTY_STRINGS = (
    "",
    " ",
    "../../etc/shadow",
    "/etc/shadow",
    "a" * 300,
    "<domain type='kvm'><devices><emulator>/bin/sh</emulator></devices></domain>",
    "\x00",
    "\u202e\ufeff",
    "hv1; rm -rf /",
    "-1",
    "1e309",
    "NaN",
    "%s%n",
)


#: Names the fuzz fleet knows (tests/fuzz/test_fuzz_handlers.py), so that handlers get past lookups.
KNOWN_NAMES = ("hv1", "hv2", "vm1", "default", "br0", "eth0", "vda")


@dataclass
class CaseCount:
    """Cases one test ran: inputs that reached the code under test (the ``cases`` fixture)."""

    n: int = 0

    def add(self) -> None:
        self.n += 1


def examples(default: int = DEFAULT_EXAMPLES) -> int:
    """The examples per test this run uses."""
    return int(os.environ.get(EXAMPLES_ENV, default))


def fuzz_settings(count: int | None = None) -> settings:
    """Settings for a fuzz test: no deadline (no timed assertions), no database of failures
    written into the tree, slow and large examples allowed. The CI size is derandomized (the
    same inputs every run, so CI never flakes on a new random input); a run that sets
    ``VIRTFLEET_FUZZ_EXAMPLES`` draws new inputs each time."""
    return settings(
        max_examples=examples() if count is None else count,
        deadline=None,
        database=None,
        derandomize=EXAMPLES_ENV not in os.environ,
        suppress_health_check=list(HealthCheck),
    )


def _junk() -> st.SearchStrategy[Any]:
    leaves = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(*INT64),
        st.floats(),
        st.text(max_size=20),
        st.sampled_from(NASTY_STRINGS),
        st.binary(max_size=20),
    )
    # One level of nesting, not st.recursive: recursion made half of the generation time.
    return st.one_of(
        leaves, st.lists(leaves, max_size=3), st.dictionaries(st.text(max_size=8), leaves, max_size=3)
    )


#: Any plain data msgpack can carry, small (built once: strategies are immutable).
JUNK = _junk()


def junk() -> st.SearchStrategy[Any]:
    """:data:`JUNK`."""
    return JUNK


@st.composite
def _sometimes_junk(draw: st.DrawFn, shaped: st.SearchStrategy[Any]) -> Any:
    return draw(JUNK) if draw(st.integers(0, JUNK_ONE_IN - 1)) == 0 else draw(shaped)


def _int(t: mi.IntType) -> st.SearchStrategy[int]:
    low = INT64[0] if t.ge is None and t.gt is None else (t.ge if t.ge is not None else t.gt + 1)  # type: ignore[operator]
    high = INT64[1] if t.le is None and t.lt is None else (t.le if t.le is not None else t.lt - 1)  # type: ignore[operator]
    # Mostly in range (with the edges), sometimes anywhere in 64 bits.
    return st.one_of(st.integers(low, high), st.sampled_from((low, high, 0, -1)), st.integers(*INT64))


def _str(t: mi.StrType) -> st.SearchStrategy[str]:
    shaped: st.SearchStrategy[str] = (
        st.from_regex(t.pattern, fullmatch=True) if t.pattern else st.text(max_size=t.max_length or 40)
    )
    return st.one_of(
        shaped, st.sampled_from(KNOWN_NAMES), st.sampled_from(NASTY_STRINGS), st.text(max_size=64)
    )


def wire(t: mi.Type, depth: int = 0) -> st.SearchStrategy[Any]:
    """Plain data for a value of msgspec type ``t``, mostly well-shaped."""
    if depth >= MAX_DEPTH:
        return junk()
    return _sometimes_junk(_shaped(t, depth))


def _shaped(t: mi.Type, depth: int) -> st.SearchStrategy[Any]:
    deeper: Callable[[mi.Type], st.SearchStrategy[Any]] = lambda inner: wire(inner, depth + 1)  # noqa: E731
    match t:
        case mi.NoneType():
            return st.none()
        case mi.BoolType():
            return st.booleans()
        case mi.IntType():
            return _int(t)
        case mi.FloatType():
            return st.floats()
        case mi.StrType():
            return _str(t)
        case mi.BytesType() | mi.ByteArrayType():
            return st.binary(max_size=64)
        case mi.EnumType():
            values = [member.value for member in t.cls] if issubclass(t.cls, enum.Enum) else []
            return st.one_of(st.sampled_from(values), st.text(max_size=10)) if values else junk()
        case mi.LiteralType():
            return st.sampled_from(t.values)
        case mi.UnionType():
            return st.one_of(*(deeper(member) for member in t.types))
        case mi.ListType() | mi.VarTupleType() | mi.SetType() | mi.FrozenSetType():
            return st.lists(deeper(t.item_type), max_size=3)
        case mi.TupleType():
            return st.tuples(*(deeper(item) for item in t.item_types)).map(list)
        case mi.DictType():
            # Keys stay shaped: msgpack maps (strict_map_key) carry only str or bytes keys.
            return st.dictionaries(_shaped(t.key_type, depth + 1), deeper(t.value_type), max_size=3)
        case mi.StructType():
            return struct_body(t, depth)
        case _:
            return junk()


def struct_body(t: mi.StructType, depth: int = 0) -> st.SearchStrategy[dict[str, Any]]:
    """A map for the Struct ``t``: its required fields (each sometimes left out), its optional
    ones sometimes, and sometimes a field it does not know."""
    required = {f.encode_name: wire(f.type, depth + 1) for f in t.fields if f.required}
    optional = {f.encode_name: wire(f.type, depth + 1) for f in t.fields if not f.required}
    optional["x-unknown"] = junk()
    body = st.fixed_dictionaries({}, optional={**required, **optional})
    complete = st.fixed_dictionaries(required, optional=optional)
    return st.one_of(complete, complete, complete, body)


def body_for(cls: type[msgspec.Struct]) -> st.SearchStrategy[dict[str, Any]]:
    """Wire bodies for the message type ``cls``."""
    info = mi.type_info(cls)
    assert isinstance(info, mi.StructType), f"{cls} is not a Struct"
    return struct_body(info)


def envelope(kind: str, body: st.SearchStrategy[Any]) -> st.SearchStrategy[Envelope]:
    """Request envelopes of ``kind`` around ``body`` (never expired: the handler is reached)."""
    return st.builds(
        Envelope,
        kind=st.just(kind),
        body=body,
        sender=st.one_of(st.just("fuzz"), st.text(max_size=12)),
    )


def wire_envelope(kind: str, body: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """The plain map of an envelope, with any field sometimes junk or missing."""
    fields: dict[str, st.SearchStrategy[Any]] = {
        "v": st.one_of(st.just(PROTOCOL_VERSION), st.sampled_from(("1.9", "2.0", "1", "x.y", "")), junk()),
        "kind": st.one_of(st.just(kind), junk()),
        "id": st.one_of(st.uuids().map(lambda u: u.hex), junk()),
        "correlation_id": st.one_of(st.none(), st.text(max_size=8), junk()),
        "sender": st.one_of(st.just("fuzz"), junk()),
        "sent_at": st.one_of(st.floats(), st.integers(*INT64), junk()),
        "expires_at": st.one_of(st.none(), st.floats(), junk()),
        "body": st.one_of(body, body, body, junk()),
    }
    return st.one_of(st.fixed_dictionaries(fields), st.fixed_dictionaries({}, optional=fields))


@st.composite
def _flipped(draw: st.DrawFn, raw: bytes) -> bytes:
    out = bytearray(raw)
    for _ in range(draw(st.integers(1, 4))):
        if out:
            out[draw(st.integers(0, len(out) - 1))] = draw(st.integers(0, 255))
    return bytes(out)


def mutated(raw: bytes) -> st.SearchStrategy[bytes]:
    """``raw`` with bytes flipped, cut off, inserted or deleted."""
    cut = st.integers(0, max(len(raw) - 1, 0)).map(lambda n: raw[:n])
    insert = st.tuples(st.integers(0, len(raw)), st.binary(min_size=1, max_size=9)).map(
        lambda a: raw[: a[0]] + a[1] + raw[a[0] :]
    )
    delete = st.tuples(st.integers(0, len(raw)), st.integers(1, 9)).map(
        lambda a: raw[: a[0]] + raw[a[0] + a[1] :]
    )
    return st.one_of(_flipped(raw), cut, insert, delete)


def encodable(data: Any) -> bytes | None:
    """``data`` as MessagePack, or None when msgpack cannot carry it (then no peer could send it)."""
    try:
        return codec.encode(data)
    except DecodeError:
        return None
