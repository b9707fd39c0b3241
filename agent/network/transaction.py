"""Safe host-network changes: snapshot, apply, prove the broker is reachable, else restore.

:class:`ChangeManager` runs one change at a time:

1. read the facts and plan (a refused request changes nothing);
2. snapshot links (master, up), addresses, routes, STP and resolv.conf, and write the snapshot
   to the state dir (if the agent dies before the change is kept, it restores it on start);
3. apply the steps in order; if one fails, restore the snapshot and raise;
4. run the probe: a real AMQP round trip to the broker on a *new* connection, retried until
   ``deadline_s``; if the broker stays unreachable, restore the snapshot by itself, ask for a
   host report (which carries :class:`~common.messages.network.RollbackInfo`) and answer
   ``rolled-back``;
5. with ``confirm_s``, hold the change until ``net.host.confirm`` (``netplan try``): a timer
   restores it when no confirm comes; ``net.host.revert`` restores it at once;
6. once kept, write the persistent configuration (unless ``persist`` is off).

Restoring re-reads the facts before each phase of :data:`agent.network.planner.RESTORE_PHASES`
and keeps going past a failed step; ``restored=False`` with the errors means some of the
snapshot could not be put back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from agent.network import resolv
from agent.network.model import (
    DnsStep,
    LinkStep,
    PendingRecord,
    Probe,
    RestoreResolvConf,
    SetDns,
    Snapshot,
    Step,
    describe,
)
from agent.network.persist import Persister, configs_from_facts
from agent.network.planner import RESTORE_PHASES, Plan, restore_steps
from common.codec import from_wire, to_wire
from common.errors import Conflict, NetworkConfigError, NotFound, VirtfleetError
from common.messages.base import replace
from common.messages.network import (
    ChangeOptions,
    HostNetworkReport,
    NetChangeResult,
    PendingChange,
    RollbackInfo,
)

log = logging.getLogger(__name__)

PENDING_FILE = "network-pending.json"
ROLLBACK_FILE = "network-last-rollback.json"
_RESULTS_KEPT = 64


class LinkDriver(Protocol):
    """What the transaction needs from the netlink driver."""

    def facts(self) -> HostNetworkReport: ...

    def apply(self, step: LinkStep) -> None: ...


class Executor:
    """Runs steps against the kernel and resolv.conf; takes snapshots and restores them."""

    def __init__(
        self, driver: LinkDriver, dns: resolv.ResolvConf, clock: Callable[[], float] = time.time
    ) -> None:
        self.driver = driver
        self.dns = dns
        self._clock = clock

    def facts(self) -> HostNetworkReport:
        return self.driver.facts()

    def resolv_text(self) -> str | None:
        return self.dns.read()

    def snapshot(self, facts: HostNetworkReport) -> Snapshot:
        return Snapshot(
            interfaces=facts.interfaces,
            routes=facts.routes,
            bridges=facts.bridges,
            resolv_conf=self.dns.read(),
            taken_at=self._clock(),
        )

    def apply(self, step: Step) -> None:
        if isinstance(step, SetDns | RestoreResolvConf):
            self._apply_dns(step)
        else:
            self.driver.apply(step)

    def _apply_dns(self, step: DnsStep) -> None:
        if self.dns.managed_elsewhere():
            log.warning("%s is a symlink (managed elsewhere): not changed at runtime", self.dns.path)
            return
        if isinstance(step, SetDns):
            self.dns.write(resolv.with_nameservers(self.dns.read() or "", step.servers))
        else:
            self.dns.write(step.text)

    def run(self, steps: tuple[Step, ...]) -> None:
        """Apply in order; NetworkConfigError names the failed step (nothing is undone here)."""
        for i, step in enumerate(steps, 1):
            try:
                self.apply(step)
            except NetworkConfigError as exc:
                raise NetworkConfigError(
                    f"step {i}/{len(steps)} failed: {exc.message}",
                    details={**exc.details, "step": i, "steps": [describe(s) for s in steps]},
                ) from None

    def restore(self, snap: Snapshot) -> tuple[bool, list[str]]:
        """Back to ``snap``, phase by phase; (fully restored, errors)."""
        errors: list[str] = []
        for phase in RESTORE_PHASES:
            try:
                facts = self.driver.facts()
                text = self.dns.read()
            except VirtfleetError as exc:
                errors.append(exc.message)
                continue
            for step in phase(snap, facts, text):
                try:
                    self.apply(step)
                except VirtfleetError as exc:
                    errors.append(exc.message)
        try:
            left = restore_steps(snap, self.driver.facts(), self.dns.read())
        except VirtfleetError as exc:
            return False, [*errors, exc.message]
        if left:
            errors.append("still different: " + "; ".join(describe(s) for s in left))
        return not left, errors


@dataclass
class _Pending:
    record: PendingRecord
    options: ChangeOptions
    result: NetChangeResult
    timer: threading.Timer | None = None


class ChangeManager:
    """One host-network change at a time, each a transaction (see the module doc)."""

    def __init__(
        self,
        executor: Executor,
        probe: Probe,
        persister: Persister,
        state_dir: Path | None,
        *,
        on_change: Callable[[], object] = lambda: None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.executor = executor
        self.probe = probe
        self.persister = persister
        self.state_dir = state_dir
        self._on_change = on_change
        self._clock = clock
        self._monotonic = monotonic
        self._lock = threading.RLock()
        self._pending: _Pending | None = None
        self._results: OrderedDict[str, NetChangeResult] = OrderedDict()
        self.last_rollback: RollbackInfo | None = self._load_last_rollback()

    # ------------------------------------------------------------------ state files

    def _path(self, name: str) -> Path | None:
        return self.state_dir / name if self.state_dir is not None else None

    def _save(self, name: str, data: object) -> None:
        path = self._path(name)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(to_wire(data)), encoding="utf-8")
        tmp.replace(path)

    def _drop(self, name: str) -> None:
        path = self._path(name)
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def _load_last_rollback(self) -> RollbackInfo | None:
        path = self._path(ROLLBACK_FILE)
        if path is None or not path.exists():
            return None
        try:
            return from_wire(RollbackInfo, json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, VirtfleetError):
            log.warning("ignoring unreadable %s", path)
            return None

    @property
    def pending(self) -> PendingChange | None:
        p = self._pending
        if p is None or p.record.expires_at is None:
            return None
        return PendingChange(p.record.change_id, p.record.operation, p.record.expires_at)

    # ------------------------------------------------------------------ startup

    def recover(self) -> RollbackInfo | None:
        """Undo a change the agent did not finish (it died before keeping or undoing it)."""
        path = self._path(PENDING_FILE)
        if path is None or not path.exists():
            return None
        try:
            record = from_wire(PendingRecord, json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, VirtfleetError) as exc:
            log.error("cannot read %s (%s); not restoring anything", path, exc)
            return None
        with self._lock:
            log.warning("restoring the network as it was before unfinished change %s", record.operation)
            return self._rollback(record, "the agent restarted before the change was kept")

    # ------------------------------------------------------------------ the transaction

    def run(
        self,
        change_id: str,
        options: ChangeOptions,
        plan_fn: Callable[[HostNetworkReport, str | None], Plan],
    ) -> NetChangeResult:
        change_id = change_id or uuid.uuid4().hex
        with self._lock:
            done = self._results.get(change_id)
            if done is not None:
                return done  # a redelivered copy of a change already handled
            if self._pending is not None:
                p = self._pending.record
                raise Conflict(
                    f"change {p.change_id} ({p.operation}) is waiting for confirmation; confirm or revert it first",
                    details={"change_id": p.change_id},
                )
            started = self._monotonic()
            facts = self.executor.facts()
            plan = plan_fn(facts, self.executor.resolv_text())
            steps = tuple(describe(s) for s in plan.steps)
            if options.dry_run:
                return NetChangeResult(change_id, plan.operation, "dry-run", steps=steps, facts=facts)
            if not plan.steps:
                result = NetChangeResult(change_id, plan.operation, "unchanged")
                result = self._keep(result, plan, options, facts)
                return self._remember(replace(result, elapsed_s=self._monotonic() - started))
            record = PendingRecord(
                change_id, plan.operation, self.executor.snapshot(facts), plan.touched, plan.removed
            )
            self._save(PENDING_FILE, record)
            log.info("network change %s (%s): %d steps", change_id, plan.operation, len(plan.steps))
            try:
                self.executor.run(plan.steps)
            except NetworkConfigError as exc:
                info = self._rollback(record, exc.message)
                raise NetworkConfigError(
                    f"{plan.operation}: {exc.message}; "
                    + (
                        "the host was restored as it was"
                        if info.restored
                        else "restoring failed: " + "; ".join(info.errors)
                    ),
                    details={
                        **exc.details,
                        "rolled_back": True,
                        "restored": info.restored,
                        "change_id": change_id,
                    },
                ) from None
            probe = self.probe(options.deadline_s)
            base = NetChangeResult(change_id, plan.operation, "applied", steps=steps, probe=probe.detail)
            if not probe.ok:
                info = self._rollback(
                    record, f"could not reach the broker within {options.deadline_s:g} s: {probe.detail}"
                )
                result = replace(
                    base,
                    state="rolled-back",
                    rolled_back=True,
                    rollback_reason=info.reason,
                    restored=info.restored,
                    warnings=info.errors,
                )
                return self._remember(self._finish(result, started))
            if options.confirm_s is not None:
                expires = self._clock() + options.confirm_s
                record = dataclasses.replace(record, expires_at=expires)
                self._save(PENDING_FILE, record)
                result = replace(base, state="pending-confirm", confirm_expires_at=expires)
                timer = threading.Timer(options.confirm_s, self._expire, args=(change_id,))
                timer.daemon = True
                self._pending = _Pending(record, options, result, timer)
                timer.start()
                self._on_change()
                return self._finish(result, started)
            self._drop(PENDING_FILE)
            result = self._keep(base, plan, options, self.executor.facts())
            self._on_change()
            return self._remember(self._finish(result, started))

    def _finish(self, result: NetChangeResult, started: float) -> NetChangeResult:
        try:
            facts = self.executor.facts()
        except VirtfleetError:
            facts = None
        return replace(result, elapsed_s=self._monotonic() - started, facts=facts)

    def _remember(self, result: NetChangeResult) -> NetChangeResult:
        self._results[result.change_id] = result
        while len(self._results) > _RESULTS_KEPT:
            self._results.popitem(last=False)
        return result

    def _keep(
        self,
        result: NetChangeResult,
        plan: Plan | PendingRecord,
        options: ChangeOptions,
        facts: HostNetworkReport,
    ) -> NetChangeResult:
        """The change stays: write the persistent configuration."""
        backend = self.persister.backend
        if not options.persist:
            return replace(result, persistence="runtime only (--no-persist)")
        if backend == "none":
            return replace(
                result,
                persistence="none",
                warnings=(*result.warnings, "no supported network configuration system found: not persisted"),
            )
        try:
            dns = resolv.nameservers(self.executor.resolv_text() or "")
            files = self.persister.apply(configs_from_facts(facts, plan.touched, dns), plan.removed)
        except VirtfleetError as exc:
            return replace(
                result, persistence=backend, warnings=(*result.warnings, f"not persisted: {exc.message}")
            )
        return replace(result, persistence=backend, persisted=tuple(files))

    def _rollback(self, record: PendingRecord, reason: str) -> RollbackInfo:
        restored, errors = self.executor.restore(record.snapshot)
        info = RollbackInfo(
            change_id=record.change_id,
            operation=record.operation,
            at=self._clock(),
            reason=reason,
            restored=restored,
            errors=tuple(errors),
        )
        if restored:
            self._drop(PENDING_FILE)
        log.warning(
            "network change %s (%s) rolled back: %s%s",
            record.change_id,
            record.operation,
            reason,
            "" if restored else f"; NOT fully restored: {'; '.join(errors)}",
        )
        self.last_rollback = info
        with contextlib.suppress(OSError):
            self._save(ROLLBACK_FILE, info)
        self._on_change()
        return info

    # ------------------------------------------------------------------ confirm / revert

    def _take_pending(self, change_id: str) -> _Pending:
        p = self._pending
        if p is None or p.record.change_id != change_id:
            done = self._results.get(change_id)
            if done is not None:
                raise Conflict(f"change {change_id} is no longer pending: it was {done.state}")
            raise NotFound(f"no change {change_id} is waiting for confirmation on this host")
        self._pending = None
        if p.timer is not None:
            p.timer.cancel()
        return p

    def confirm(self, change_id: str) -> NetChangeResult:
        with self._lock:
            done = self._results.get(change_id)
            if done is not None and done.state == "applied":
                return done
            p = self._take_pending(change_id)
            self._drop(PENDING_FILE)
            result = self._keep(
                replace(p.result, state="applied", confirm_expires_at=None),
                p.record,
                p.options,
                self.executor.facts(),
            )
            self._on_change()
            return self._remember(self._finish(result, self._monotonic()))

    def revert(self, change_id: str, reason: str = "reverted by the operator") -> NetChangeResult:
        with self._lock:
            done = self._results.get(change_id)
            if done is not None and done.rolled_back:
                return done
            p = self._take_pending(change_id)
            info = self._rollback(p.record, reason)
            result = replace(
                p.result,
                state="reverted" if reason.startswith("reverted") else "rolled-back",
                rolled_back=True,
                rollback_reason=reason,
                restored=info.restored,
                warnings=info.errors,
                confirm_expires_at=None,
            )
            return self._remember(self._finish(result, self._monotonic()))

    def _expire(self, change_id: str) -> None:
        with self._lock:
            p = self._pending
            if p is None or p.record.change_id != change_id:
                return
            seconds = p.options.confirm_s or 0
            try:
                self.revert(change_id, f"not confirmed within {seconds:g} s")
            except VirtfleetError as exc:
                log.error("could not undo unconfirmed change %s: %s", change_id, exc.message)

    def close(self) -> None:
        p = self._pending
        if p is not None and p.timer is not None:
            p.timer.cancel()
