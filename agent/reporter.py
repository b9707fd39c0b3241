"""Host reports, VM deltas and heartbeats: pure builders plus a thin publishing thread.

:func:`build_report` turns gathered facts into a :class:`~common.messages.host.HostReport` and
:func:`build_vm_changes` a set of re-read domains into a :class:`~common.messages.host.VmChanges`
(both unit-tested). :class:`Reporter` runs a thread that publishes through a :class:`ReportSink`:

* ``host.heartbeat`` every heartbeat interval (only while the command consumer is healthy);
* a full ``host.report`` (O(VMs): every domain plus the host's facts) on start, every report
  interval, when :meth:`Reporter.request_report` is called (``host.report_now``, and host-level
  changes of the network and tuning modules, whose facts only the full report carries) and once
  more on stop;
* ``host.vm_changes`` (O(changed VMs)) shortly after :meth:`Reporter.vm_changed`: a command
  touched the VM, or the hypervisor emitted a lifecycle event for it (someone powered it off at
  the console, the guest shut itself down, QEMU crashed). The domains named are re-read when the
  delta is sent, after its ``reported_at`` is stamped, so a delta never carries a state older
  than its stamp, and notes made within :data:`DELTA_DELAY_S` of each other go out as one.
  A domain whose re-read state is the one a command just answered the controller with
  (:meth:`Reporter.vm_told`: the controller records every :class:`~common.messages.vm.VmResult`
  status by the delta's rule) is left out, and a delta left empty is not sent: after a command
  and its own lifecycle events, a delta would only say again what the reply said (the agent's
  and the controller's cost of a create fell by a fifth, docs/performance.md). Only a reply the
  controller never recorded (its call timed out, it crashed) leaves the VM's power state to the
  next full report or to recovery.

A failure is logged and retried later; it never ends the thread.

While the hypervisor cannot reach libvirt (its calls raise
:class:`~common.errors.HypervisorUnavailable`: libvirtd restarted), the full report is the last
one sent with :attr:`~common.messages.host.HostReport.hypervisor_error` set (the controller shows
the host *degraded* and places nothing there), deltas wait, and heartbeats go on; after the
reconnect (:meth:`Reporter.hypervisor_changed`) a full report is sent at once, since events may
have been missed meanwhile.

:meth:`Reporter.step` is one pass of that loop (send what is due, say when the next thing is
due), so that :class:`agent.report_scheduler.ReportScheduler` can drive the reporters of many
hosts from one thread instead of a thread per host.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Protocol, TypeVar

import msgspec

from agent.ports import ACTIVE_STATES, Hypervisor, NodeFacts
from common import codec
from common.errors import HypervisorUnavailable, VirtfleetError
from common.messages.descriptor import Report
from common.messages.envelope import Envelope
from common.messages.host import (
    HOST_HEARTBEAT,
    HOST_REPORT,
    HOST_VM_CHANGES,
    Heartbeat,
    HostReport,
    VmChanges,
)
from common.messages.vm import VmStatus
from common.transport.port import Transport
from common.transport.topology import HEARTBEAT_TTL_MS, REPORT_TTL_MS, REPORTS_EXCHANGE, report_routing_key

log = logging.getLogger(__name__)

B = TypeVar("B")

#: Seconds a delta waits after the first change it carries, so that the changes of one command
#: (define, start, the command's own note) and of an event burst go out as one message.
DELTA_DELAY_S = 0.05

#: the longest ``hypervisor_error`` sent (libvirt's messages are short; the field is Text)
MAX_ERROR_CHARS = 500


# ------------------------------------------------------------------------------------------ pure


def free_memory_mib(total_mib: int, reported_free_mib: int, vms: Iterable[VmStatus]) -> int:
    """Free host memory: the hypervisor's figure when it has one (> 0), else total minus active VMs."""
    if reported_free_mib > 0:
        return min(reported_free_mib, total_mib)
    used = sum(vm.memory_mib for vm in vms if vm.state in ACTIVE_STATES)
    return max(0, total_mib - used)


def build_report(
    *,
    host_id: str,
    libvirt_uri: str,
    agent_version: str,
    facts: NodeFacts,
    vms: tuple[VmStatus, ...],
    seq: int,
    started_at: float,
    reported_at: float,
) -> HostReport:
    """The full report for one moment, from facts gathered by the hypervisor driver."""
    return HostReport(
        host_id=host_id,
        hostname=facts.hostname,
        agent_version=agent_version,
        hypervisor_type=facts.hypervisor_type,
        hypervisor_version=facts.hypervisor_version,
        libvirt_uri=libvirt_uri,
        hw_virt=facts.hw_virt,
        cpu=facts.cpu,
        memory_mib=facts.memory_mib,
        memory_free_mib=free_memory_mib(facts.memory_mib, facts.free_memory_mib, vms),
        storage=facts.storage,
        networks=facts.networks,
        bridges=facts.bridges,
        vms=vms,
        seq=seq,
        started_at=started_at,
        reported_at=reported_at,
    )


def build_vm_changes(
    *, host_id: str, started_at: float, seq: int, reported_at: float, found: Mapping[str, VmStatus | None]
) -> VmChanges:
    """The delta for domains re-read after ``reported_at``: uuid -> its status, None when gone."""
    vms = sorted((st for st in found.values() if st is not None), key=lambda st: (st.name, st.uuid))
    gone = sorted(uuid for uuid, st in found.items() if st is None)
    return VmChanges(
        host_id=host_id,
        started_at=started_at,
        seq=seq,
        reported_at=reported_at,
        vms=tuple(vms),
        gone=tuple(gone),
    )


def same_state(reread: VmStatus | None, told: VmStatus | None) -> bool:
    """Whether a re-read domain is what the controller was last told of it: every field the
    controller stores, except the CPU time (which runs on in a running guest and is only written
    along with a change, as in the controller's rule for deltas and reports)."""
    if reread is None or told is None:
        return False
    return msgspec.structs.replace(reread, cpu_time_ns=0) == msgspec.structs.replace(told, cpu_time_ns=0)


def report_envelope(op: Report[B], body: B, sender: str, sent_at: float, ttl_s: float) -> Envelope:
    """The envelope of a report: worthless (skipped by the controller) after ``ttl_s`` seconds."""
    return Envelope(
        kind=op.kind, body=codec.to_wire(body), sender=sender, sent_at=sent_at, expires_at=sent_at + ttl_s
    )


# ------------------------------------------------------------------------------------------ thread


class ReportSink(Protocol):
    """Where the reporter publishes (:class:`TransportReportSink` on the fleet's broker)."""

    def send(self, op: Report[B], body: B, *, sent_at: float, ttl_s: float) -> None:
        """Publish one report; a virtfleet error when the broker did not take it."""
        ...


class TransportReportSink:
    """Reports on the ``virtfleet.reports`` exchange, routed by ``<kind>.<host id>``.

    Published ``mandatory``: until a controller has declared the reports queues (a fresh broker),
    a report is unroutable and the reporter sends it again soon rather than losing it.
    """

    def __init__(
        self,
        transport: Transport,
        host_id: str,
        sender: str,
        *,
        sign: Callable[[Envelope, str], Envelope] | None = None,
    ) -> None:
        self._transport = transport
        self._host_id = host_id
        self._sender = sender
        #: signs each report with the host's key (common.signing.Signer); None: unsigned
        self._sign = sign
        self._declared = False

    def send(self, op: Report[B], body: B, *, sent_at: float, ttl_s: float) -> None:
        if not self._declared:
            # On a fresh broker the exchange does not exist until someone declares it: publishing to
            # it would close the channel (404) instead of coming back unroutable.
            self._transport.declare_exchange(REPORTS_EXCHANGE)
            self._declared = True
        env = report_envelope(op, body, self._sender, sent_at, ttl_s)
        if self._sign is not None:
            env = self._sign(env, self._host_id)
        self._transport.publish(
            REPORTS_EXCHANGE.name, report_routing_key(op.kind, self._host_id), env, mandatory=True
        )


class Reporter:
    """Publishes heartbeats and reports for one host, from its own thread (:meth:`start`) or
    from a scheduler that calls :meth:`step` (then :meth:`start` is not called)."""

    def __init__(
        self,
        host_id: str,
        libvirt_uri: str,
        hypervisor: Hypervisor,
        sink: ReportSink,
        *,
        report_interval: float,
        heartbeat_interval: float,
        agent_version: str,
        alive: Callable[[], bool] = lambda: True,
        enrichers: Sequence[Callable[[HostReport], HostReport]] = (),
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        delta_delay: float = DELTA_DELAY_S,
    ) -> None:
        self.host_id = host_id
        self._uri = libvirt_uri
        self._hv = hypervisor
        self._sink = sink
        self._report_interval = report_interval
        self._heartbeat_interval = heartbeat_interval
        self._agent_version = agent_version
        self._alive = alive
        #: add facts of other agent modules (network, tuning) to each report; each returns a copy
        self._enrichers = tuple(enrichers)
        self._clock = clock
        self._monotonic = monotonic
        self._sender = f"agent:{host_id}"
        self.started_at = clock()
        self._lock = threading.Lock()
        self._seq = 0
        self._heartbeat_seq = 0
        self._pending = False
        #: uuids of domains to send in the next delta, and when (monotonic) it is due
        self._changed: set[str] = set()
        #: uuid -> the status a command's reply told the controller (vm_told), until the next
        #: delta naming that VM or the next full report
        self._told: dict[str, VmStatus] = {}
        self._delta_delay = delta_delay
        self._next_delta = 0.0
        self._wake = threading.Event()
        #: called by request_report: wakes whoever calls step() (the own thread by default)
        self._notify: Callable[[], None] = self._wake.set
        self._next_report = self._next_heartbeat = 0.0
        self._stop = threading.Event()
        self._final_report = True
        self._thread: threading.Thread | None = None
        #: the last report published (for diagnostics and tests)
        self.last_report: HostReport | None = None
        #: the last delta published (for diagnostics and tests)
        self.last_delta: VmChanges | None = None
        self.reports_sent = 0
        self.deltas_sent = 0
        #: deltas not sent because each of their VMs was as a command's reply had said
        self.deltas_skipped = 0
        self.heartbeats_sent = 0
        self.failures = 0

    # -- API for other threads --------------------------------------------------------
    def request_report(self) -> int:
        """Ask for a full report soon; return the seq it will carry at least."""
        with self._lock:
            self._pending = True
            seq = self._seq + 1
        self._notify()
        return seq

    def vm_changed(self, uuid: str) -> None:
        """Domain ``uuid`` changed (a command touched it, or a lifecycle event): send its state in
        a delta soon. Cheap and non-blocking: safe from libvirt's event thread."""
        with self._lock:
            if not self._changed:
                self._next_delta = max(self._next_delta, self._monotonic() + self._delta_delay)
            self._changed.add(uuid)
        self._notify()

    def vm_told(self, status: VmStatus) -> None:
        """A command answered the controller with this status of the VM (in a ``VmResult``, which
        the controller records): the next delta leaves the VM out if it is still so."""
        with self._lock:
            self._told[status.uuid] = status

    def hypervisor_changed(self, reason: str | None) -> None:
        """The hypervisor lost its libvirt connection (``reason``) or got it back (None): send a
        full report soon, degraded or fresh. Non-blocking: safe from the link's thread."""
        log.info("%s: libvirt %s", self.host_id, f"unreachable: {reason}" if reason else "reachable again")
        self.request_report()

    def notify_with(self, notify: Callable[[], None]) -> None:
        """Let ``notify`` (instead of the own thread's wake-up) learn of every requested report:
        how a scheduler driving :meth:`step` hears of them."""
        self._notify = notify

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name=f"reporter-{self.host_id}", daemon=True)
        self._thread.start()

    def stop(self, *, final_report: bool = True, timeout: float = 30.0) -> None:
        """Stop the thread; it sends one last report first unless told not to."""
        self._final_report = final_report
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- the loop ---------------------------------------------------------------------
    def begin(self, first_at: float) -> None:
        """The first report and heartbeat are due at ``first_at`` (monotonic): a scheduler
        staggers its hosts this way."""
        self._next_report = self._next_heartbeat = first_at

    def step(self) -> float:
        """Send a requested or due report, a due delta and a due heartbeat; return when
        (monotonic) the next is due. Called from one thread at a time."""
        now = self._monotonic()
        retry = min(self._report_interval, self._heartbeat_interval)
        if self._take_pending() or now >= self._next_report:
            ok = self._send_report()  # it carries every change noted so far: no delta needed
            self._next_report = now + (self._report_interval if ok else retry)
        elif self._delta_due(now) and not self._send_delta():
            with self._lock:
                self._next_delta = now + retry  # the changes stay noted: a later delta carries them
        if now >= self._next_heartbeat:
            if self._alive():
                self._send_heartbeat()
            self._next_heartbeat = now + self._heartbeat_interval
        due = min(self._next_report, self._next_heartbeat)
        with self._lock:
            return min(due, self._next_delta) if self._changed else due

    def send_final_report(self) -> None:
        """The last report, when the host's agent stops."""
        self._take_pending()
        self._send_report()

    def run(self) -> None:
        """The own thread: :meth:`step` until stopped, then the final report."""
        self.begin(self._monotonic())
        while not self._stop.is_set():
            due = self.step()
            self._wake.wait(max(0.0, due - self._monotonic()))
            self._wake.clear()
        if self._final_report:
            self.send_final_report()

    def _take_pending(self) -> bool:
        with self._lock:
            pending, self._pending = self._pending, False
        return pending

    def _delta_due(self, now: float) -> bool:
        with self._lock:
            return bool(self._changed) and now >= self._next_delta

    def _take_changed(self) -> set[str]:
        with self._lock:
            changed, self._changed = self._changed, set()
        return changed

    def _take_told(self, uuids: Iterable[str]) -> dict[str, VmStatus]:
        """What the controller was told of ``uuids``, forgotten here."""
        with self._lock:
            return {uuid: st for uuid in uuids if (st := self._told.pop(uuid, None)) is not None}

    def _restore_changed(self, changed: set[str]) -> None:
        """After a failed send: the changes go out with the next delta or report."""
        with self._lock:
            self._changed |= changed

    def _send_delta(self) -> bool:
        changed = self._take_changed()
        try:
            # As for the full report: stamped before the domains are read.
            now = self._clock()
            told = self._take_told(changed)
            found = {uuid: self._hv.find(uuid) for uuid in changed}
            found = {uuid: st for uuid, st in found.items() if not same_state(st, told.get(uuid))}
            if not found:
                self.deltas_skipped += 1
                log.debug("%s: no delta: %d VMs as their commands' replies said", self.host_id, len(changed))
                return True
            with self._lock:
                self._seq += 1
                seq = self._seq
            delta = build_vm_changes(
                host_id=self.host_id, started_at=self.started_at, seq=seq, reported_at=now, found=found
            )
            self._sink.send(HOST_VM_CHANGES, delta, sent_at=now, ttl_s=REPORT_TTL_MS / 1000)
        except Exception as exc:  # noqa: BLE001 - _not_sent logs it (with its traceback if a bug)
            return self._not_sent("VM changes", changed, exc)
        self.last_delta = delta
        self.deltas_sent += 1
        log.debug("sent VM changes seq %d (%d changed, %d gone)", seq, len(delta.vms), len(delta.gone))
        return True

    def _send_report(self) -> bool:
        changed = self._take_changed()  # before the listing: what changes after it goes in a delta
        with self._lock:
            self._told.clear()  # the full report tells the controller everything anew
        try:
            return self._send_full_report(changed)
        except HypervisorUnavailable as exc:
            return self._send_degraded_report(changed, exc)

    def _send_degraded_report(self, changed: set[str], unreachable: HypervisorUnavailable) -> bool:
        """libvirt is away: the last report again, marked with why (the controller takes only
        that), so the host shows degraded. Not sent before a first full report (there are no
        facts to send; the agent cannot start without libvirt anyway)."""
        self._restore_changed(changed)  # they go in the first report after the reconnect
        last = self.last_report
        if last is None:
            return self._not_sent("host report", set(), unreachable)
        try:
            now = self._clock()
            with self._lock:
                self._seq += 1
                seq = self._seq
            # No VMs: the controller keeps the states it has until libvirt answers again.
            report = msgspec.structs.replace(
                last, seq=seq, reported_at=now, vms=(), hypervisor_error=unreachable.message[:MAX_ERROR_CHARS]
            )
            self._sink.send(HOST_REPORT, report, sent_at=now, ttl_s=REPORT_TTL_MS / 1000)
        except Exception as exc:  # noqa: BLE001 - see _send_full_report
            return self._not_sent("degraded host report", set(), exc)
        self.reports_sent += 1
        log.warning("%s: sent degraded host report seq %d: %s", self.host_id, seq, unreachable.message)
        return False  # retried soon: the next one may be a full one again

    def _send_full_report(self, changed: set[str]) -> bool:
        try:
            # Stamped before the hypervisor is read, so every state in the report is at least
            # this recent: the controller ignores a report for a VM it changed after
            # reported_at, which must include changes applied while this listing ran.
            now = self._clock()
            facts = self._hv.node_facts()
            vms = self._hv.list_statuses()
            with self._lock:
                self._seq += 1
                seq = self._seq
            report = build_report(
                host_id=self.host_id,
                libvirt_uri=self._uri,
                agent_version=self._agent_version,
                facts=facts,
                vms=vms,
                seq=seq,
                started_at=self.started_at,
                reported_at=now,
            )
            for enrich in self._enrichers:
                report = enrich(report)
        except HypervisorUnavailable:
            raise  # _send_report sends the degraded report instead
        except Exception as exc:  # noqa: BLE001 - the reporter must outlive any bug in one report; _not_sent logs it
            return self._not_sent("host report", changed, exc)
        try:
            self._sink.send(HOST_REPORT, report, sent_at=now, ttl_s=REPORT_TTL_MS / 1000)
        except Exception as exc:  # noqa: BLE001 - see above
            return self._not_sent("host report", changed, exc)
        self.last_report = report
        self.reports_sent += 1
        log.debug("sent host report seq %d (%d VMs)", seq, len(vms))
        return True

    def _not_sent(self, what: str, changed: set[str], exc: Exception) -> bool:
        """A report or delta that failed: count it, keep its VMs for the next one, log it (with
        the traceback when it is a bug, not a typed failure). Call from the ``except`` block."""
        self.failures += 1
        self._restore_changed(changed)
        if isinstance(exc, VirtfleetError):
            log.warning(
                "%s: could not send %s: %s: %s (retrying later)",
                self.host_id,
                what,
                type(exc).__name__,
                exc.message,
            )
        else:
            log.exception("%s: %s failed (bug); retrying later", self.host_id, what)
        return False

    def _send_heartbeat(self) -> None:
        self._heartbeat_seq += 1
        now = self._clock()
        beat = Heartbeat(
            host_id=self.host_id, seq=self._heartbeat_seq, started_at=self.started_at, sent_at=now
        )
        try:
            self._sink.send(HOST_HEARTBEAT, beat, sent_at=now, ttl_s=HEARTBEAT_TTL_MS / 1000)
        except VirtfleetError as exc:
            self.failures += 1
            log.warning("%s: could not send heartbeat: %s", self.host_id, exc.message)
            return
        except Exception:  # see _send_report
            self.failures += 1
            log.exception("%s: heartbeat failed (bug)", self.host_id)
            return
        self.heartbeats_sent += 1
