"""``place_indexed()``: the decision of :func:`~controller.scheduler.place.place`, from a
:class:`~controller.scheduler.index.HostIndex`, looking at the best hosts only.

Why a plain "sort by free capacity" is not enough: the weighers normalise each resource
over the *candidate set* (min-max over the hosts that pass the filters) and add the
columns, so a host's score is ``sum_r m_r * (free_r - low_r) / (high_r - low_r)``: the
order depends on the request. The search therefore runs in two steps:

1. **Bounds.** For every weighed resource, walk its sorted list from each end until the
   first host that passes every filter: those hosts hold ``low_r`` and ``high_r``. With
   them every candidate's score is the exact float :func:`score_hosts` would give it
   (:class:`~controller.scheduler.weighers.Column`). A soft server group's column is
   bounded from its members (few) and whether any non-member passes.
2. **Threshold algorithm** (Fagin et al.). Walk the resource lists best-first in round
   robin, filtering and scoring each newly seen host; the score of any host not seen yet
   is at most the sum of the weights at the cursors. Stop once the ``k``-th best score
   seen is strictly above that bound, ``k`` being what the decision needs
   (:func:`~controller.scheduler.place.ranked_limit`). Group members are scored up front
   so that every unseen host has the same, known group weight.

The result is the same ``host_id``, ``alternates``, ``pcpus`` and ``ranked`` (scores
included) as :func:`place` on ``index.snapshot()``; only ``Placement.rejections`` stays
empty, since rejected hosts are mostly never looked at. Full walks remain where they are
cheap or rare:

* a refusal (no host passes): :func:`place` over the whole snapshot, so the refusal and
  its per-host reasons are exactly today's (the rare path; it costs the full walk);
* ``policy.max_ranked=None`` (rank everything): the full walk;
* ``--host`` and hard affinity with members: only those hosts can pass, so they are
  filtered and weighed directly.

Cost: many exact ties at the top (hundreds of identical empty hosts) keep the bound
equal to the k-th score until the cursors pass the tie, so the walk grows towards the
tie's size; it stays correct.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Callable, Iterable, Iterator

from controller.scheduler.filters import FilterContext, Headroom, make_context, passes
from controller.scheduler.index import CandidateLists, HostIndex
from controller.scheduler.model import (
    GroupPolicy,
    HostState,
    Placement,
    PlacementPolicy,
    PlacementRequest,
    Refusal,
    ResourceClass,
    ServerGroup,
    Strategy,
    UnknownServerGroupError,
)
from controller.scheduler.place import decide, place, ranked_limit
from controller.scheduler.weighers import SOFT_GROUP_WEIGHER, Column, Scores, score_hosts

__all__ = ["place_indexed"]

_DEFAULT_POLICY = PlacementPolicy()


def place_indexed(
    index: HostIndex,
    request: PlacementRequest,
    policy: PlacementPolicy = _DEFAULT_POLICY,
    *,
    server_groups: Iterable[ServerGroup] = (),
    now: float | None = None,
    rng: random.Random | None = None,
) -> Placement | Refusal:
    """:func:`place` over ``index.snapshot(server_groups, now)``, without walking the fleet.

    Same arguments and result as :func:`place` (see the module docstring for the one
    difference, ``Placement.rejections``). ``server_groups`` needs only the request's group;
    ``now`` is used only to explain a refusal. Raises
    :class:`~controller.scheduler.model.UnknownServerGroupError` for an unknown group.
    """
    groups = tuple(server_groups)
    group = _find_group(groups, request.group)
    limit = ranked_limit(policy)
    if limit is None:
        return place(index.snapshot(groups, now), request, policy, rng=rng)
    search = _Search(index, make_context(request, group, now), policy, limit)
    scores = search.explicit() if search.universe is not None else search.threshold()
    if scores is None:
        # Nobody passes: the refusal must name every host and rule, which only the full
        # walk knows; refusals are rare, so they pay for it.
        return place(index.snapshot(groups, now), request, policy, rng=rng)
    return decide(scores, request, policy, rng=rng)


def _find_group(groups: tuple[ServerGroup, ...], name: str | None) -> ServerGroup | None:
    if name is None:
        return None
    for group in groups:
        if group.name == name:
            return group
    raise UnknownServerGroupError(f"server group {name!r} is not in the snapshot")


class _Search:
    """State of one decision: the filter verdicts seen so far and the weigher columns."""

    def __init__(self, index: HostIndex, ctx: FilterContext, policy: PlacementPolicy, limit: int) -> None:
        self.index = index
        self.ctx = ctx
        self.policy = policy
        self.limit = limit
        self.headroom: Headroom | None = index.headroom(ctx.request) if policy.n_plus_one else None
        self.verdicts: dict[str, bool] = {}
        request, group = ctx.request, ctx.group
        # Hosts that alone can pass, when the request names them: no search needed.
        self.universe: tuple[str, ...] | None = None
        if request.force_host is not None:
            self.universe = (request.force_host,)
        elif group is not None and group.policy is GroupPolicy.AFFINITY and group.members:
            self.universe = tuple(group.members)

    def ok(self, host: HostState) -> bool:
        """``host`` passes every filter and N+1 (memoised: walks meet hosts repeatedly)."""
        verdict = self.verdicts.get(host.host_id)
        if verdict is None:
            verdict = passes(host, self.ctx) and (self.headroom is None or not self.headroom.check(host))
            self.verdicts[host.host_id] = verdict
        return verdict

    def explicit(self) -> Scores | None:
        """Filter and weigh the named hosts, exactly as :func:`place` would."""
        assert self.universe is not None
        found = (self.index.get(host_id) for host_id in self.universe)
        passed = [host for host in found if host is not None and self.ok(host)]
        return score_hosts(passed, self.ctx.group, self.policy) if passed else None

    def threshold(self) -> Scores | None:
        """Bounds, then the threshold algorithm (module docstring); ``None``: nobody passes."""
        request, group, policy = self.ctx.request, self.ctx.group, self.policy
        lists = self.index.candidates(
            needs_hw_virt=request.needs_hw_virt,
            networks=request.networks,
            bridges=request.bridges,
            weighed=[rc for rc, multiplier in policy.multipliers.items() if multiplier != 0],
        )
        prefer_free = policy.strategy is Strategy.SPREAD
        columns: list[Column] = []
        any_passing: HostState | None = None
        for resource in sorted(policy.multipliers):
            multiplier = policy.multipliers[resource]
            if multiplier == 0:
                continue
            at_least = request.resources.get(resource, 0)
            low = self._first_passing(lists.by_value(resource, descending=False, at_least=at_least))
            if low is None:
                return None
            high = self._first_passing(lists.by_value(resource, descending=True, at_least=at_least))
            assert high is not None  # the low walk found one
            any_passing = low
            name = resource.value.lower()
            columns.append(
                Column(name, _free(low, resource), _free(high, resource), multiplier, prefer_free, resource)
            )
        members: dict[str, int] = {}
        if group is not None and group.policy in SOFT_GROUP_WEIGHER and policy.group_multiplier:
            column, members = self._group_column(group, lists, any_passing)
            if column is None:
                return None
            columns.append(column)
        elif any_passing is None and self._first_passing_id(lists.by_id(), {}) is None:
            return None  # no resource is weighed, and no host passes
        return self._top(lists, columns, members)

    def _first_passing(self, walk: Iterator[tuple[int, str]]) -> HostState | None:
        get = self.index.get
        for _, host_id in walk:
            host = get(host_id)
            if host is not None and self.ok(host):
                return host
        return None

    def _first_passing_id(self, walk: Iterator[str], skip: dict[str, int]) -> HostState | None:
        get = self.index.get
        for host_id in walk:
            if host_id in skip:
                continue
            host = get(host_id)
            if host is not None and self.ok(host):
                return host
        return None

    def _group_column(
        self, group: ServerGroup, lists: CandidateLists, any_passing: HostState | None
    ) -> tuple[Column | None, dict[str, int]]:
        """The soft group weigher's column and the passing members' counts."""
        members = group.members
        counts: dict[str, int] = {}
        for host_id, count in members.items():
            host = self.index.get(host_id)
            if host is not None and self.ok(host):
                counts[host_id] = count
        outsider = any_passing is not None and any_passing.host_id not in members
        if not outsider:
            outsider = self._first_passing_id(lists.by_id(), dict(members)) is not None
        raw = [*counts.values(), *([0] if outsider else [])]
        if not raw:
            return None, counts
        column = Column(
            SOFT_GROUP_WEIGHER[group.policy],
            min(raw),
            max(raw),
            self.policy.group_multiplier,
            group.policy is GroupPolicy.SOFT_AFFINITY,
        )
        return column, counts

    def _threshold_walk(
        self,
        walkers: list[tuple[int, Column, Iterator[tuple[int, str]]]],
        bound: list[float],
        score: Callable[[HostState], float],
        scored: dict[str, float],
        seen: set[str],
    ) -> None:
        """Round robin over the walked columns until no unseen host can enter the top."""
        limit, get, verdicts, ok = self.limit, self.index.lookup, self.verdicts, self.ok
        best: list[float] = []  # min-heap of the best `limit` scores seen
        for value in scored.values():
            _keep(best, value, limit)
        cursors = [0] * len(walkers)
        last_ids = [""] * len(walkers)
        while True:
            for turn, (_, _, walk) in enumerate(walkers):
                entry = next(walk, None)
                if entry is None:
                    return  # every host that can pass has been seen
                cursors[turn], host_id = entry
                last_ids[turn] = host_id
                if host_id in seen:
                    continue
                seen.add(host_id)
                host = get(host_id)
                if host is None:
                    continue
                # Score first, filter after: a host scoring below the k-th best cannot
                # enter the top whether it passes or not, so most hosts skip the filters
                # (its score is exact only if it passes, which is when it counts). Equal
                # scores are filtered: the host id may break the tie in its favour.
                value = score(host)
                if (len(best) < limit or value >= best[0]) and (verdicts.get(host_id) or ok(host)):
                    scored[host_id] = value
                    _keep(best, value, limit)
            if len(best) >= limit:
                for turn, (position, column, _) in enumerate(walkers):
                    bound[position] = column.weight(cursors[turn])
                # Strictly above: an unseen host scoring exactly the bound could still win
                # the tie on its host id.
                reachable = math.fsum(bound)
                if best[0] > reachable:
                    return
                if best[0] == reachable and _tie_settled(scored, limit, max(last_ids)):
                    return

    def _top(self, lists: CandidateLists, columns: list[Column], members: dict[str, int]) -> Scores:
        """The best ``limit`` candidates (at least), scored with ``columns``."""
        limit, get = self.limit, self.index.get
        score = _scorer(columns, members)
        scored: dict[str, float] = {}
        for host_id in members:  # pre-scored so every unseen host is a non-member
            host = get(host_id)
            assert host is not None
            scored[host_id] = score(host)
        seen = set(members)
        request = self.ctx.request
        walkers = [
            (
                position,
                column,
                lists.by_value(
                    column.resource,
                    descending=column.increasing,
                    at_least=request.resources.get(column.resource, 0),
                ),
            )
            for position, column in enumerate(columns)
            if column.resource is not None and not column.constant
        ]
        # What an unseen host scores in each column at best: its exact weight in the
        # constant ones and the group's (0 members), the cursor's weight in the walked ones.
        bound = [column.weight(0) if column.resource is None else 0.0 for column in columns]
        if walkers:
            self._threshold_walk(walkers, bound, score, scored, seen)
        else:
            # Every unseen host scores the same: the first ones by id win the ties.
            same = math.fsum(bound)
            for host_id in lists.by_id():
                if len(scored) - len(members) >= limit:
                    break
                host = None if host_id in seen else get(host_id)
                if host is not None and self.ok(host):
                    scored[host_id] = same
        top = heapq.nsmallest(limit, scored, key=lambda host_id: (-scored[host_id], host_id))
        hosts = [get(host_id) for host_id in top]
        return _scores([host for host in hosts if host is not None], columns, members)


def _free(host: HostState, resource: ResourceClass) -> int:
    return host.free.get(resource, 0)


def _scorer(columns: list[Column], members: dict[str, int]) -> Callable[[HostState], float]:
    """A host's total score: :meth:`Column.weight` of each column, unrolled for the hot loop
    (same expressions, so the same floats), summed in the same order as score_hosts."""
    terms = tuple((c.resource, c.low, c.high, c.scale, c.prefer_high) for c in columns)
    fsum = math.fsum

    def score(host: HostState) -> float:
        free = host.free
        weights = []
        for resource, low, high, scale, prefer_high in terms:
            value = members.get(host.host_id, 0) if resource is None else free.get(resource, 0)
            weights.append((value - low) * scale if prefer_high else (high - value) * scale)
        return fsum(weights)

    return score


def _tie_settled(scored: dict[str, float], limit: int, furthest_id: str) -> bool:
    """Whether no unseen host can win a tie with the last of the top ``limit``.

    An unseen host scoring exactly the bound sits, in every walked list, at the cursor's
    amount and after the cursor; the lists walk equal amounts in ascending host id order, so
    its id is above every cursor's id. If the last of the top is not above the furthest
    cursor's id, such a host loses the tie (host ids break ties in ascending order).
    """
    last = heapq.nsmallest(limit, scored, key=lambda host_id: (-scored[host_id], host_id))[-1]
    return last <= furthest_id


def _keep(best: list[float], score: float, limit: int) -> None:
    if len(best) < limit:
        heapq.heappush(best, score)
    elif score > best[0]:
        heapq.heapreplace(best, score)


def _scores(hosts: list[HostState], columns: list[Column], members: dict[str, int]) -> Scores:
    """:class:`Scores` of ``hosts`` with columns normalised over the whole candidate set."""
    table: list[tuple[str, tuple[float, ...]]] = []
    for column in columns:
        table.append((column.name, tuple(column.weight(column.raw(host, members)) for host in hosts)))
    totals: tuple[float, ...] = (0.0,) * len(hosts)
    if table:
        totals = tuple(map(math.fsum, zip(*(values for _, values in table), strict=True)))
    return Scores(hosts=tuple(hosts), totals=totals, columns=tuple(table))
