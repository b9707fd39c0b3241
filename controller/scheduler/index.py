"""``HostIndex``: the fleet kept sorted between placements, so a decision need not walk it.

The caller owns one index per process and upserts a :class:`HostState` whenever what the
scheduler sees of a host changes (claim, report, operator state, heartbeat status). The
index never reads a clock: ``up`` is whatever the last upsert said, so the caller's
liveness sweep must upsert a host when it decides the host went down or came back (the
same decision it makes today when it builds ``HostState.up`` for a snapshot).

What is kept, per upsert:

* every host, in first-upsert order (the order :meth:`HostIndex.snapshot` gives them,
  which is the order a refusal lists them in);
* the hosts that take VMs at all (``HostState.accepting``), bucketed by the static
  traits filters ask about (hardware acceleration, networks, bridges), each bucket with
  one list per resource of ``(free amount, host id)`` sorted ascending, and the host
  ids sorted: the free amount is the raw value of the resource weighers, so walking a
  list from either end visits hosts in the order spread or pack prefers them;
* the two aggregates of the N+1 rule (free totals over schedulable hosts and the up
  hosts ordered by memory in use), so :meth:`HostIndex.headroom` costs no walk either.

Sorted lists are plain ``list`` + :mod:`bisect`: at 10,000 entries an insertion moves
80 kB with one ``memmove`` (microseconds), and the stdlib needs neither a dependency nor
type stubs (``sortedcontainers`` is only in the venv as hypothesis' dependency).
"""

from __future__ import annotations

import heapq
from bisect import bisect_left, insort
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

from controller.scheduler.filters import N_PLUS_ONE_RESOURCES, Headroom, fullness_key, hw_accelerated
from controller.scheduler.model import (
    FleetSnapshot,
    HostState,
    PlacementRequest,
    ResourceClass,
    ServerGroup,
)

__all__ = ["DEFAULT_TRACKED", "CandidateLists", "HostIndex"]

#: (hardware accelerated, networks, bridges): the static traits a bucket shares.
_Key = tuple[bool, frozenset[str], frozenset[str]]
_Entry = tuple[int, str]  # (raw weigher value, host id)

#: Above this many matching buckets, or when they hold most accepting hosts, walking the
#: fleet-wide lists (and letting the filters reject the rest) beats merging many lists.
_MAX_MERGED_BUCKETS = 16
_MERGE_SHARE = 0.8

#: Resources kept sorted from the start: the ones the default policy weighs. Others get
#: their lists the first time a policy weighs them (each list costs every upsert ~2 µs).
DEFAULT_TRACKED: tuple[ResourceClass, ...] = (
    ResourceClass.VCPU,
    ResourceClass.MEMORY_MIB,
    ResourceClass.DISK_GIB,
)


class _Bucket:
    """Accepting hosts that share a :data:`_Key`, sorted per tracked resource and by id."""

    __slots__ = ("by_value", "ids")

    def __init__(self, resources: Iterable[ResourceClass]) -> None:
        self.by_value: dict[ResourceClass, list[_Entry]] = {rc: [] for rc in resources}
        self.ids: list[str] = []

    def track(self, resource: ResourceClass, hosts: Mapping[str, HostState]) -> None:
        entries = [(hosts[host_id].free.get(resource, 0), host_id) for host_id in self.ids]
        entries.sort()
        self.by_value[resource] = entries

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, host: HostState) -> None:
        host_id, free = host.host_id, host.free
        for resource, entries in self.by_value.items():
            # A host without inventory of a resource weighs as 0 free (as score_hosts does).
            insort(entries, (free.get(resource, 0), host_id))
        insort(self.ids, host_id)

    def discard(self, host: HostState) -> None:
        host_id, free = host.host_id, host.free
        for resource, entries in self.by_value.items():
            del entries[bisect_left(entries, (free.get(resource, 0), host_id))]
        del self.ids[bisect_left(self.ids, host_id)]


def _key(host: HostState) -> _Key:
    return (hw_accelerated(host), host.networks, host.bridges)


def _walk(entries: list[_Entry], descending: bool, at_least: int) -> Iterator[_Entry]:
    # Entries below at_least cannot pass the resource filter: never yield them.
    start = bisect_left(entries, (at_least,)) if at_least > 0 else 0
    if descending:
        return _descending(entries, start)
    return map(entries.__getitem__, range(start, len(entries)))


def _descending(entries: list[_Entry], start: int) -> Iterator[_Entry]:
    """Largest amount first, equal amounts in ascending host id order: the order in which the
    scheduler breaks ties, so a walk can stop inside a run of equal hosts (see indexed.py)."""
    end = len(entries)
    while end > start:
        amount = entries[end - 1][0]
        run = max(start, bisect_left(entries, (amount,), start, end))
        yield from entries[run:end]
        end = run


def _best_first(entry: _Entry) -> tuple[int, str]:
    return (-entry[0], entry[1])


@dataclass(frozen=True, slots=True)
class CandidateLists:
    """Sorted walks over the accepting hosts whose static traits can match a request.

    A superset of the hosts that can pass: callers still run every filter. The iterators
    read the index's lists in place, so consume them before the next upsert or remove.
    """

    buckets: tuple[_Bucket, ...]

    def __len__(self) -> int:
        return sum(len(bucket) for bucket in self.buckets)

    def by_value(self, resource: ResourceClass, *, descending: bool, at_least: int = 0) -> Iterator[_Entry]:
        """``(free amount, host id)`` in ascending (or descending) free order, skipping
        hosts with less than ``at_least`` free (ties: in ascending host id order, both ways)."""
        walks = [_walk(bucket.by_value[resource], descending, at_least) for bucket in self.buckets]
        if len(walks) == 1:
            return walks[0]
        return heapq.merge(*walks, key=_best_first) if descending else heapq.merge(*walks)

    def by_id(self) -> Iterator[str]:
        """Host ids in ascending order."""
        walks = [iter(bucket.ids) for bucket in self.buckets]
        if len(walks) == 1:
            return walks[0]
        return heapq.merge(*walks)


class HostIndex:
    """The fleet as the scheduler sees it, maintained incrementally (see the module doc).

    Not thread-safe: the caller serialises upserts, removes and placements (one lock or
    one thread per process), as it already does for a snapshot it builds.
    """

    def __init__(self, hosts: Iterable[HostState] = ()) -> None:
        self._hosts: dict[str, HostState] = {}
        self._tracked: list[ResourceClass] = list(DEFAULT_TRACKED)
        self._buckets: dict[_Key, _Bucket] = {}
        self._all = _Bucket(self._tracked)
        self._matches: dict[tuple[bool, frozenset[str], frozenset[str]], CandidateLists] = {}
        # N+1 aggregates: free per N_PLUS_ONE_RESOURCES over schedulable hosts (clamped
        # at 0) and the fullness keys of up hosts, fullest first.
        self._free_total = [0] * len(N_PLUS_ONE_RESOURCES)
        self._fullness: list[tuple[int, str]] = []
        #: Bumped by every upsert and remove: lets a caller tell whether anything changed.
        self.generation = 0
        for host in hosts:
            self.upsert(host)

    def __len__(self) -> int:
        return len(self._hosts)

    def __contains__(self, host_id: object) -> bool:
        return host_id in self._hosts

    def get(self, host_id: str) -> HostState | None:
        """The last state upserted for ``host_id``, or ``None``."""
        return self._hosts.get(host_id)

    @property
    def lookup(self) -> Callable[[str], HostState | None]:
        """:meth:`get` without the method call (for loops that look up thousands of ids)."""
        return self._hosts.get

    @property
    def hosts(self) -> tuple[HostState, ...]:
        """Every host, in first-upsert order."""
        return tuple(self._hosts.values())

    def snapshot(self, server_groups: Iterable[ServerGroup] = (), now: float | None = None) -> FleetSnapshot:
        """A :class:`FleetSnapshot` of the whole fleet (for :func:`place` and explanations)."""
        return FleetSnapshot(hosts=self.hosts, server_groups=tuple(server_groups), now=now)

    def upsert(self, state: HostState) -> None:
        """Add ``state`` or replace the host's previous state (it keeps its position)."""
        old = self._hosts.get(state.host_id)
        if old is not None:
            self._unindex(old)
        self._hosts[state.host_id] = state
        self._index(state)
        self.generation += 1

    def remove(self, host_id: str) -> None:
        """Forget ``host_id`` (a no-op for an unknown one: removal is idempotent)."""
        old = self._hosts.pop(host_id, None)
        if old is not None:
            self._unindex(old)
            self.generation += 1

    def candidates(
        self,
        *,
        needs_hw_virt: bool,
        networks: frozenset[str],
        bridges: frozenset[str],
        weighed: Iterable[ResourceClass] = (),
    ) -> CandidateLists:
        """The lists to walk for a request with these static needs (see :class:`CandidateLists`).

        ``weighed``: the resources whose lists will be walked; a resource not kept sorted
        yet is sorted now and maintained from then on.
        """
        for resource in weighed:
            if resource not in self._tracked:
                self._tracked.append(resource)
                for bucket in (*self._buckets.values(), self._all):
                    bucket.track(resource, self._hosts)
        wanted = (needs_hw_virt, networks, bridges)
        found = self._matches.get(wanted)
        if found is None:
            matching = tuple(
                bucket
                for (accelerated, nets, brs), bucket in self._buckets.items()
                if (accelerated or not needs_hw_virt) and networks <= nets and bridges <= brs
            )
            if len(matching) > _MAX_MERGED_BUCKETS:
                matching = (self._all,)
            found = CandidateLists(matching)
            self._matches[wanted] = found
        if len(found.buckets) > 1 and len(found) >= _MERGE_SHARE * len(self._all):
            # Decided per call: bucket sizes change with every upsert, the match does not.
            return CandidateLists((self._all,))
        return found

    def headroom(self, request: PlacementRequest) -> Headroom:
        """:meth:`Headroom.of` over the whole fleet, from the maintained aggregates."""
        fullest = tuple(self._hosts[host_id] for _, host_id in self._fullness[:2])
        return Headroom.from_totals(tuple(self._free_total), fullest, request)

    def _index(self, host: HostState) -> None:
        if host.accepting:
            key = _key(host)
            bucket = self._buckets.get(key)
            if bucket is None:
                bucket = self._buckets[key] = _Bucket(self._tracked)
                self._matches.clear()  # a new bucket may match requests already cached
            bucket.add(host)
            self._all.add(host)
        self._count_n_plus_one(host, 1)

    def _unindex(self, host: HostState) -> None:
        if host.accepting:
            key = _key(host)
            bucket = self._buckets[key]
            bucket.discard(host)
            self._all.discard(host)
            if not bucket:
                del self._buckets[key]
                self._matches.clear()
        self._count_n_plus_one(host, -1)

    def _count_n_plus_one(self, host: HostState, sign: int) -> None:
        # Mirrors Headroom.of: sums over schedulable hosts, fullness over up hosts.
        if not host.up:
            return
        if host.enabled and not host.maintenance:
            free = host.free
            for position, resource in enumerate(N_PLUS_ONE_RESOURCES):
                self._free_total[position] += sign * max(0, free.get(resource, 0))
        key = fullness_key(host)
        if sign > 0:
            insort(self._fullness, key)
        else:
            del self._fullness[bisect_left(self._fullness, key)]
