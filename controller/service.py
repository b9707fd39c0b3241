"""Controller use cases: what each API request does, in terms of the store, the scheduler
and the agents. No transport code here; the endpoint maps messages onto these methods.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid as uuidlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, TypeVar, cast

import tenacity
from sqlalchemy import Connection, Engine
from sqlalchemy.orm import Session, sessionmaker

from common.cpuset import parse_cpuset
from common.errors import (
    AlreadyExists,
    CapacityExceeded,
    Conflict,
    HostDown,
    HypervisorError,
    InvalidRequest,
    NotFound,
    NoValidHost,
    RequestTimeout,
    StorageError,
    TransportError,
    Unsupported,
    VirtfleetError,
)
from common.messages import api
from common.messages.base import replace as replace_message
from common.messages.descriptor import ApiCall, Command, ToHostAgent
from common.messages.host import Heartbeat, HostReport, VmChanges
from common.messages.tuning import page_size_kib
from common.messages.vm import (
    VM_CREATE,
    VM_DELETE,
    VM_SHUTDOWN,
    CreateVm,
    DeleteVm,
    DesiredPower,
    Lifecycle,
    NicKind,
    PowerState,
    ShutdownVm,
    Task,
    VmAction,
    VmActionDone,
    VmForward,
    VmRef,
    VmRefRequest,
    VmResult,
    VmSpec,
    VmView,
)
from common.transport.port import Interrupted
from controller import fleet, tuning_inventory
from controller.agent_api import AgentCalls
from controller.config import ControllerConfig
from controller.create_batcher import GroupCommit
from controller.db import repository as repo
from controller.db.errors import transient_retries, typed_database_errors
from controller.fleet_state import FleetState, report_digest, with_claim
from controller.request_journal import is_implicit
from controller.scheduler.model import (
    FleetSnapshot,
    Placement,
    PlacementPolicy,
    PlacementRequest,
    Refusal,
    ResourceClass,
    UnknownServerGroupError,
)
from controller.scheduler.place import place
from controller.vm_spec import build_spec

log = logging.getLogger(__name__)

B = TypeVar("B")
R = TypeVar("R")

#: Errors after which a build is retried on an alternate host (the host failed, not the request).
RESCHEDULABLE = (HypervisorError, StorageError, Unsupported, TransportError)


@dataclass(frozen=True, slots=True)
class _Create:
    """One create handed to the batch (see ``ControllerService._claim_batch``)."""

    req: api.VmCreate
    vm_uuid: str
    request: PlacementRequest


@dataclass(frozen=True, slots=True)
class _Claimed:
    placement: Placement
    host: repo.HostRecord
    #: the definition for that host, stored with the claim
    spec: VmSpec


class ControllerService:
    """The controller's use cases over an engine, an agent API and a clock."""

    def __init__(
        self,
        engine: Engine,
        config: ControllerConfig,
        agents: AgentCalls,
        *,
        clock: Callable[[], float] = time.time,
        background: ThreadPoolExecutor | None = None,
    ) -> None:
        self.config = config
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self._engine = engine
        self.agents = agents
        self.clock = clock
        #: this process's instance: recorded as the owner of every build and task it starts, so
        #: that what it leaves when it dies is recovered (controller.recovery) and nothing else is
        self.instance_id = uuidlib.uuid4().hex
        self._background = background or ThreadPoolExecutor(max_workers=8, thread_name_prefix="build")
        # SQLite has one writer at a time and its busy handler waits by sleeping and polling;
        # queueing this process's threads on a lock instead keeps latency flat under load.
        self._tx_lock: threading.RLock | None = threading.RLock() if engine.dialect.name == "sqlite" else None
        #: every host in memory: what placement decides on (see controller.fleet_state)
        self.fleet = FleetState(self.tx, config)
        self.fleet.load(clock())
        #: creates that arrive together are decided and claimed together
        self._creates: GroupCommit[_Create, _Claimed | None] = GroupCommit(
            self._claim_batch, window_s=config.create_batch_window_s, max_size=config.create_batch_max
        )
        #: and their builds' results are recorded together (no window: only what queued)
        self._built: GroupCommit[tuple[str, VmResult], VmView] = GroupCommit(
            self._record_builds, window_s=0.0, max_size=config.create_batch_max
        )

    @contextmanager
    def tx(self) -> Iterator[Session]:
        """One database transaction (feature modules use this too); a database error leaves it
        as a typed error (controller.db.errors), never as SQL text to a client."""
        if self._tx_lock is None:
            with typed_database_errors(), self._sessions.begin() as session:
                yield session
            return
        with typed_database_errors(), self._tx_lock, self._sessions.begin() as session:
            yield session

    @contextmanager
    def core_tx(self) -> Iterator[Connection]:
        """One database transaction of Core statements only, on a plain connection: as
        :meth:`tx`, without an ORM session, whose own bookkeeping (begin, connection, commit
        through its state machine) cost about 0.1 ms of CPU per transaction. The claims and the
        results of creates run here."""
        if self._tx_lock is None:
            with typed_database_errors(), self._engine.begin() as connection:
                yield connection
            return
        with typed_database_errors(), self._tx_lock, self._engine.begin() as connection:
            yield connection

    def retrying(self) -> tenacity.Retrying:
        """Attempts of a transaction that a transient database failure may run again
        (:func:`controller.db.errors.transient_retries`, for ``db_retry_s``)."""
        return transient_retries(self.config.db_retry_s)

    def close(self) -> None:
        self._background.shutdown(wait=True)

    # ------------------------------------------------------------------ hosts

    def list_hosts(self) -> api.HostList:
        """Served from memory: a read-only call never waits behind creates' transactions."""
        now = self.clock()
        return api.HostList(tuple(fleet.host_view(r, self.config, now) for r in self.fleet.records()))

    def show_host(self, host_id: str) -> api.HostView:
        now = self.clock()
        with self.tx() as s:
            record = repo.get_host(s, host_id)
            vms = [v.name for v in repo.list_vms(s, host_id)]
        return fleet.host_view(self.fleet.freshen(record), self.config, now, vms, detail=True)

    def hosts_changed(self, *host_ids: str) -> None:
        """Re-read hosts this controller just changed (allocations, settings) into memory."""
        self.fleet.refresh(host_ids, self.clock())

    # ------------------------------------------------------------------ reports

    def record_report(self, report: HostReport) -> None:
        """Write a host's report; one that says nothing new only counts as a heartbeat."""
        now = self.clock()
        digest = report_digest(report)  # once: it encodes every VM of the report
        if self.fleet.report_unchanged(report, digest, now) and self.fleet.beat(report.host_id, now):
            return
        for attempt in self.retrying():
            with attempt, self.tx() as s:
                applied = repo.record_report(s, report, now)
                written = repo.get_host(s, report.host_id, include_vms=False)
        self.fleet.upsert(written, now)
        if applied.deferred:
            # Some VM changed here after the agent took the report: the report could not speak
            # for it, and the agent's next one (which may say the same) is the one that will.
            self.fleet.vms_changed(report.host_id)
        else:
            self.fleet.report_written(report.host_id, digest, now)
        for note in applied.notes:
            log.info("drift on %s: %s", report.host_id, note)

    def record_vm_changes(self, changes: VmChanges) -> None:
        """A delta: only the VM rows it names change (the host's facts wait for its next report)."""
        if self.fleet.delta_overtaken(changes.host_id, changes.started_at, changes.seq):
            notes = None
        else:
            for attempt in self.retrying():
                with attempt, self.tx() as s:
                    notes = repo.record_vm_changes(s, changes, self.clock())
            self.fleet.vms_changed(changes.host_id)
        if notes is None:
            log.debug(
                "dropped VM changes seq %d of %s (stale or before its report)", changes.seq, changes.host_id
            )
        for note in notes or ():
            log.info("drift on %s: %s", changes.host_id, note)

    def record_heartbeat(self, beat: Heartbeat) -> None:
        """Kept in memory; :meth:`FleetState.flush_heartbeats` writes them in batches."""
        if not self.fleet.beat(beat.host_id, self.clock()):
            log.debug("heartbeat from %s before its first report", beat.host_id)

    # ------------------------------------------------------------------ VMs: create

    def create_vm(self, req: api.VmCreate) -> api.VmCreated:
        """Place, claim atomically, then build on the agent (with reschedule on failure).

        The common create is decided and claimed in a batch with the creates that arrive with
        it (:meth:`_claim_batch`); a caller's idempotency key, dry runs, forced hosts and server
        groups take the path of one create at a time (:meth:`_claim`). The key the request
        journal gives every create (controller.request_journal) is fresh (its request was just
        journalled) and needs no lookup: it is stored with the VM by the batch's insert, whose
        unique index refuses a second VM for it.
        """
        self._check_cpuset(req)
        if (
            (req.idempotency_key and not is_implicit(req.idempotency_key))
            or req.dry_run
            or req.host is not None
            or req.server_group is not None
            or req.cpuset is not None  # placed on hosts that have its CPUs; checked again in _spec
        ):
            return self._create_alone(req)
        vm_uuid = str(uuidlib.uuid4())
        # The common case reads nothing before placing: a taken name is refused by the claim's
        # insert (unique index), and a refusal checks it first (below).
        with self._creates.announce() as ticket:
            request = self._placement_request(req, exclude=())
            try:
                # None: the batch could not claim it (refused, or lost a race): alone, then.
                claimed = ticket.submit(_Create(req, vm_uuid, request)) or self._claim(req, vm_uuid, request)
            except NoValidHost:
                self._check_create(req)  # a taken name says more than "no host"
                raise
        return self._build_claimed(req, vm_uuid, claimed)

    def _check_cpuset(self, req: api.VmCreate) -> None:
        """InvalidRequest, before any record, for a ``--cpuset`` naming a CPU that the forced host
        (or, unforced, every host of the fleet) does not have: libvirt would refuse the domain
        and leave an ``error`` VM behind."""
        if req.cpuset is None:
            return
        highest = max(parse_cpuset(req.cpuset))
        hosts = [r for r in self.fleet.records() if req.host is None or r.id == req.host]
        if not hosts:
            return  # an unknown forced host is NotFound, said by the checks that follow
        widest = max(hosts, key=lambda r: r.cpus)
        if highest >= widest.cpus:
            where = f"host {widest.id}" if req.host is not None else f"the largest host, {widest.id},"
            raise InvalidRequest(
                f"cpuset {req.cpuset!r} names CPU {highest}, but {where} has CPUs 0-{widest.cpus - 1}",
                details={"field": "cpuset", "max_cpu": widest.cpus - 1, "host": widest.id},
            )

    def _create_alone(self, req: api.VmCreate) -> api.VmCreated:
        repeated = self._check_create(req)
        if repeated is not None:
            return repeated
        request = self._placement_request(req, exclude=())
        if req.dry_run:
            result = self._decide(request, explain=True)[0]
            if isinstance(result, Refusal):
                raise _no_valid_host(result)
            return api.VmCreated(None, _placement_view(result), dry_run=True)
        vm_uuid = str(uuidlib.uuid4())
        try:
            claimed = self._claim(req, vm_uuid, request)
        except NoValidHost:
            self._check_create(req)  # a taken name says more than "no host"
            raise
        except AlreadyExists:
            # A twin of this request (same idempotency key: a copy redelivered while this one
            # ran, seen in tests/chaos/test_broker_cluster.py) claimed first: its VM is the answer.
            repeated = self._check_create(req) if req.idempotency_key else None
            if repeated is None:
                raise
            return repeated
        return self._build_claimed(req, vm_uuid, claimed)

    def _build_claimed(self, req: api.VmCreate, vm_uuid: str, claimed: _Claimed) -> api.VmCreated:
        if not req.wait:
            self._background.submit(self._build_logged, req, vm_uuid, claimed)
            with self.tx() as s:
                return api.VmCreated(
                    fleet.vm_view(repo.get_vm(s, req.name)), _placement_view(claimed.placement)
                )
        view = self._build(req, vm_uuid, claimed)
        return api.VmCreated(view, _placement_view(claimed.placement))

    def _claim_batch(self, creates: Sequence[_Create]) -> list[_Claimed | None]:
        """Decide and claim creates that arrived together: one decision pass, one transaction.

        Each request is placed on the in-memory index as the earlier ones of the batch left it
        (:meth:`FleetState.place_batch`), so a batch never puts more on a host than it holds.
        Then one transaction compares-and-sets each chosen host's generation, moving it up by
        the number of claims on it, in host id order (the order every multi-host write takes,
        so two batches, or a batch and the heartbeat flush, never deadlock), and writes every
        VM and every allocation with one INSERT each. The answer is per create: its claim, or
        None when this create must be claimed alone (:meth:`_claim`), which affects no other
        create of the batch: it was refused (the alone path confirms the refusal on a fresh
        read and explains it), its host changed since memory last saw it (the alone path
        re-checks that host under its lock), or its name repeats one of the batch. A name taken
        in the database fails the whole transaction (nothing is written): every create of the
        batch is then claimed alone, so that only that one is refused.
        """
        now = self.clock()
        policy = fleet.policy(self.config)
        decided = self.fleet.place_batch([c.request for c in creates], policy, now, _claim_amounts)
        by_host: dict[str, list[int]] = {}
        for i, (result, basis) in enumerate(decided):
            if isinstance(result, Placement) and basis is not None:
                by_host.setdefault(result.host_id, []).append(i)
        try:
            return self._write_batch(creates, decided, by_host, now)
        finally:  # whatever happened, the claims held in memory are the database's again
            self.fleet.settle({host_id: len(held) for host_id, held in by_host.items()})

    def _write_batch(
        self,
        creates: Sequence[_Create],
        decided: Sequence[tuple[Placement | Refusal, repo.HostRecord | None]],
        by_host: dict[str, list[int]],
        now: float,
    ) -> list[_Claimed | None]:
        """The transaction of :meth:`_claim_batch`; ``by_host``: host -> the batch's placements there."""
        claims: list[_Claimed | None] = [None] * len(creates)
        names: set[str] = set()
        #: hosts where memory holds a claim this batch will not write (a name repeated in the batch)
        unwritten: set[str] = set()
        for host_id, placed in by_host.items():
            for i in placed:
                create, (result, basis) = creates[i], decided[i]
                assert isinstance(result, Placement) and basis is not None  # what by_host holds
                if create.req.name in names:
                    unwritten.add(host_id)
                    continue
                names.add(create.req.name)
                host = self.fleet.freshen(replace(basis, generation=basis.generation + 1))
                claims[i] = _Claimed(result, host, self._spec(create.req, create.vm_uuid, host, result.pcpus))
        touched = sorted(by_host)
        prepared = claims
        lost: list[repo.HostRecord] = []
        try:
            for attempt in self.retrying():
                with attempt:
                    again = attempt.retry_state.attempt_number > 1
                    claims, lost = self._claim_transaction(
                        creates, decided, by_host, prepared, now, again=again
                    )
        except AlreadyExists:
            self.fleet.refresh(touched, self.clock())
            return [None] * len(creates)
        except BaseException:
            self.fleet.refresh(touched, self.clock())
            raise
        for basis in lost:
            self.fleet.upsert(basis, now)
        # The generation moved by every placement there, so memory and database agree on it
        # while memory still counts the claim not written: only a re-read corrects that.
        self.fleet.refresh(unwritten - {b.id for b in lost}, now)
        return claims

    def _claim_transaction(
        self,
        creates: Sequence[_Create],
        decided: Sequence[tuple[Placement | Refusal, repo.HostRecord | None]],
        by_host: dict[str, list[int]],
        prepared: Sequence[_Claimed | None],
        now: float,
        *,
        again: bool,
    ) -> tuple[list[_Claimed | None], list[repo.HostRecord]]:
        """One attempt at the transaction of :meth:`_write_batch`: the claims it wrote (None where
        a host's generation moved first) and the bases of the hosts lost that way. Changes no
        memory, so a transient failure can run it again; run ``again``, it first looks for the
        batch's VMs (fresh uuids), in case the COMMIT of the attempt before went through
        unseen: the batch is one transaction, so they are all there or none is."""
        claims = list(prepared)
        lost: list[repo.HostRecord] = []
        vms: list[dict[str, object]] = []
        allocations: list[dict[str, object]] = []
        with self.core_tx() as s:
            if again:
                written = repo.vm_uuids_in_use(s, [c.vm_uuid for c in creates])
                if written:
                    log.info(
                        "a batch of %d claims was committed by an attempt whose answer was lost", len(written)
                    )
                    return [c if creates[i].vm_uuid in written else None for i, c in enumerate(claims)], [
                        first
                        for host_id, placed in by_host.items()
                        if not any(creates[i].vm_uuid in written for i in placed)
                        and (first := decided[placed[0]][1]) is not None
                    ]
            for host_id in sorted(by_host):
                first = decided[by_host[host_id][0]][1]
                assert first is not None  # only placements with a basis are in by_host
                if not repo.claim_generation(
                    s, host_id, first.generation, first.updated_at, count=len(by_host[host_id])
                ):
                    # Another claim got there first. Memory goes back to what these
                    # creates decided on, so alone each re-checks this host under its lock
                    # (deciding again on a host shown fuller would herd them elsewhere).
                    lost.append(first)
                    for i in by_host[host_id]:
                        claims[i] = None
                    continue
                for i in by_host[host_id]:
                    claimed = claims[i]
                    if claimed is None:
                        continue
                    create = creates[i]
                    pcpus = claimed.placement.pcpus
                    vms.append(self._vm_row(create.req, create.vm_uuid, host_id, now, pcpus, claimed.spec))
                    allocations.extend(
                        {"vm_uuid": create.vm_uuid, "host_id": host_id, "resource": r, "amount": a}
                        for r, a in _claim_amounts(create.request, claimed.placement).items()
                    )
            repo.insert_claims(s, vms=vms, allocations=allocations)
        return claims, lost

    def _check_create(self, req: api.VmCreate) -> api.VmCreated | None:
        """Check what a create refers to: the answer to a repeated idempotency key, else None;
        AlreadyExists for a taken name, NotFound for an unknown host or group."""
        with self.tx() as s:
            if req.idempotency_key:
                previous = repo.find_vm_by_key(s, req.idempotency_key)
                if previous is not None:
                    if previous.name != req.name:
                        raise Conflict(f"idempotency key was used for VM {previous.name!r}, not {req.name!r}")
                    return api.VmCreated(fleet.vm_view(previous), _placement_view_of(previous.host_id))
            if repo.find_vm(s, req.name) is not None:
                raise AlreadyExists(f"a VM named {req.name!r} already exists in the fleet")
            if req.host is not None:
                repo.get_host(s, req.host)  # NotFound for an unknown host, before placing
            if req.server_group is not None and repo.find_server_group(s, req.server_group) is None:
                raise NotFound(
                    f"server group {req.server_group!r} does not exist (create it with `virtfleet group create`)"
                )
        return None

    def _placement_request(self, req: api.VmCreate, exclude: tuple[str, ...]) -> PlacementRequest:
        return fleet.placement_request(
            req.name,
            tuning_inventory.request_resources(
                req.vcpus,
                req.memory_mib,
                req.disk_gib,
                dedicated=req.cpu_policy == "dedicated",
                hugepage_size_kib=page_size_kib(req.hugepage_size) if req.hugepage_size else None,
            ),
            needs_hw_virt=req.domain_type == "kvm",
            force_host=req.host,
            exclude=exclude,
            networks=(n.source for n in req.nics if n.kind is NicKind.NETWORK),
            bridges=(n.source for n in req.nics if n.kind is NicKind.BRIDGE),
            group=req.server_group,
            highest_cpu=max(parse_cpuset(req.cpuset)) if req.cpuset is not None else None,
        )

    def _decide(
        self, request: PlacementRequest, *, explain: bool = False
    ) -> tuple[Placement | Refusal, repo.HostRecord | None]:
        """Decide on the in-memory fleet; a refusal is confirmed on a fresh read of it.

        ``explain``: walk every host, so the answer lists why each other host was not chosen
        (a dry run); otherwise only the best candidates are looked at. With the placement
        comes the chosen host as decided on, when the claim may compare-and-set against it.
        """
        groups: list[repo.ServerGroupRecord] = []
        if request.group is not None:
            with self.tx() as s:
                groups = _request_group(s, request)
        policy = fleet.policy(self.config)
        now = self.clock()
        basis: repo.HostRecord | None = None
        if explain:
            result = _place(self.fleet.snapshot(now, groups), request, policy)
        else:
            result, basis = _guard_group(request, lambda: self.fleet.place(request, policy, now, groups))
        if isinstance(result, Refusal):
            # Rare, and the memory may lag another controller's release by a sync interval;
            # the full walk also gives every host's reason.
            now = self.clock()
            self.fleet.load(now)
            result, basis = _place(self.fleet.snapshot(now, groups), request, policy), None
        # Group rules count VMs on other hosts too: those claims re-check under the lock.
        return result, None if request.group is not None else basis

    def _claim(
        self, req: api.VmCreate, vm_uuid: str, request: PlacementRequest, *, rehome: bool = False
    ) -> _Claimed:
        """Decide in memory, then claim in one transaction that cannot overfill a host.

        Fast path: compare-and-set the chosen host's generation against the record the decision
        was made on (:func:`repo.claim_generation`). When it holds, memory and database agree
        on that host (every change of a host's allocations or settings moves its generation or
        its row), so the decision stands as made: insert the VM, its definition and its
        allocations, and commit. Otherwise (another controller or thread claimed there first, or a
        group request, whose rules count VMs on other hosts too) bump the generation
        unconditionally (in
        PostgreSQL that takes the row lock; SQLite's BEGIN IMMEDIATE already holds the write
        lock), re-read that one host and re-run the scheduler on it; a host that filled up
        meanwhile sends us back to decide again. Either way concurrent creates, in one or many
        controller processes, never push a host past its capacity.

        ``rehome``: the VM row exists (a reschedule) and moves to the new host.
        """
        attempts = 0
        while attempts < self.config.claim_retries:
            result, basis = self._decide(request)
            if isinstance(result, Refusal):
                raise _no_valid_host(result)
            claimed: _Claimed | None = None
            for attempt in self.retrying():
                with attempt:
                    again = attempt.retry_state.attempt_number > 1
                    claimed = self._claim_on(req, vm_uuid, request, result, basis, rehome=rehome, again=again)
            if claimed is not None:
                return claimed
            attempts += 1
        raise Conflict(
            f"could not claim a host for {req.name} after {self.config.claim_retries} attempts (heavy contention)",
            retryable=True,
        )

    def _claim_on(
        self,
        req: api.VmCreate,
        vm_uuid: str,
        request: PlacementRequest,
        result: Placement,
        basis: repo.HostRecord | None,
        *,
        rehome: bool,
        again: bool,
    ) -> _Claimed | None:
        """One claim transaction of :meth:`_claim` on the decided host; None when that host
        filled up meanwhile (decide again). Safe to run again after a transient failure: it
        changes memory only after its commit, and a first claim whose COMMIT was lost with its
        connection is found by its VM's uuid (fresh for this request) when run ``again``."""
        now = self.clock()
        with self.tx() as s:
            mine = repo.find_vm_by_uuid(s, vm_uuid) if again and not rehome else None
            if mine is not None and mine.host_id is not None:
                log.info("the claim of %s was committed by an attempt whose answer was lost", req.name)
                host = self.fleet.freshen(repo.get_host(s, mine.host_id, include_vms=False))
                spec = mine.spec or self._spec(req, vm_uuid, host, mine.pcpus)
                self.fleet.upsert(host, now)
                return _Claimed(replace(result, host_id=host.id, pcpus=mine.pcpus), host, spec)
            if basis is not None and repo.claim_generation(s, basis.id, basis.generation, basis.updated_at):
                host = self.fleet.freshen(replace(basis, generation=basis.generation + 1))
                pcpus = result.pcpus
            else:
                repo.bump_generation(s, result.host_id)
                host = self.fleet.freshen(repo.get_host(s, result.host_id, include_vms=False))
                # Group members on this host are VMs placed here, so under this host's lock
                # the count is exact: a hard anti-affinity limit cannot be raced past.
                recheck = _place(
                    fleet.snapshot([host], self.config, now, _request_group(s, request)),
                    # Every need as decided; the choice of host is made (and locked) already.
                    replace(request, force_host=None, exclude_hosts=frozenset()),
                    _one_host_policy(self.config),
                )
                if isinstance(recheck, Refusal):
                    log.info("host %s filled up while placing %s; deciding again", result.host_id, req.name)
                    s.rollback()
                    self.fleet.upsert(host, now)
                    return None
                # The pCPUs picked on the fresh host state under its lock, not the memory's.
                pcpus = recheck.pcpus
            amounts = _claim_amounts(request, replace(result, pcpus=pcpus))
            # The definition is part of the claim: one transaction places, claims and
            # records what will be built (the spec needs the host as locked and its pCPUs).
            spec = self._spec(req, vm_uuid, host, pcpus)
            repo.insert_claim(
                s,
                vm=self._vm_row(req, vm_uuid, result.host_id, now, pcpus, spec),
                host_id=result.host_id,
                amounts=amounts,
                new=not rehome,
            )
        # The host as this transaction left it: no need to read it back.
        self.fleet.upsert(with_claim(host, amounts), now)
        return _Claimed(replace(result, pcpus=pcpus), host, spec)

    def _spec(self, req: api.VmCreate, vm_uuid: str, host: repo.HostRecord, pcpus: tuple[int, ...]) -> VmSpec:
        """The VM's definition on ``host``; InvalidRequest for a cpuset naming a CPU the host does
        not have (called inside the claim's transaction, which the refusal rolls back)."""
        if req.cpuset is not None and max(parse_cpuset(req.cpuset)) >= host.cpus:
            raise InvalidRequest(
                f"cpuset {req.cpuset!r} names CPUs that host {host.id} (CPUs 0-{host.cpus - 1}) does not have",
                details={"field": "cpuset", "max_cpu": host.cpus - 1, "host": host.id},
            )
        emulator = tuning_inventory.emulator_cpuset(host, dedicated=req.cpu_policy == "dedicated")
        return build_spec(req, vm_uuid, host, pcpus=pcpus, emulator_cpuset=emulator)

    def _vm_row(
        self,
        req: api.VmCreate,
        vm_uuid: str,
        host_id: str,
        now: float,
        pcpus: tuple[int, ...],
        spec: VmSpec,
    ) -> dict[str, object]:
        return {
            "uuid": vm_uuid,
            "name": req.name,
            "host_id": host_id,
            "status": Lifecycle.BUILDING,
            "task": Task.BUILDING,
            "owner": self.instance_id,
            "desired_power": DesiredPower.RUNNING if req.start else DesiredPower.SHUTOFF,
            "power_state": PowerState.NOSTATE.value,
            "vcpus": req.vcpus,
            "max_vcpus": req.vcpus,
            "memory_mib": req.memory_mib,
            "max_memory_mib": req.memory_mib,
            "disk_gib": req.disk_gib,
            "spec": spec,
            "idempotency_key": req.idempotency_key,
            "cpu_policy": req.cpu_policy,
            "server_group": req.server_group,
            "pcpus": pcpus,
            "hugepage_size_kib": page_size_kib(req.hugepage_size) if req.hugepage_size else None,
            "allow_shared_disk": req.allow_shared_disk,
            "created_at": now,
            "updated_at": now,
        }

    def _build_logged(self, req: api.VmCreate, vm_uuid: str, claimed: _Claimed) -> None:
        try:
            self._build(req, vm_uuid, claimed)
        except VirtfleetError as exc:
            log.warning("background build of %s failed: %s", req.name, exc.message)
        except Exception:
            log.exception("background build of %s crashed", req.name)

    def _build(self, req: api.VmCreate, vm_uuid: str, claimed: _Claimed) -> VmView:
        """Build on the claimed host; on a host failure release and try the next host."""
        tried: list[str] = []
        failures: list[str] = []
        while True:
            host = claimed.host
            tried.append(host.id)
            spec = claimed.spec
            try:
                result = self.agents.call(
                    host.id,
                    VM_CREATE,
                    CreateVm(spec=spec, start=req.start, allow_shared_disk=req.allow_shared_disk),
                )
            except (RequestTimeout, HostDown, Interrupted) as exc:
                # Ambiguous: the agent may still finish (no reply in time, its host declared down
                # meanwhile, or this controller stopping). Keep the claim; reports will tell.
                self._fail(vm_uuid, f"build on {host.id} got no reply: {exc.message}", keep_host=True)
                raise
            except RESCHEDULABLE as exc:
                failures.append(f"{host.id}: {exc.message}")
                log.warning("build of %s failed on %s: %s", req.name, host.id, exc.message)
                if not isinstance(exc, TransportError):
                    self._clean_failed_build(host.id, vm_uuid, req.name)
                for attempt in self.retrying():
                    with attempt, self.tx() as s:
                        repo.release(s, vm_uuid, host.id)
                        repo.update_vm(s, vm_uuid, self.clock(), host_id=None, status=Lifecycle.BUILDING)
                self.hosts_changed(host.id)
                if len(tried) >= self.config.max_attempts:
                    self._fail(vm_uuid, "; ".join(failures), keep_host=False)
                    raise HypervisorError(
                        f"build of {req.name} failed on every host tried: {'; '.join(failures)}",
                        details={"hosts": tried},
                    ) from exc
                try:
                    claimed = self._claim(
                        req, vm_uuid, self._placement_request(req, exclude=tuple(tried)), rehome=True
                    )
                except NoValidHost as refused:
                    self._fail(vm_uuid, "; ".join(failures), keep_host=False)
                    raise NoValidHost(
                        f"build of {req.name} failed on {', '.join(tried)} and no other host can take it: "
                        f"{'; '.join(failures)}; {refused.message}",
                        details=refused.details,
                    ) from exc
                continue
            except (InvalidRequest, AlreadyExists, NotFound):
                # The agent refused the request itself (image missing or in use by another guest, name
                # taken on the host) and built nothing: a refusal changes nothing, so forget the VM.
                for attempt in self.retrying():
                    with attempt, self.tx() as s:
                        repo.release(s, vm_uuid, host.id)
                        repo.delete_vm(s, vm_uuid)
                self.hosts_changed(host.id)
                raise
            except VirtfleetError as exc:
                self._fail(vm_uuid, exc.message, keep_host=False)
                for attempt in self.retrying():
                    with attempt, self.tx() as s:
                        repo.release(s, vm_uuid, host.id)
                self.hosts_changed(host.id)
                raise
            # Builds that finish together record their results in one transaction.
            return self._built.submit((vm_uuid, result))

    def _clean_failed_build(self, host_id: str, vm_uuid: str, name: str) -> None:
        """Remove what a failed build left on a host (a defined domain, new disks); best effort.

        Like Nova's cleanup before a reschedule: the host must not keep a half-built VM that
        nobody accounts for. Only disks the agent created for this VM are deleted.
        """
        try:
            self.agents.call(host_id, VM_DELETE, DeleteVm(vm=VmRef(vm_uuid, name), delete_disks=True))
        except VirtfleetError as exc:
            log.warning("could not clean up the failed build of %s on %s: %s", name, host_id, exc.message)

    def _fail(self, vm_uuid: str, message: str, *, keep_host: bool) -> None:
        values: dict[str, object] = {"status": Lifecycle.ERROR, "task": None, "last_error": message}
        if not keep_host:
            values["host_id"] = None
        for attempt in self.retrying():
            with attempt, self.tx() as s:
                repo.update_vm(s, vm_uuid, self.clock(), **values)

    def _record_builds(self, built: Sequence[tuple[str, VmResult]]) -> list[VmView | BaseException]:
        """The results of builds that finished together (the VMs now active), in one transaction;
        a VM deleted meanwhile is that build's NotFound only."""
        now = self.clock()
        views: list[VmView | BaseException] = []
        for attempt in self.retrying():
            with attempt, self.core_tx() as s:
                views = []
                for vm_uuid, result in built:
                    try:
                        views.append(
                            fleet.vm_view(
                                repo.record_result(s, vm_uuid, now, result.status, Lifecycle.ACTIVE)
                            )
                        )
                    except NotFound as exc:
                        views.append(exc)
        return views

    def apply_result(self, vm_uuid: str, result: VmResult, *, status: Lifecycle | None = None) -> VmView:
        """Record what an agent did to a VM (a transient database failure is retried: the VM
        changed on its host whatever happens here)."""
        for attempt in self.retrying():
            with attempt, self.tx() as s:
                return fleet.vm_view(repo.record_result(s, vm_uuid, self.clock(), result.status, status))
        raise AssertionError("unreachable: the last failed attempt re-raises")

    def resize_claim(self, vm_uuid: str, host_id: str, new_amounts: dict[str, int]) -> None:
        """Change a VM's allocations on its host (live vCPU/memory changes).

        A grow is checked against the host's capacity at its ratios under the same lock as a
        create claim (CapacityExceeded naming the resource and shortfall when it does not
        fit); a shrink always succeeds and frees capacity at once.
        """
        now = self.clock()
        with self.tx() as s:
            repo.bump_generation(s, host_id)
            current = repo.allocations_of(s, vm_uuid)
            grow = {r: a - current.get(r, 0) for r, a in new_amounts.items() if a > current.get(r, 0)}
            if grow:
                fresh = self.fleet.freshen(repo.get_host(s, host_id, include_vms=False))
                check = place(
                    fleet.snapshot([fresh], self.config, now),
                    fleet.placement_request(
                        f"grow of {vm_uuid}",
                        {ResourceClass(r): a for r, a in grow.items()},
                        force_host=host_id,
                    ),
                    _one_host_policy(self.config),
                )
                if isinstance(check, Refusal):
                    raise CapacityExceeded(
                        f"host {host_id} has no room for the change: {check.summary()}",
                        details={"reasons": [r.as_dict() for r in check.reasons]},
                    )
            repo.set_allocations(s, vm_uuid, host_id, new_amounts)
        self.hosts_changed(host_id)

    # ------------------------------------------------------------------ VMs: read

    def list_vms(self, req: api.VmListRequest) -> api.VmList:
        with self.tx() as s:
            records = repo.list_vms(s, req.host)
        views = [fleet.vm_view(r) for r in records]
        if not req.all:
            views = [v for v in views if v.power_state == PowerState.RUNNING]
        return api.VmList(tuple(views))

    def show_vm(self, name: str) -> VmView:
        with self.tx() as s:
            return fleet.vm_view(repo.get_vm(s, name))

    # ------------------------------------------------------------------ VMs: lifecycle

    def locate_vm(self, name: str) -> tuple[repo.VmRecord, repo.HostRecord]:
        """The VM and its host, for a query that changes nothing (no task is marked).

        NotFound for an unknown VM, Conflict when it has no host or its host is down.
        """
        now = self.clock()
        with self.tx() as s:
            vm = repo.get_vm(s, name)
            if vm.host_id is None:
                raise Conflict(f"VM {name} has no host (status {vm.status})")
            host = repo.get_host(s, vm.host_id)
        self._check_up(host, now, f"host {host.id} of VM {name}")
        return vm, host

    def up_host(self, host_id: str) -> repo.HostRecord:
        """A host that is up (NotFound, or Conflict when it is down)."""
        now = self.clock()
        with self.tx() as s:
            host = repo.get_host(s, host_id)
        self._check_up(host, now, f"host {host_id}")
        return host

    def _check_up(self, host: repo.HostRecord, now: float, what: str) -> None:
        host = self.fleet.freshen(host)
        if not fleet.host_is_up(host, now, self.config.down_after_s):
            raise HostDown(
                f"{what} is down (last heartbeat {_ago(host.last_heartbeat, now)}); "
                "try again when its agent is back",
                details={"host": host.id},
            )

    def target(self, name: str, task: Task) -> tuple[repo.VmRecord, str]:
        """The VM and its host, after checking the host can be talked to; marks the task."""
        now = self.clock()
        with self.tx() as s:
            vm = repo.get_vm(s, name)
            if vm.host_id is None:
                raise Conflict(f"VM {name} has no host (status {vm.status}); only delete is possible")
            if vm.status is Lifecycle.BUILDING:
                raise Conflict(f"VM {name} is still being built", retryable=True)
            host = repo.get_host(s, vm.host_id)
            self._check_up(host, now, f"host {host.id} of VM {name}")
            repo.update_vm(s, vm.uuid, now, task=task, owner=self.instance_id)
        return vm, vm.host_id

    def finish_task(self, vm: repo.VmRecord, **values: object) -> None:
        """Clear the VM's task (after a failure: with ``last_error``) and store ``values``."""
        with self.tx() as s:
            repo.update_vm(s, vm.uuid, self.clock(), task=None, **values)

    def change_vm(
        self,
        name: str,
        task: Task,
        call: Callable[[repo.VmRecord, str, VmRef], VmResult],
        *,
        desired: Callable[[VmResult], DesiredPower | None] = lambda _r: None,
    ) -> VmActionDone:
        """The one path of an operation on a VM: find it, check its host, mark the task, call the
        agent, record the VM's state afterwards (or the error, with the task cleared)."""
        vm, host_id = self.target(name, task)
        try:
            result = call(vm, host_id, VmRef(uuid=vm.uuid, name=vm.name))
        except VirtfleetError as exc:
            self.finish_task(vm, last_error=exc.message)
            raise
        want = desired(result)
        if want is not None:
            with self.tx() as s:
                repo.update_vm(s, vm.uuid, self.clock(), desired_power=want)
        return VmActionDone(self.apply_result(vm.uuid, result), result.message)

    def vm_action(self, op: ApiCall[VmRefRequest, VmActionDone]) -> Callable[[VmRefRequest], VmActionDone]:
        """The handler of a simple VM operation (an API call forwarded with :class:`VmForward`)."""
        forward = op.forward
        if not isinstance(forward, VmForward):
            raise ValueError(f"{op.kind} is not a simple VM operation")

        def desired(result: VmResult) -> DesiredPower | None:
            if forward.desired is not None:
                return forward.desired
            return None if result.status is None else DesiredPower.after(result.status.state)

        def handle(req: VmRefRequest) -> VmActionDone:
            return self.change_vm(
                req.name,
                forward.task,
                lambda _vm, host_id, ref: self.agents.call(host_id, forward.command, VmAction(ref)),
                desired=desired,
            )

        return handle

    def forward_to_host(self, op: ApiCall[B, R]) -> Callable[[B], R]:
        """The handler of an API call forwarded unchanged to the agent of ``body.host``
        (declared with :func:`~common.messages.descriptor.host_twin`).

        A body with an empty ``change_id`` gets a fresh one here, so that a redelivery of the
        command is recognised by the agent as the same change.
        """
        forward = op.forward
        if not isinstance(forward, ToHostAgent):
            raise ValueError(f"{op.kind} is not forwarded to a host")
        command: Command[B, R] = forward.command

        def handle(body: B) -> R:
            host_id = getattr(body, "host", "")
            if not host_id:
                raise NotFound("no host given")
            with self.tx() as s:
                repo.get_host(s, host_id)  # NotFound for an unknown host
            if getattr(body, "change_id", None) == "":
                body = replace_message(cast(Any, body), change_id=uuidlib.uuid4().hex)
            return self.agents.call(host_id, command, body)

        return handle

    def shutdown_vm(self, req: api.VmShutdownRequest) -> VmActionDone:
        def call(_vm: repo.VmRecord, host_id: str, ref: VmRef) -> VmResult:
            body = ShutdownVm(vm=ref, timeout_s=req.timeout_s, force_after_timeout=req.force)
            return self.agents.call(host_id, VM_SHUTDOWN, body)

        return self.change_vm(req.name, Task.SHUTTING_DOWN, call, desired=lambda _r: DesiredPower.SHUTOFF)

    def delete_vm(self, req: api.VmDeleteRequest) -> VmActionDone:
        with self.tx() as s:
            vm = repo.get_vm(s, req.name)
        if vm.host_id is not None:
            vm, host_id = self.target(req.name, Task.DELETING)
            try:
                self.agents.call(
                    host_id, VM_DELETE, DeleteVm(vm=VmRef(vm.uuid, vm.name), delete_disks=req.delete_disks)
                )
            except VirtfleetError as exc:
                self.finish_task(vm, last_error=exc.message)
                raise
        with self.tx() as s:
            if vm.host_id is not None:
                repo.release(s, vm.uuid, vm.host_id)
            repo.delete_vm(s, vm.uuid)
        if vm.host_id is not None:
            self.hosts_changed(vm.host_id)
        return VmActionDone(None, f"deleted {vm.name}" + (" and its disks" if req.delete_disks else ""))


def _claim_amounts(request: PlacementRequest, placement: Placement) -> dict[str, int]:
    """What a claim allocates: the request's resources and the placement's dedicated pCPUs."""
    return {
        **{str(k): v for k, v in request.resources.items()},
        **tuning_inventory.pcpu_allocations(placement.pcpus),
    }


def _ago(when: float | None, now: float) -> str:
    if when is None:
        return "never"
    return f"{now - when:.0f} s ago"


def _request_group(session: Session, request: PlacementRequest) -> list[repo.ServerGroupRecord]:
    """The request's server group with its members: the only group the scheduler looks at,
    so a create outside any group costs no group query. A missing group stays missing
    (the scheduler then reports it)."""
    if request.group is None:
        return []
    group = repo.find_server_group(session, request.group)
    return [] if group is None else [group]


def _place(
    snapshot: FleetSnapshot, request: PlacementRequest, policy: PlacementPolicy
) -> Placement | Refusal:
    """The pure scheduler over a whole snapshot."""
    return _guard_group(request, lambda: place(snapshot, request, policy))


def _guard_group(request: PlacementRequest, decide: Callable[[], R]) -> R:
    """A group deleted since the request was checked is NotFound, not a crash."""
    try:
        return decide()
    except UnknownServerGroupError:
        raise NotFound(f"server group {request.group!r} does not exist") from None


def _one_host_policy(config: ControllerConfig) -> PlacementPolicy:
    """The policy for re-checking one host under its lock: the fleet-wide rules (N+1 keeps a
    host's worth of room across the fleet) were applied when the host was chosen, and on a
    one-host snapshot N+1 would refuse everything."""
    return replace(fleet.policy(config), n_plus_one=False)


def _no_valid_host(refusal: Refusal) -> NoValidHost:
    return NoValidHost(
        f"no host can take {refusal.vm_name}: {refusal.summary()}",
        details={"reasons": [r.as_dict() for r in refusal.reasons], "tally": refusal.tally()},
    )


def _placement_view(placement: Placement) -> api.PlacementView:
    return api.PlacementView(
        host=placement.host_id,
        alternates=placement.alternates,
        candidates=tuple(
            api.CandidateView(host=c.host_id, score=c.score, weights=dict(c.weights))
            for c in placement.ranked
        ),
        rejected=tuple(fleet.rejection_view(r) for r in placement.rejections),
    )


def _placement_view_of(host: str | None) -> api.PlacementView:
    return api.PlacementView(host=host, alternates=(), candidates=(), rejected=())
