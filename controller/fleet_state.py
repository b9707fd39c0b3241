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

The database stays the source of truth: a claim re-reads its one host under the host's
lock before it writes (see ``ControllerService._claim``), so a stale view can make a
decision worse for one sync interval, never wrong. A restart rebuilds the view from the
database (:meth:`FleetState.load`), so the next decision is the one the old process
would have made.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace

from sqlalchemy.orm import Session

from controller import fleet
from controller.config import ControllerConfig
from controller.db import repository as repo
from controller.scheduler.model import FleetSnapshot, HostState

#: a function opening one database transaction (``ControllerService.tx``)
Transaction = Callable[[], AbstractContextManager[Session]]


@dataclass(frozen=True, slots=True)
class _Entry:
    record: repo.HostRecord
    #: the scheduler's view, computed for the liveness the record had then
    state: HostState


class FleetState:
    """Every host's record and scheduler state, in memory, safe to use from many threads."""

    def __init__(self, tx: Transaction, config: ControllerConfig) -> None:
        self._tx = tx
        self._config = config
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        #: heartbeats received and not yet written: host -> time
        self._pending_beats: dict[str, float] = {}
        self._groups_fingerprint: tuple[object, ...] = ()

    # ------------------------------------------------------------------ loading

    def load(self, now: float) -> None:
        """Read the whole fleet from the database (start, and after a refusal to be sure)."""
        with self._tx() as s:
            records = repo.list_hosts(s, include_vms=False)
            fingerprint = repo.host_groups_fingerprint(s)
        with self._lock:
            beats = self._pending_beats
            self._entries = {r.id: self._entry(_with_beat(r, beats.get(r.id)), now) for r in records}
            self._groups_fingerprint = fingerprint

    def sync(self, now: float) -> int:
        """Reload the hosts whose generation or row changed in the database since we read them
        (another controller's claims, an operator's change); returns how many were reloaded."""
        with self._tx() as s:
            markers = repo.host_markers(s)
            fingerprint = repo.host_groups_fingerprint(s)
            with self._lock:
                known = {h: (e.record.generation, e.record.updated_at) for h, e in self._entries.items()}
                groups_changed = fingerprint != self._groups_fingerprint
            changed = [
                host_id
                for host_id, marker in markers.items()
                if groups_changed or known.get(host_id) != (marker.generation, marker.updated_at)
            ]
            records = repo.list_hosts(s, changed, include_vms=False) if changed else []
        with self._lock:
            for host_id in set(self._entries) - set(markers):
                del self._entries[host_id]
            for host_id, marker in markers.items():
                entry = self._entries.get(host_id)
                if entry is not None and _newer(marker.last_heartbeat, entry.record.last_heartbeat):
                    self._entries[host_id] = self._entry(
                        replace(entry.record, last_heartbeat=marker.last_heartbeat), now
                    )
            for record in records:
                beat = self._pending_beats.get(record.id)
                self._entries[record.id] = self._entry(_with_beat(record, beat), now)
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
                self._entries.pop(gone, None)

    def upsert(self, record: repo.HostRecord, now: float) -> None:
        """Take a host as this controller just wrote it (inside or right after the transaction)."""
        with self._lock:
            beat = self._pending_beats.get(record.id)
            self._entries[record.id] = self._entry(_with_beat(record, beat), now)

    # ------------------------------------------------------------------ heartbeats

    def beat(self, host_id: str, now: float) -> bool:
        """Note a heartbeat in memory; False when the host is unknown (never reported)."""
        with self._lock:
            entry = self._entries.get(host_id)
            if entry is None:
                return False
            self._pending_beats[host_id] = now
            record = replace(entry.record, last_heartbeat=now)
            state = entry.state
            if not state.up:
                state = fleet.host_state(record, self._config, now)
            self._entries[host_id] = _Entry(record, state)
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

    # ------------------------------------------------------------------ reading

    def record(self, host_id: str) -> repo.HostRecord | None:
        """The host as last known, heartbeat included (no reported VMs)."""
        with self._lock:
            entry = self._entries.get(host_id)
        return None if entry is None else entry.record

    def records(self) -> list[repo.HostRecord]:
        """Every host, ordered by id."""
        with self._lock:
            entries = sorted(self._entries.items())
        return [e.record for _h, e in entries]

    def snapshot(self, now: float, groups: Iterable[repo.ServerGroupRecord] = ()) -> FleetSnapshot:
        """The fleet as the scheduler sees it at ``now``, computed without the database.

        A host's scheduler state is rebuilt only when its liveness changed since it was
        computed; everything else is reused from the last decision.
        """
        with self._lock:
            entries = sorted(self._entries.items())
            states: list[HostState] = []
            for host_id, cached in entries:
                entry = cached
                if fleet.host_is_up(entry.record, now, self._config.down_after_s) != entry.state.up:
                    entry = self._entry(entry.record, now)
                    self._entries[host_id] = entry
                states.append(entry.state)
        return FleetSnapshot(
            hosts=tuple(states),
            server_groups=tuple(fleet.server_group(g) for g in groups),
            now=now,
        )

    def _entry(self, record: repo.HostRecord, now: float) -> _Entry:
        return _Entry(record, fleet.host_state(record, self._config, now))


def _newer(candidate: float | None, current: float | None) -> bool:
    return candidate is not None and (current is None or candidate > current)


def _with_beat(record: repo.HostRecord, beat: float | None) -> repo.HostRecord:
    """The record with a heartbeat received but not yet written, if newer (the database lags)."""
    if _newer(beat, record.last_heartbeat):
        return replace(record, last_heartbeat=beat)
    return record
