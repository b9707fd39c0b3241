"""CPU sets in libvirt syntax: parsing and formatting, shared by the controller and the agents.

Pure functions only. ``parse_cpuset`` follows libvirt's ``virBitmapParse`` for ``cpuset``
attributes and is, if anything, stricter (it refuses a trailing comma or a signed number),
so a string it accepts is one libvirt takes with the same meaning:

* comma separated items, blanks around items and around a range's ``-`` allowed;
* an item is ``N``, ``N-M`` (``N <= M``) or ``^N`` (exclude one CPU; libvirt has no
  ``^N-M``);
* items are applied left to right, as libvirt does: ``"0-3,^2"`` is ``{0, 1, 3}`` but
  ``"^2,0-3"`` is ``{0, 1, 2, 3}`` because the range re-adds CPU 2;
* the result must not be empty.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["MAX_CPU_ID", "CpuSetSyntaxError", "format_cpuset", "parse_cpuset"]

#: Highest CPU id accepted. libvirt's cpumask length is 16384 bits; the bound also keeps a
#: typo such as ``0-99999999`` from building a huge set.
MAX_CPU_ID = 16383

_ITEM = re.compile(r"(\^)?([0-9]+)(?:\s*-\s*([0-9]+))?", re.ASCII)


class CpuSetSyntaxError(ValueError):
    """A cpuset string that libvirt would reject; the message names the bad part."""


def _cpu_id(text: str, spec: str) -> int:
    value = int(text)
    if value > MAX_CPU_ID:
        raise CpuSetSyntaxError(f"cpuset {spec!r}: CPU {value} is above the limit {MAX_CPU_ID}")
    return value


def parse_cpuset(spec: str) -> frozenset[int]:
    """Parse a libvirt cpuset such as ``"0-3,^2,8"`` into ``frozenset({0, 1, 3, 8})``.

    Raises :class:`CpuSetSyntaxError` (a ``ValueError``) for an empty string, an empty
    item, a reversed range, ``^`` applied to a range, a CPU id above :data:`MAX_CPU_ID`,
    anything that is not an ASCII number, or a set that ends up empty.
    """
    if not spec.strip():
        raise CpuSetSyntaxError("cpuset is empty")
    cpus: set[int] = set()
    for raw in spec.split(","):
        item = raw.strip()
        match = _ITEM.fullmatch(item)
        if match is None:
            raise CpuSetSyntaxError(f"cpuset {spec!r}: bad item {item!r}")
        negate, first_text, last_text = match.groups()
        first = _cpu_id(first_text, spec)
        if negate:
            if last_text is not None:
                raise CpuSetSyntaxError(f"cpuset {spec!r}: exclusion {item!r} must name one CPU")
            cpus.discard(first)
            continue
        last = first if last_text is None else _cpu_id(last_text, spec)
        if last < first:
            raise CpuSetSyntaxError(f"cpuset {spec!r}: reversed range {item!r}")
        cpus.update(range(first, last + 1))
    if not cpus:
        raise CpuSetSyntaxError(f"cpuset {spec!r} selects no CPU")
    return frozenset(cpus)


def format_cpuset(cpus: Iterable[int]) -> str:
    """Render CPUs in the shortest libvirt form: ``{0, 1, 3, 8}`` -> ``"0-1,3,8"``.

    Every run of two or more consecutive ids becomes a range. An empty set renders as
    ``""`` (which :func:`parse_cpuset` rejects: there is no empty cpuset in libvirt).
    Raises ``ValueError`` for a negative id.
    """
    ordered = sorted(set(cpus))
    if ordered and ordered[0] < 0:
        raise ValueError(f"negative CPU id {ordered[0]}")
    parts: list[str] = []
    index = 0
    while index < len(ordered):
        start = ordered[index]
        end = start
        while index + 1 < len(ordered) and ordered[index + 1] == end + 1:
            index += 1
            end = ordered[index]
        parts.append(str(start) if start == end else f"{start}-{end}")
        index += 1
    return ",".join(parts)
