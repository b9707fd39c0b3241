"""The controller's in-memory view of the fleet: what every placement decision reads.

A create used to read and decode every host (and every VM each host reported) from the
database; at a thousand hosts that was half of the create path. :class:`FleetState` keeps
one :class:`~controller.db.repository.HostRecord` per host (without its reported VMs, which
no decision needs) and the scheduler's :class:`~controller.scheduler.model.HostState`
derived from it, and is kept current three ways:

* this controller's own writes: a claim hands over the host as it wrote it
  (:meth:`FleetState.upsert`), a report refreshes its host in the report's transaction;
* heartbeats are kept here (:meth:`FleetState.beat`) and flushed to the database in one
  batched UPDATE every few seconds (:meth:`FleetState.flush_heartbeats`), so they never
  wait behind a create's transaction;
* other controllers' writes: :meth:`FleetState.sync` compares each host's ``generation``
  and ``updated_at`` with the database (two integers and two floats a host) and reloads
  the hosts that changed. Every change to a host's allocations or settings bumps its
  generation, so nothing is missed for longer than one sync interval.

Waiting calls to an agent subscribe to their host's going down (:meth:`FleetState.watch_down`):
the sweep that marks a host down runs their callbacks, so a wait ends when its host is declared
down, without any per-call polling (the sweep runs on every placement and every fleet sync).

The database stays the source of truth: a claim re-reads its one host under the host's
lock before it writes (see ``ControllerService._claim``), so a stale view can make a
decision worse for one sync interval, never wrong. A restart rebuilds the view from the
database (:meth:`FleetState.load`), so the next decision is the one the old process
would have made.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import replace
from typing import NamedTuple

import msgspec
from sqlalchemy.orm import Session

from common.codec import encode, to_wire
from common.messages.host import HostReport
from controller import fleet
from controller.config import ControllerConfig
from controller.db import repository as repo
from controller.scheduler.index import HostIndex
from controller.scheduler.indexed import place_indexed
from controller.scheduler.model import (
    FleetSnapshot,
    HostState,
    Placement,
    PlacementPolicy,
    PlacementRequest,
    Refusal,
)

#: an unchanged report is still written this often (it refreshes the host's last report time and
#: re-applies the VMs' states, whatever the controller wrote since)
REPORT_REWRITE_S = 300.0

#: a function opening one database transaction (``ControllerService.tx``)
Transaction = Callable[[], AbstractContextManager[Session]]


class _Written(NamedTuple):
    """The last report of a host that this controller wrote, and the host row as it left it."""

    digest: bytes
    at: float
    updated_at: float
    generation: int


class FleetState:
    """Every host's record and scheduler state, in memory, safe to use from many threads."""

    def __init__(self, tx: Transaction, config: ControllerConfig) -> None:
        self._tx = tx
        self._config = config
        self._lock = threading.Lock()
        self._records: dict[str, repo.HostRecord] = {}
        #: the scheduler's view of every host, kept sorted for placement (not thread-safe: _lock)
        self._index = HostIndex()
        #: no host can go down before this time (the oldest heartbeat of an up host + down_after_s)
        self._next_expiry = 0.0
        #: heartbeats received and not yet written: host -> time
        self._pending_beats: dict[str, float] = {}
        self._groups_fingerprint: tuple[object, ...] = ()
        #: per host: the last report written, and the host row then (see report_unchanged)
        self._reports: dict[str, _Written] = {}
        #: per host: (agent started_at, seq) of the newest report taken as a repeat (not written)
        self._repeats: dict[str, tuple[float, int]] = {}
        #: per host: claims held in memory by a batch whose transaction has not ended (see settle)
        self._held: dict[str, int] = {}
        #: per host: the callbacks of calls waiting on its agent, run when it is declared down
        self._down_watchers: dict[str, dict[int, Callable[[], None]]] = {}
        self._next_watch = 0

    # ------------------------------------------------------------------ loading

    def load(self, now: float) -> None:
        """Read the whole fleet from the database (start, and after a refusal to be sure)."""
        with self._tx() as s:
            records = repo.list_hosts(s, include_vms=False)
            fingerprint = repo.host_groups_fingerprint(s)
        with self._lock:
            beats = self._pending_beats
            self._records = {r.id: _with_beat(r, beats.get(r.id)) for r in records}
            self._index = HostIndex(self._state(r, now) for r in self._records.values())
            self._groups_fingerprint = fingerprint
            self._next_expiry = 0.0

    def sync(self, now: float) -> int:
        """Reload the hosts whose generation or row changed in the database since we read them
        (another controller's claims, an operator's change); returns how many were reloaded."""
        with self._tx() as s:
            markers = repo.host_markers(s)
            fingerprint = repo.host_groups_fingerprint(s)
            with self._lock:
                known = {h: (r.generation, r.updated_at) for h, r in self._records.items()}
                groups_changed = fingerprint != self._groups_fingerprint
                # A host with claims held by a batch not yet committed differs from the database
                # until the commit: re-reading it would drop those claims from memory, and the
                # next claims there would all lose their compare-and-set. The next sync looks.
                held = set(self._held)
            changed = [
                host_id
                for host_id, marker in markers.items()
                if host_id not in held
                and (groups_changed or known.get(host_id) != (marker.generation, marker.updated_at))
            ]
            records = repo.list_hosts(s, changed, include_vms=False) if changed else []
        with self._lock:
            for host_id in set(self._records) - set(markers):
                self._forget(host_id)
            for host_id, marker in markers.items():
                known_record = self._records.get(host_id)
                if known_record is not None and _newer(marker.last_heartbeat, known_record.last_heartbeat):
                    # Another controller took this host's heartbeat: it counts as ours.
                    self._put(replace(known_record, last_heartbeat=marker.last_heartbeat), now)
            for record in records:
                if record.id not in self._held:  # a batch took it meanwhile: its claims stand
                    self._put(_with_beat(record, self._pending_beats.get(record.id)), now)
            self._groups_fingerprint = fingerprint
        return len(records)

    def refresh(self, host_ids: Iterable[str], now: float) -> None:
        """Re-read these hosts from the database (after this controller changed them)."""
        wanted = sorted(set(host_ids))
        if not wanted:
            return
        with self._tx() as s:
            records = repo.list_hosts(s, wanted, include_vms=False)
        for record in records:
            self.upsert(record, now)
        with self._lock:
            for gone in set(wanted) - {r.id for r in records}:
                self._forget(gone)

    def upsert(self, record: repo.HostRecord, now: float) -> None:
        """Take a host as this controller just wrote it (inside or right after the transaction)."""
        with self._lock:
            self._put(_with_beat(record, self._pending_beats.get(record.id)), now)

    # ------------------------------------------------------------------ heartbeats

    def beat(self, host_id: str, now: float) -> bool:
        """Note a heartbeat in memory; False when the host is unknown (never reported)."""
        with self._lock:
            record = self._records.get(host_id)
            if record is None:
                return False
            self._pending_beats[host_id] = now
            record = replace(record, last_heartbeat=now)
            self._records[host_id] = record
            state = self._index.get(host_id)
            if state is not None and not state.up:  # it comes back: the scheduler must know
                self._index.upsert(self._state(record, now))
                # and the sweep must look again when this beat is too old (it may be the only
                # host up: nothing else would bring the next sweep forward)
                self._next_expiry = min(self._next_expiry, now + self._config.down_after_s)
        return True

    def flush_heartbeats(self) -> int:
        """Write the heartbeats received since the last flush in one batched UPDATE."""
        with self._lock:
            beats, self._pending_beats = self._pending_beats, {}
        if not beats:
            return 0
        try:
            with self._tx() as s:
                repo.record_heartbeats(s, beats)
        except BaseException:
            with self._lock:  # keep them for the next flush (newer beats win)
                for host_id, when in beats.items():
                    self._pending_beats.setdefault(host_id, when)
            raise
        return len(beats)

    # ------------------------------------------------------------------ down notifications

    def watch_down(self, host_id: str, down: Callable[[], None]) -> Callable[[], None]:
        """Run ``down()`` when ``host_id`` is declared down (at once when the last sweep found it
        down already); returns the unsubscribe. ``down`` runs under the fleet's lock: it must
        only signal (set an event or an abort), never call back into the fleet state.
        Subscribing and unsubscribing are O(1)."""
        with self._lock:
            state = self._index.get(host_id)
            if state is not None and not state.up:
                down()
                return lambda: None
            token = self._next_watch
            self._next_watch += 1
            self._down_watchers.setdefault(host_id, {})[token] = down

        def unsubscribe() -> None:
            with self._lock:
                watchers = self._down_watchers.get(host_id)
                if watchers is not None:
                    watchers.pop(token, None)
                    if not watchers:
                        del self._down_watchers[host_id]

        return unsubscribe

    def sweep(self, now: float) -> None:
        """Mark the hosts whose heartbeat is too old as down, telling their watchers (the fleet
        sync runs it, so a wait ends even when no placement happens)."""
        with self._lock:
            self._sweep(now)

    # ------------------------------------------------------------------ reports

    def report_unchanged(self, report: HostReport, digest: bytes, now: float) -> bool:
        """True when ``report`` (whose :func:`report_digest` is ``digest``) says what the last one
        this controller wrote said (counters and times aside), less than REPORT_REWRITE_S ago,
        and nobody wrote the host since: another controller's report changes the row's
        ``updated_at`` and any claim, release or move its ``generation`` (both seen here at once
        from this controller, at the next sync from another), so that a VM claimed or removed
        since is checked against what the host lists. Then it is only a heartbeat. Reports of
        idle hosts are most reports; each would otherwise be a write of the host and its VMs."""
        with self._lock:
            last = self._reports.get(report.host_id)
            record = self._records.get(report.host_id)
            repeat = (
                last is not None
                and record is not None
                and last.digest == digest
                and now - last.at < REPORT_REWRITE_S
                and (record.updated_at, record.generation) == (last.updated_at, last.generation)
            )
            if repeat:
                self._repeats[report.host_id] = (report.started_at, report.seq)
        return repeat

    def delta_overtaken(self, host_id: str, started_at: float, seq: int) -> bool:
        """True when a VM delta is older than a report of the same agent run taken as a repeat
        (the database's report seq did not move for it, so only the memory knows)."""
        with self._lock:
            newest = self._repeats.get(host_id)
        return newest is not None and newest[0] == started_at and seq < newest[1]

    def vms_changed(self, host_id: str) -> None:
        """VM rows of the host changed in a way no written report accounts for (a delta wrote them,
        or a report could not speak for some of them): its next full report is written, whatever
        it says."""
        with self._lock:
            self._reports.pop(host_id, None)

    def report_written(self, host_id: str, digest: bytes, now: float) -> None:
        """Note the report (its :func:`report_digest`) just written (see :meth:`report_unchanged`)."""
        with self._lock:
            record = self._records.get(host_id)
            if record is not None:
                self._reports[host_id] = _Written(digest, now, record.updated_at, record.generation)

    # ------------------------------------------------------------------ reading

    def record(self, host_id: str) -> repo.HostRecord | None:
        """The host as last known, heartbeat included (no reported VMs)."""
        with self._lock:
            return self._records.get(host_id)

    def freshen(self, record: repo.HostRecord) -> repo.HostRecord:
        """``record`` (read from the database) with the newest heartbeat this process knows:
        heartbeats reach the database in batches, so liveness is judged from memory."""
        with self._lock:
            known = self._records.get(record.id)
        return record if known is None else _with_beat(record, known.last_heartbeat)

    def records(self) -> list[repo.HostRecord]:
        """Every host, ordered by id."""
        with self._lock:
            return [r for _h, r in sorted(self._records.items())]

    def snapshot(self, now: float, groups: Iterable[repo.ServerGroupRecord] = ()) -> FleetSnapshot:
        """The whole fleet as the scheduler sees it at ``now`` (for explanations: a dry run)."""
        with self._lock:
            self._sweep(now)
            return self._index.snapshot(tuple(fleet.server_group(g) for g in groups), now)

    def place(
        self,
        request: PlacementRequest,
        policy: PlacementPolicy,
        now: float,
        groups: Iterable[repo.ServerGroupRecord] = (),
    ) -> tuple[Placement | Refusal, repo.HostRecord | None]:
        """Decide on the index: only the best candidates are looked at (see scheduler.indexed).

        With a placement comes the chosen host's record as the decision saw it: a claim whose
        compare-and-set on that record's generation succeeds knows the decision was made on
        exactly what the database holds (see ``ControllerService._claim``).
        """
        server_groups = tuple(fleet.server_group(g) for g in groups)
        with self._lock:
            self._sweep(now)
            result = place_indexed(self._index, request, policy, server_groups=server_groups, now=now)
            basis = self._records.get(result.host_id) if isinstance(result, Placement) else None
        return result, basis

    def place_batch(
        self,
        requests: Sequence[PlacementRequest],
        policy: PlacementPolicy,
        now: float,
        amounts: Callable[[PlacementRequest, Placement], Mapping[str, int]],
    ) -> list[tuple[Placement | Refusal, repo.HostRecord | None]]:
        """Decide several requests in one pass (no server groups), each on the index as the
        earlier ones left it.

        Each placement is held in memory at once: its host becomes the record its claim will
        write (``amounts(request, placement)`` added, the generation one up), so the next
        request of the batch sees the room the earlier ones took and a batch never fills a host
        past its capacity in memory. With each placement comes the host as that request saw it:
        what the claim compares-and-sets against (the first claim on a host, the batch's start;
        a later one, the generation after the earlier claims). A claim that is not written
        leaves memory too full until the host is re-read (:meth:`refresh`, or the next
        :meth:`sync`, which sees the generation differ): a worse decision, never a wrong one.
        The caller must :meth:`settle` the held claims when its transaction ends: until then
        :meth:`sync` leaves those hosts alone.
        """
        decided: list[tuple[Placement | Refusal, repo.HostRecord | None]] = []
        with self._lock:
            self._sweep(now)
            for request in requests:
                result = place_indexed(self._index, request, policy, server_groups=(), now=now)
                basis = self._records.get(result.host_id) if isinstance(result, Placement) else None
                if isinstance(result, Placement) and basis is not None:
                    claimed = replace(basis, generation=basis.generation + 1)
                    self._put(with_claim(claimed, amounts(request, result)), now)
                    self._held[result.host_id] = self._held.get(result.host_id, 0) + 1
                decided.append((result, basis))
        return decided

    def settle(self, held: Mapping[str, int]) -> None:
        """The batch that held these claims (host -> how many) committed or rolled back: the
        hosts are the database's again for :meth:`sync` (call before any :meth:`refresh`)."""
        with self._lock:
            for host_id, count in held.items():
                left = self._held.get(host_id, 0) - count
                if left > 0:
                    self._held[host_id] = left
                else:
                    self._held.pop(host_id, None)

    # ------------------------------------------------------------------ inside the lock

    def _sweep(self, now: float) -> None:
        """Mark hosts whose heartbeat is too old as down (the index never reads a clock).

        Costs a walk of the fleet only when some host may have expired since the last sweep.
        """
        if now < self._next_expiry:
            return
        down_after = self._config.down_after_s
        next_expiry = float("inf")
        for host_id, record in self._records.items():
            up = fleet.host_is_up(record, now, down_after)
            state = self._index.get(host_id)
            if state is not None and state.up != up:
                self._index.upsert(self._state(record, now))
                if not up:
                    for down in self._down_watchers.pop(host_id, {}).values():
                        down()
            if up and record.last_heartbeat is not None:
                next_expiry = min(next_expiry, record.last_heartbeat + down_after)
        self._next_expiry = next_expiry

    def _put(self, record: repo.HostRecord, now: float) -> None:
        self._records[record.id] = record
        self._index.upsert(self._state(record, now))
        if record.last_heartbeat is not None:
            self._next_expiry = min(self._next_expiry, record.last_heartbeat + self._config.down_after_s)

    def _forget(self, host_id: str) -> None:
        self._records.pop(host_id, None)
        self._index.remove(host_id)

    def _state(self, record: repo.HostRecord, now: float) -> HostState:
        return fleet.host_state(record, self._config, now)


def report_digest(report: HostReport) -> bytes:
    """What a report says, without what changes in every report (its counters and times, and the
    VMs' CPU time, which is only written along with a real change)."""
    said = msgspec.structs.replace(
        report,
        seq=0,
        started_at=0.0,
        reported_at=0.0,
        vms=tuple(msgspec.structs.replace(vm, cpu_time_ns=0) for vm in report.vms),
    )
    return hashlib.blake2b(encode(to_wire(said)), digest_size=16).digest()


def with_claim(host: repo.HostRecord, amounts: Mapping[str, int]) -> repo.HostRecord:
    """``host`` with one more VM holding ``amounts`` (the generation is the caller's to move)."""
    used = dict(host.used)
    for resource, amount in amounts.items():
        used[resource] = used.get(resource, 0) + amount
    return replace(host, used=used, vm_count=host.vm_count + 1)


def _newer(candidate: float | None, current: float | None) -> bool:
    return candidate is not None and (current is None or candidate > current)


def _with_beat(record: repo.HostRecord, beat: float | None) -> repo.HostRecord:
    """The record with a heartbeat received but not yet written, if newer (the database lags)."""
    if _newer(beat, record.last_heartbeat):
        return replace(record, last_heartbeat=beat)
    return record
