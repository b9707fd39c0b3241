"""Soft preferences: rank the hosts that passed every filter.

Like Nova, each weigher yields a raw value per candidate, normalised to 0..1 over the
candidate set (min-max; all equal -> 0 for everyone, so a weigher that cannot tell hosts
apart does not move the ranking), then multiplied. A host's score is the sum; higher is
better and ties go to the lowest host id so the result never depends on input order.

* resource weighers (one per resource with a non-zero multiplier): the free amount
  (capacity - used, in the resource's unit). ``spread`` prefers the most free,
  ``pack`` the least free.
* group weigher, for soft-affinity (prefer hosts with more of the group's VMs) and
  soft-anti-affinity (prefer hosts with fewer).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from controller.scheduler.model import (
    Candidate,
    FrozenMap,
    GroupPolicy,
    HostState,
    PlacementPolicy,
    ResourceClass,
    ServerGroup,
    Strategy,
)

__all__ = ["SOFT_GROUP_WEIGHER", "Column", "Scores", "normalise", "rank", "score_hosts"]

#: The soft group policies and the name of their weigher column.
SOFT_GROUP_WEIGHER: FrozenMap[GroupPolicy, str] = FrozenMap(
    {
        GroupPolicy.SOFT_AFFINITY: "soft_affinity",
        GroupPolicy.SOFT_ANTI_AFFINITY: "soft_anti_affinity",
    }
)


def normalise(raw: Sequence[float], multiplier: float, prefer_high: bool) -> list[float]:
    """Min-max normalise ``raw`` to 0..1 (1 = most preferred) and scale by ``multiplier``."""
    low, high = min(raw), max(raw)
    if high == low:
        return [0.0] * len(raw)
    scale = multiplier / (high - low)  # one multiplication per value in the loops below
    # Column.weight repeats these two expressions: the indexed search must produce the
    # very same floats for a host without seeing the whole candidate set.
    if prefer_high:
        return [(value - low) * scale for value in raw]
    return [(high - value) * scale for value in raw]


@dataclass(frozen=True, slots=True)
class Column:
    """One weigher normalised over a candidate set known only by its bounds.

    ``weight(v)`` equals what :func:`normalise` gives a candidate with raw value ``v``
    when ``low``/``high`` are the min/max of the set's raw values, bit for bit, so a
    search that finds the bounds first can score hosts one at a time.
    """

    name: str
    low: int
    high: int
    multiplier: float
    prefer_high: bool
    #: whose free amount is the raw value; ``None`` for the group weigher (member count)
    resource: ResourceClass | None = None
    #: ``multiplier / (high - low)``, or 0.0 when every candidate weighs the same
    scale: float = field(init=False, compare=False)

    def __post_init__(self) -> None:
        scale = 0.0 if self.high == self.low else self.multiplier / (self.high - self.low)
        object.__setattr__(self, "scale", scale)

    def raw(self, host: HostState, members: Mapping[str, int]) -> int:
        """``host``'s raw value for this weigher (``members``: the group's counts)."""
        if self.resource is None:
            return members.get(host.host_id, 0)
        return host.free.get(self.resource, 0)

    @property
    def constant(self) -> bool:
        """Every candidate gets 0.0 (the weigher cannot tell them apart)."""
        return self.high == self.low

    @property
    def increasing(self) -> bool:
        """Whether the weight grows with the raw value (the best hosts have the largest)."""
        return self.prefer_high == (self.multiplier > 0)

    def weight(self, value: int) -> float:
        """The normalised, scaled weight of raw ``value``.

        Exact for candidates (``low <= value <= high``; a constant column gives
        ``0 * 0.0 = 0.0``); for other values it is still monotonic in ``value``, which is
        all a bound needs.
        """
        if self.prefer_high:
            return (value - self.low) * self.scale
        return (self.high - value) * self.scale


@dataclass(frozen=True, slots=True)
class Scores:
    """Scores of a candidate list: ``totals[i]`` for ``hosts[i]``, ``columns`` per weigher."""

    hosts: tuple[HostState, ...]
    totals: tuple[float, ...]
    columns: tuple[tuple[str, tuple[float, ...]], ...]

    def candidate(self, index: int) -> Candidate:
        """The :class:`Candidate` at ``index`` with its per-weigher breakdown."""
        weights = FrozenMap((name, column[index]) for name, column in self.columns)
        return Candidate(self.hosts[index].host_id, self.totals[index], weights)


def score_hosts(
    hosts: Sequence[HostState],
    group: ServerGroup | None,
    policy: PlacementPolicy,
) -> Scores:
    """Weigh every candidate; ``hosts`` must be non-empty."""
    prefer_free = policy.strategy is Strategy.SPREAD
    columns: list[tuple[str, tuple[float, ...]]] = []
    for resource in sorted(policy.multipliers):
        multiplier = policy.multipliers[resource]
        if multiplier == 0:
            continue
        # A host without inventory of a resource has none of it free.
        raw = [host.free.get(resource, 0) for host in hosts]
        columns.append((resource.value.lower(), tuple(normalise(raw, multiplier, prefer_free))))
    if group is not None and group.policy in SOFT_GROUP_WEIGHER and policy.group_multiplier:
        members = group.members
        raw = [members.get(host.host_id, 0) for host in hosts]
        prefer_more = group.policy is GroupPolicy.SOFT_AFFINITY
        weights = normalise(raw, policy.group_multiplier, prefer_more)
        columns.append((SOFT_GROUP_WEIGHER[group.policy], tuple(weights)))
    totals: tuple[float, ...] = (0.0,) * len(hosts)
    if columns:
        totals = tuple(map(math.fsum, zip(*(column for _, column in columns), strict=True)))
    return Scores(hosts=tuple(hosts), totals=totals, columns=tuple(columns))


def rank(scores: Scores, limit: int | None) -> list[int]:
    """Indices of the best ``limit`` candidates (all if ``None``), best first.

    Order: higher score first, then lower host id. Only the head is sorted when a limit
    is given, which matters at 10,000 candidates.
    """
    hosts = scores.hosts
    # Plain tuples compare in C; a key function would be a Python call per candidate.
    keyed = [(-total, hosts[index].host_id, index) for index, total in enumerate(scores.totals)]
    if limit is None or limit >= len(keyed):
        keyed.sort()
    else:
        keyed = heapq.nsmallest(limit, keyed)
    return [index for _, _, index in keyed]
