"""The choice of concrete dedicated CPUs (pure). CPU set syntax is :mod:`common.cpuset`."""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["pick_pcpus"]

#: Cell used for CPUs whose NUMA node is unknown: they are grouped together so they are
#: never mixed into a real cell's "local" pick.
UNKNOWN_CELL = -1


def _cells(free: frozenset[int], numa: Mapping[int, int]) -> dict[int, list[int]]:
    cells: dict[int, list[int]] = {}
    for cpu in sorted(free):
        cells.setdefault(numa.get(cpu, UNKNOWN_CELL), []).append(cpu)
    return cells


def pick_pcpus(
    free: frozenset[int],
    numa: Mapping[int, int],
    count: int,
    prefer_numa_local: bool,
) -> tuple[int, ...] | None:
    """Choose ``count`` distinct CPUs from ``free``; ``None`` if there are too few.

    With ``prefer_numa_local`` the pick stays within one NUMA cell when some cell can hold
    all of them (the cell with the fewest free CPUs that still fits, so large cells stay
    whole for large requests); otherwise it spans the fewest cells possible. Without it,
    or inside the chosen cells, the lowest CPU ids win. The result is sorted, a subset of
    ``free`` and deterministic for the same inputs. CPUs missing from ``numa`` count as
    one separate cell.
    """
    if count <= 0:
        return ()
    if count > len(free):
        return None
    if not prefer_numa_local:
        return tuple(sorted(free)[:count])
    cells = _cells(free, numa)
    # Fewest cells: take the largest cells first (ties: lowest cell id). Whichever cell
    # completes the pick may be swapped for the smallest one that still covers the rest,
    # which keeps the cell count minimal and leaves bigger cells intact.
    by_size = sorted(cells, key=lambda cell: (-len(cells[cell]), cell))
    chosen: list[int] = []
    remaining = count
    for position, cell in enumerate(by_size):
        if len(cells[cell]) >= remaining:
            rest = by_size[position:]
            best = min(
                (c for c in rest if len(cells[c]) >= remaining),
                key=lambda c: (len(cells[c]), c),
            )
            chosen.extend(cells[best][:remaining])
            return tuple(sorted(chosen))
        chosen.extend(cells[cell])
        remaining -= len(cells[cell])
    # Unreachable: count <= len(free) guarantees the loop completes the pick.
    return None  # pragma: no cover
