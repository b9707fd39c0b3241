"""Fuzz the decoder: whatever bytes arrive, decoding raises only virtfleet errors.

For every body type of the catalogue (each operation's request body and, where it has one, its
result), wire data shaped like the type and mutated at any depth goes through what a consumer
does with a delivery: MessagePack bytes -> :func:`decode_envelope` -> :func:`codec.from_wire`.
Plus arbitrary bytes, and valid envelopes with bytes flipped, cut, inserted or deleted. Any
exception that is not a :class:`VirtfleetError` subclass is a crash (the consumer would log a
traceback instead of dead-lettering with a reason).
"""

from __future__ import annotations

import contextlib
from typing import Any

import fuzzkit
import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from common import codec
from common.errors import VirtfleetError
from common.messages.catalogue import CATALOGUE
from common.messages.envelope import Envelope, decode_envelope

#: (label, kind, message type) for every body type: requests and replies of every operation.
BODY_TYPES: list[tuple[str, str, type[msgspec.Struct]]] = [
    (f"{kind}:{side}", kind, cls)
    for kind, op in sorted(CATALOGUE.items())
    for side, cls in (("body", op.body), ("result", op.result))
    if cls not in (None, type(None))
]


def decode_delivery(raw: bytes, cls: type[Any]) -> object:
    """What a consumer does with the bytes of a delivery for a message of type ``cls``."""
    env = decode_envelope(raw)
    return codec.from_wire(cls, env.body, "body")


def test_every_body_type_is_fuzzed() -> None:
    kinds = {kind for _label, kind, _cls in BODY_TYPES}
    assert kinds == set(CATALOGUE)


@pytest.mark.parametrize(("kind", "cls"), [pytest.param(k, c, id=label) for label, k, c in BODY_TYPES])
def test_decoder_raises_only_typed_errors(
    kind: str, cls: type[msgspec.Struct], cases: fuzzkit.CaseCount
) -> None:
    @fuzzkit.fuzz_settings()
    @given(fuzzkit.wire_envelope(kind, fuzzkit.body_for(cls)))
    def check(data: dict[str, Any]) -> None:
        raw = fuzzkit.encodable(data)
        if raw is None:
            return
        cases.add()
        with contextlib.suppress(VirtfleetError):
            decode_delivery(raw, cls)

    check()


def test_arbitrary_bytes_raise_only_typed_errors(cases: fuzzkit.CaseCount) -> None:
    @fuzzkit.fuzz_settings(fuzzkit.examples() * 20)
    @given(st.binary(max_size=512))
    def check(raw: bytes) -> None:
        cases.add()
        with contextlib.suppress(VirtfleetError):
            decode_envelope(raw)

    check()


def test_mutated_envelopes_raise_only_typed_errors(cases: fuzzkit.CaseCount) -> None:
    @fuzzkit.fuzz_settings(fuzzkit.examples() * 20)
    @given(st.data())
    def check(data: st.DataObject) -> None:
        kind, cls = data.draw(st.sampled_from([(k, c) for _label, k, c in BODY_TYPES]))
        body = data.draw(fuzzkit.body_for(cls))
        raw = fuzzkit.encodable(Envelope(kind=kind, body=body, sender="fuzz").to_wire())
        if raw is None:
            return
        cases.add()
        with contextlib.suppress(VirtfleetError):
            decode_delivery(data.draw(fuzzkit.mutated(raw)), cls)

    check()
