"""The catalogue: every operation descriptor, found where it is declared, looked up by kind.

Each family module declares its operations next to its message types (see
:mod:`common.messages.descriptor`); this module only collects them, so adding an operation
never means editing a table here. docs/protocol.md's reference sections are generated from
:data:`CATALOGUE` (``python -m common.protocol_reference --write docs/protocol.md``).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import ModuleType
from typing import Any

from common.errors import InvalidRequest
from common.messages import api, audit, host, network, placement, tuning, vm, vmops
from common.messages.descriptor import TIMEOUT_SECONDS, Family, Op

#: The modules that declare operations, in the order the reference lists them.
FAMILY_MODULES: tuple[ModuleType, ...] = (vm, vmops, host, network, tuning, api, placement, audit)


def _collect(modules: tuple[ModuleType, ...]) -> dict[str, Op[Any, Any]]:
    found: dict[str, Op[Any, Any]] = {}
    for module in modules:
        for value in vars(module).values():
            if not isinstance(value, Op):
                continue
            other = found.get(value.kind)
            if other is not None and other is not value:
                raise RuntimeError(f"message kind {value.kind!r} is declared twice")
            found[value.kind] = value
    return found


#: kind -> descriptor, for every operation virtfleet knows.
CATALOGUE: Mapping[str, Op[Any, Any]] = _collect(FAMILY_MODULES)

#: name -> family, for every family an operation belongs to.
FAMILIES: Mapping[str, Family] = {op.family.name: op.family for op in CATALOGUE.values()}


def lookup(kind: str) -> Op[Any, Any]:
    """The descriptor of ``kind``; InvalidRequest for an unknown one."""
    try:
        return CATALOGUE[kind]
    except KeyError:
        raise InvalidRequest(f"unknown message kind {kind!r}") from None


def timeout_of(op: Op[Any, Any]) -> float:
    """Seconds a caller waits for the reply to ``op``."""
    return TIMEOUT_SECONDS[op.timeout]


__all__ = ["CATALOGUE", "FAMILIES", "FAMILY_MODULES", "lookup", "timeout_of"]
