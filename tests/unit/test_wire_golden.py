"""Golden wire bytes of every message kind: the exact MessagePack a request and its reply are today.

For each kind of common.messages.catalogue, tests/wiresamples.py builds a sample body (and result)
with every field set to a valid, non-default value where possible; the request envelope (fixed id
and clock) and the success reply (fixed id and clock) are encoded and compared byte for byte with
``tests/unit/golden/wire/<kind>.json`` (``{"kind", "request_hex", "reply_hex"}``; reports have no
reply). The golden bytes were produced by the reflective ``common.schema`` encoder; a replacement
(msgspec Structs) must reproduce them exactly.

Adapting to a new encode API: change only the helpers under "The one place to adapt" below.

Regenerating (only for a new kind, or a deliberate, reviewed wire change)::

    PYTHONPATH=tests .venv/bin/python tests/unit/test_wire_golden.py --write [--force] [KIND ...]

writes the golden file of every kind (or of the kinds named) that has none. An existing file is
left alone and reported when its bytes differ, unless ``--force`` is given: changed bytes are
what this test exists to catch, so they are never re-blessed silently.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import pytest
from wiresamples import Sampler

from common import codec
from common.messages.catalogue import CATALOGUE
from common.messages.descriptor import Op
from common.messages.envelope import Envelope, decode_envelope
from common.transport.rpc import request, unwrap

T = TypeVar("T")

GOLDEN = Path(__file__).parent / "golden" / "wire"
SENDER = "golden"
REQUEST_AT = 1764111111.5
REQUEST_ID = "0" * 32
REPLY_AT = 1764111112.0
REPLY_ID = "1" * 32
_REGEN_HINT = "PYTHONPATH=tests .venv/bin/python tests/unit/test_wire_golden.py --write"

# ---------------------------------------------------------------- the one place to adapt
# These helpers are the only code that knows how a typed message becomes bytes and back. When
# the encode API changes (msgspec Structs), adapt them and nothing else: the golden files stay.


def encode_request(op: Op[Any, Any], body: object) -> tuple[Envelope, bytes]:
    """The request envelope of ``body`` with a fixed id and clock, and its wire bytes."""
    env = dataclasses.replace(request(op, body, sender=SENDER, now=REQUEST_AT), id=REQUEST_ID)
    return env, env.encode()


def encode_reply(request_env: Envelope, result: object) -> bytes:
    """The wire bytes of the success reply carrying ``result``, with a fixed id and clock."""
    reply = request_env.reply_ok(codec.to_wire(result), sender=SENDER)
    return dataclasses.replace(reply, id=REPLY_ID, sent_at=REPLY_AT).encode()


def decode_request_body(raw: bytes, body_type: type[T]) -> T:
    """The typed body of request bytes, as a receiver decodes it."""
    return codec.from_wire(body_type, decode_envelope(raw).body)


def decode_reply_result(raw: bytes, op: Op[Any, T]) -> T:
    """The typed result of reply bytes, as a caller decodes it."""
    return unwrap(decode_envelope(raw), op)


# ---------------------------------------------------------------- golden records

#: Fields that no sample in the catalogue sets to a non-default value, each for a reason the
#: message's own validation gives. Anything else left at its default would be a field whose wire
#: form nobody checks: make the sample builder reach it instead of adding it here.
ALLOWED_DEFAULTS = (
    # A forward device applies only to nat networks, and nat is NetworkSpec's default mode: the
    # sample uses isolated (a non-default mode) with a DHCP range, so forward_dev stays None.
    "network.NetworkSpec.forward_dev",
    # Either one vCPU (vcpu) or the emulator threads (emulator=True) are pinned, never both.
    "tuning.VmPinRequest.emulator",
    # Either size_gib (a new disk) or path (an existing image), never both.
    "vmops.VmDiskAttachRequest.path",
)


def golden_path(name: str) -> Path:
    """Where the golden record of kind ``name`` lives."""
    return GOLDEN / f"{name}.json"


def build_record(kind: Op[Any, Any], sampler: Sampler) -> dict[str, str]:
    """The golden record of ``kind`` as today's code encodes its samples."""
    env, raw = encode_request(kind, sampler.sample(kind.body))
    record = {"kind": kind.kind, "request_hex": raw.hex()}
    if kind.replies:
        record["reply_hex"] = encode_reply(env, sampler.sample(kind.result)).hex()
    return record


def load_record(name: str) -> dict[str, str]:
    """The stored golden record of kind ``name``; fails the test when there is none."""
    path = golden_path(name)
    if not path.exists():
        pytest.fail(f"{path} is missing; write it with: {_REGEN_HINT} {name}")
    record = json.loads(path.read_text())
    assert isinstance(record, dict)
    return record


@pytest.fixture(scope="module")
def sampler() -> Sampler:
    # One sampler for the module: it remembers samples, so the search runs once per type.
    return Sampler()


def _kind_params() -> list[Any]:
    return [pytest.param(k, id=k.kind) for k in CATALOGUE.values()]


@pytest.mark.parametrize("kind", _kind_params())
def test_wire_bytes_match_golden(kind: Op[Any, Any], sampler: Sampler) -> None:
    golden = load_record(kind.kind)
    actual = build_record(kind, sampler)
    assert golden["kind"] == kind.kind
    assert sorted(actual) == sorted(golden), "reply presence differs from the golden record"
    for key in ("request_hex", "reply_hex"):
        if key not in golden:
            continue
        want, got = bytes.fromhex(golden[key]), bytes.fromhex(actual[key])
        # Decoded first, for a readable diff when a value changed; equal maps can still differ in
        # bytes (key order, int width, float64 vs float32, int vs float, list vs map), hence both.
        assert codec.decode(got) == codec.decode(want), f"{kind.kind} {key}: decoded values differ"
        assert got.hex() == want.hex(), f"{kind.kind} {key}: same values, different bytes"


@pytest.mark.parametrize("kind", _kind_params())
def test_golden_bytes_decode_to_the_sample(kind: Op[Any, Any], sampler: Sampler) -> None:
    golden = load_record(kind.kind)
    body = decode_request_body(bytes.fromhex(golden["request_hex"]), kind.body)
    assert body == sampler.sample(kind.body)
    if kind.replies:
        result = decode_reply_result(bytes.fromhex(golden["reply_hex"]), kind)
        assert result == sampler.sample(kind.result)


def test_golden_files_match_the_catalogue() -> None:
    kinds = {k.kind for k in CATALOGUE.values()}
    files = {p.name for p in GOLDEN.iterdir()}
    missing = sorted(k for k in kinds if f"{k}.json" not in files)
    stray = sorted(f for f in files if f.removesuffix(".json") not in kinds or not f.endswith(".json"))
    assert missing == [], f"kinds without a golden file (write them with {_REGEN_HINT}): {missing}"
    assert stray == [], f"golden files of no catalogue kind (delete them with the kind): {stray}"


def test_fields_left_at_their_default_are_the_allowed_ones(sampler: Sampler) -> None:
    roots = [tp for k in CATALOGUE.values() for tp in ((k.body, k.result) if k.replies else (k.body,))]
    values = [sampler.sample(tp) for tp in roots]
    assert sampler.uncovered(roots, values) == ALLOWED_DEFAULTS


# ---------------------------------------------------------------- the sample builder itself


class _Colour(enum.Enum):
    RED = "red"
    GREEN = "green"


_REQUIRED = object()

#: (name, type, default) of a message using every type form the builder supports.
_SHAPE_FIELDS: tuple[tuple[str, Any, Any], ...] = (
    ("name", str, _REQUIRED),
    ("port", int | None, None),
    ("ratio", float, 1.0),
    ("on", bool, False),
    ("colour", _Colour, _Colour.RED),
    ("mode", Literal["a", "b"], "b"),
    ("tags", frozenset[str], frozenset()),
    ("pair", tuple[int, str], (0, "")),
    ("labels", dict[str, int] | None, None),
    ("extra", Any, None),
    ("cpus", tuple[str, ...], ()),
)


def _check_port(self: Any) -> None:
    # Refuses the first candidates (5900-5939): the search has to move on to one that passes.
    if self.port is not None and self.port < 6000:
        raise ValueError("port below 6000")


def _fields_spec(inner: type) -> list[tuple[str, Any] | tuple[str, Any, Any]]:
    spec: list[tuple[str, Any] | tuple[str, Any, Any]] = [
        (n, t) if d is _REQUIRED else (n, t, d) for n, t, d in _SHAPE_FIELDS
    ]
    return [*spec, ("inner", inner | None, None)]


def _dataclass_shape() -> type:
    inner = dataclasses.make_dataclass("Inner", [("vcpu", int), ("cpuset", str, "")], frozen=True)
    return dataclasses.make_dataclass(
        "Shape", _fields_spec(inner), frozen=True, namespace={"__post_init__": _check_port}
    )


def _struct_shape() -> type:
    msgspec = pytest.importorskip("msgspec")
    inner = msgspec.defstruct("Inner", [("vcpu", int), ("cpuset", str, "")], frozen=True)
    shape: type = msgspec.defstruct(
        "Shape", _fields_spec(inner), frozen=True, namespace={"__post_init__": _check_port}
    )
    return shape


@pytest.mark.parametrize("make", [_dataclass_shape, _struct_shape], ids=["dataclass", "msgspec"])
def test_sampler_sets_every_field_of_every_supported_shape(make: Any) -> None:
    shape = make()
    sampler = Sampler()
    value = sampler.sample(shape)
    assert sampler.uncovered([shape], [value]) == ()
    assert value.port >= 6000
    assert Sampler().sample(shape) == value, "the sample must not depend on the sampler's history"


# ---------------------------------------------------------------- regeneration


def _main(argv: Sequence[str]) -> int:
    """Write missing golden files; with --force also overwrite those whose bytes differ."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--write", action="store_true", help="write golden files (required)")
    parser.add_argument("--force", action="store_true", help="overwrite golden files whose bytes differ")
    parser.add_argument("kinds", nargs="*", metavar="KIND", help="only these kinds (default: all)")
    args = parser.parse_args(argv)
    if not args.write:
        parser.error("say --write to write golden files")
    unknown = sorted(set(args.kinds) - {k.kind for k in CATALOGUE.values()})
    if unknown:
        parser.error(f"unknown kinds: {', '.join(unknown)}")
    sampler = Sampler()
    refused = 0
    GOLDEN.mkdir(parents=True, exist_ok=True)
    for kind in CATALOGUE.values():
        if args.kinds and kind.kind not in args.kinds:
            continue
        path = golden_path(kind.kind)
        text = json.dumps(build_record(kind, sampler), indent=2) + "\n"
        if path.exists() and path.read_text() == text:
            continue
        if path.exists() and not args.force:
            print(f"REFUSED {path}: its bytes differ (a wire change?); --force overwrites it")
            refused += 1
            continue
        print(f"{'rewrote' if path.exists() else 'wrote'} {path}")
        path.write_text(text)
    return 1 if refused else 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
