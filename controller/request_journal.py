"""The controller's API request journal: every state-changing API request is handled once.

A request of an operation that can change state (:attr:`Op.changes
<common.messages.descriptor.Op.changes>`; a query costs nothing here) is recorded in the
database (``api_requests``, controller.db.request_journal) as *started*, by its envelope id
and, when the caller gave one, its idempotency key (the envelope's ``idem``), before its handler
runs, and as *done*, with its encoded reply, after. Then:

* a **redelivery** (same id; the broker hands an unacknowledged request to another controller
  when the one that took it died or lost its connection) of a *done* request is answered with
  the recorded reply, and the handler does not run again;
* a **retry** (new id, same caller and key) is answered the same way; the key used for another
  operation or another body is ``Conflict``;
* a request found *started* (the controller that took it died mid-way, or is still at it) gets
  the true answer: any operation declared ``idempotent`` runs again (running it twice changes
  nothing more); the others are answered ``Conflict`` "outcome unknown" (the change may or may
  not have been made: check, then retry with a new key), never run twice;
* an answer that is a retryable error (the host was down, the database unavailable) is not kept:
  the entry is dropped, so that a retry with the same key runs again; nor is ``InvalidRequest``
  (refused input changes nothing, not even the journal).

``api.vm.create`` (the hot path) is journalled by its VM row instead, in the claim's own
transaction: every create gets a key of its own, :func:`implicit_key` of its request id, stored
with its VM (unique). A first delivery (the broker marks every later one ``redelivered``) runs
at once, with no lookup; a redelivery is answered from the VM its request claimed, once that VM
has left ``building`` (bounded by the build timeout), or runs when it claimed none. Two runs of
one create (two controllers handed it) claim one VM: the loser's insert is refused by the key
and it answers from the winner's VM. A create with an envelope key is journalled like any call
(its retry is answered from the first one's VM the same way).

The started insert is the arbiter between controllers sharing the database (a unique key; the
loser treats the request as a redelivery). Entries older than ``request_retention_s`` are
deleted in bounded batches, at most once a minute per controller, through the ``created_at``
index. Cost: one INSERT before and one UPDATE after the handler, each in a transaction of its
own shared by the requests that arrive together (group commit); none for a create
(docs/performance.md).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from common import codec
from common.errors import AlreadyExists, Conflict, InvalidRequest, RequestTimeout
from common.messages import api
from common.messages.base import replace as replace_message
from common.messages.descriptor import Op
from common.messages.envelope import decode_envelope
from common.messages.limits import MAX_KEY_CHARS
from common.messages.vm import Lifecycle
from common.transport.port import Delivery, Interrupted, Outcome
from common.transport.rpc import Proceed, Replay
from controller import fleet
from controller.create_batcher import GroupCommit
from controller.db import repository as repo
from controller.db import request_journal as store

if TYPE_CHECKING:
    from controller.service import ControllerService

log = logging.getLogger(__name__)

#: The prefix of the key every create gets from its request id (reserved: a caller's key may
#: not start with it).
IMPLICIT_PREFIX = "req:"
#: The longest request id journalled (the ``request_id`` column); our clients send 32.
MAX_REQUEST_ID_CHARS = 64
#: Seconds between two prunes by one controller, and entries deleted per statement.
PRUNE_EVERY_S = 60.0
PRUNE_BATCH = 1000
#: Statements per prune at most (a backlog is worked off over several minutes).
PRUNE_MAX_BATCHES = 10
#: Requests journalled (or answers recorded) in one transaction at most.
BATCH_MAX = 64
#: Seconds between two looks at a VM a dead controller was building.
SETTLE_POLL_S = 0.5


def implicit_key(request_id: str) -> str:
    """The idempotency key a create gets from its request id (stored with its VM)."""
    return IMPLICIT_PREFIX + request_id


def is_implicit(key: str | None) -> bool:
    """Whether ``key`` is a create's own key (:func:`implicit_key`), fresh when its request is."""
    return key is not None and key.startswith(IMPLICIT_PREFIX)


def digest(op: Op[Any, Any], body: object) -> str:
    """What a reused key must match: the operation and the body, as decoded (field order fixed)."""
    return hashlib.sha256(op.kind.encode() + b"\0" + codec.encode(codec.to_wire(body))).hexdigest()


class ApiJournal:
    """The :class:`~common.transport.rpc.RequestJournal` of the controller's API dispatchers."""

    def __init__(
        self,
        service: ControllerService,
        *,
        retention_s: float | None = None,
        settle_s: float | None = None,
        poll_s: float = SETTLE_POLL_S,
    ) -> None:
        self._service = service
        self._retention_s = service.config.request_retention_s if retention_s is None else retention_s
        #: how long a redelivered create waits for the VM a dead controller was building
        self._settle_s = service.config.build_timeout_s if settle_s is None else settle_s
        self._poll_s = poll_s
        self._stopping = threading.Event()
        self._prune_lock = threading.Lock()
        # Requests that arrive (and are answered) together are journalled in one transaction
        # each way, as creates are claimed (no window: only what queued).
        self._starts: GroupCommit[store.Entry, tuple[bool, store.Entry | None]] = GroupCommit(
            self._start_batch, window_s=0.0, max_size=BATCH_MAX
        )
        self._finishes: GroupCommit[store.Finished, None] = GroupCommit(
            self._finish_batch, window_s=0.0, max_size=BATCH_MAX
        )
        self._pruned_at = float("-inf")

    def interrupt(self) -> None:
        """This controller is stopping: waits on builds end (their requests go back to the queue)."""
        self._stopping.set()

    # ------------------------------------------------------------------ the seam

    def begin(self, delivery: Delivery, op: Op[Any, Any], body: Any) -> Replay | Proceed:
        """Record a state-changing request as started, or answer it from its entry."""
        if not op.changes:
            return Proceed(body)
        env = delivery.envelope
        if len(env.id) > MAX_REQUEST_ID_CHARS:
            raise InvalidRequest(f"request id longer than {MAX_REQUEST_ID_CHARS} characters")
        if env.idempotency_key is not None and len(env.idempotency_key) > MAX_KEY_CHARS:
            raise InvalidRequest(
                f"idempotency key longer than {MAX_KEY_CHARS} characters",
                details={"field": "idempotency_key", "max_length": MAX_KEY_CHARS},
            )
        if isinstance(body, api.VmCreate) and is_implicit(body.idempotency_key):
            raise InvalidRequest(
                f"idempotency keys starting with {IMPLICIT_PREFIX!r} are reserved",
                details={"field": "idempotency_key"},
            )
        caller, key = delivery.user_id or "", env.idempotency_key
        if isinstance(body, api.VmCreate) and key is None:
            return self._create(delivery, body)
        now = self._service.clock()
        self._prune(now)
        entry = store.Entry(env.id, op.kind, caller, key, digest(op, body), store.State.STARTED, None, now)
        fresh, found = self._starts.submit(entry)
        if fresh:
            body = self._own_key(body, env.id)
            if isinstance(body, api.VmCreate):
                return Proceed(body, handler=self._fresh_create, record=True)
            return Proceed(body, record=True)
        if found is None:  # pruned between the insert and the read: as good as fresh
            return Proceed(self._own_key(body, env.id), record=False)
        if found.request_id != env.id and (found.kind != op.kind or found.digest != entry.digest):
            raise Conflict(
                f"idempotency key {key!r} was used for another request ({found.kind}, request {found.request_id})",
                details={"idempotency_key": key, "request": found.request_id},
            )
        if found.state is store.State.DONE and found.reply is not None:
            return Replay(replace(decode_envelope(found.reply), correlation_id=env.id))
        log.info("%s %s was started by a controller that did not answer it", op.kind, found.request_id)
        return self._after_started(op, self._own_key(body, found.request_id), found)

    def finish(self, delivery: Delivery, op: Op[Any, Any], outcome: Outcome) -> None:
        """Record the answer (a retryable error or refused input drops the entry instead)."""
        if outcome.requeue or outcome.reply is None:
            return  # handed back unanswered: the next controller finds it started
        env = delivery.envelope
        error = outcome.reply.body.get("error")
        # Kept: answers, and errors after which running again could differ from the first run.
        # Dropped: a retryable error (a retry must run again) and refused input (nothing changed,
        # and the same input is refused again).
        dropped = isinstance(error, dict) and (
            error.get("retryable") is True or error.get("type") == "InvalidRequest"
        )
        reply = None if dropped else outcome.reply.encode()
        self._finishes.submit(store.Finished(env.id, delivery.user_id or "", env.idempotency_key, reply))

    def _start_batch(self, entries: Sequence[store.Entry]) -> list[tuple[bool, store.Entry | None]]:
        """Journal requests that arrived together in one transaction: per request, whether it is
        fresh (it went in), else the entry that was there (None: pruned meanwhile)."""
        with self._service.tx() as s:
            inserted = store.start(s, entries)
            answers: list[tuple[bool, store.Entry | None]] = []
            for e in entries:
                if e.request_id in inserted:
                    inserted.discard(e.request_id)  # the same id twice in a batch: the first runs
                    answers.append((True, None))
                else:
                    answers.append((False, store.find(s, e.request_id, e.caller, e.idempotency_key)))
        return answers

    def _finish_batch(self, done: Sequence[store.Finished]) -> list[None]:
        """Record answers that came together in one transaction."""
        with self._service.tx() as s:
            store.finish(s, done)
        return [None] * len(done)

    # ------------------------------------------------------------------ answers

    def _create(self, delivery: Delivery, req: api.VmCreate) -> Proceed:
        """A create without an envelope key: journalled by its VM row (see the module docstring)."""
        if req.dry_run or req.idempotency_key is not None:
            # A dry run changes nothing; a caller's create key is looked up by the create itself.
            return Proceed(req)
        req = self._own_key(req, delivery.envelope.id)
        # The broker marks every delivery of a message after the first: one it does not mark was
        # never handed to anyone before, so its key is fresh and needs no lookup.
        return Proceed(req, handler=self._settled_create if delivery.redelivered else self._fresh_create)

    def _own_key(self, body: Any, request_id: str) -> Any:
        """A create's body with its own key (a caller's key, or a dry run, stays as it is)."""
        if isinstance(body, api.VmCreate) and body.idempotency_key is None and not body.dry_run:
            return replace_message(body, idempotency_key=implicit_key(request_id))
        return body

    def _after_started(self, op: Op[Any, Any], body: Any, found: store.Entry) -> Proceed:
        """The true answer to a request whose first run did not answer (see the module docstring)."""
        if isinstance(body, api.VmCreate):
            return Proceed(body, handler=self._settled_create, record=True)
        if op.idempotent:
            return Proceed(body, record=True)

        def unknown(_body: Any) -> Any:
            raise Conflict(
                f"{op.kind} request {found.request_id} was taken by a controller that has not answered"
                " it (it stopped, or is still at it): whether it took effect is unknown; check, then"
                " retry with a new key",
                details={"request": found.request_id, "outcome": "unknown"},
            )

        return Proceed(body, handler=unknown, record=True)

    def _fresh_create(self, req: api.VmCreate) -> api.VmCreated:
        """A create journalled just now: it runs without a lookup first. Only when the claim is
        refused for a taken name does it look for the VM of its key: a controller that found the
        request started (a redelivery while this one still ran) may have claimed it first."""
        try:
            return self._service.create_vm(req)
        except AlreadyExists:
            if req.idempotency_key is None:
                raise
            with self._service.tx() as s:
                if repo.find_vm_by_key(s, req.idempotency_key) is None:
                    raise
            return self._settled_create(req)

    def _settled_create(self, req: api.VmCreate) -> api.VmCreated:
        """The VM a create claimed, once it has left ``building``; the create run when it claimed none."""
        key = req.idempotency_key
        assert key is not None  # _own_key gave it one (a dry run claims nothing: it runs again)
        deadline = self._service.clock() + self._settle_s
        while True:
            with self._service.tx() as s:
                vm = repo.find_vm_by_key(s, key)
            if vm is None:
                try:
                    return self._service.create_vm(req)
                except AlreadyExists:
                    # Another controller's run of the same request claimed the VM first (its
                    # key is unique): answer from that VM; a name taken by another VM stays refused.
                    with self._service.tx() as s:
                        if repo.find_vm_by_key(s, key) is None:
                            raise
                    continue
            if vm.name != req.name:
                raise Conflict(f"idempotency key was used for VM {vm.name!r}, not {req.name!r}")
            if vm.status is not Lifecycle.BUILDING or not req.wait:
                return api.VmCreated(fleet.vm_view(vm), api.PlacementView(vm.host_id, (), (), ()))
            if self._service.clock() >= deadline:
                raise RequestTimeout(
                    f"VM {req.name} is still building after {self._settle_s:g} s; see `virtfleet vm show`",
                    details={"vm": req.name},
                )
            if self._stopping.wait(self._poll_s):
                raise Interrupted(f"controller stopping while VM {req.name} is still building")

    # ------------------------------------------------------------------ retention

    def _prune(self, now: float) -> None:
        """Delete expired entries, a few bounded batches at most once every PRUNE_EVERY_S."""
        with self._prune_lock:
            if now - self._pruned_at < PRUNE_EVERY_S:
                return
            self._pruned_at = now
        deleted = self.prune(now)
        if deleted:
            log.info("request journal: %d entries older than %g s deleted", deleted, self._retention_s)

    def prune(self, now: float, *, batches: int = PRUNE_MAX_BATCHES) -> int:
        """Delete entries older than the retention, ``batches`` statements of PRUNE_BATCH at most."""
        total = 0
        for _ in range(batches):
            with self._service.tx() as s:
                deleted = store.prune(s, now - self._retention_s, PRUNE_BATCH)
            total += deleted
            if deleted < PRUNE_BATCH:
                break
        return total


__all__ = ["IMPLICIT_PREFIX", "ApiJournal", "digest", "implicit_key", "is_implicit"]
