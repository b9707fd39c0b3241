"""Recovery and reconciliation: a controller finishes or undoes what a dead controller left half
done, and keeps the fleet's claims consistent; one pass at a time across all controllers.

Who does what (docs/operations.md, "Recovery after a controller crash"):

* Every controller process is an *instance* (``ControllerService.instance_id``) with a liveness
  record in the database, moved every ``instance_heartbeat_s`` and expired after
  ``instance_expiry_s``. A build or task records its instance in ``vms.owner``; work whose owner
  is not alive was *left by a dead controller* (:func:`controller.db.liveness.left_work`). A live
  controller's work is never touched, whatever its age.
* Passes run only in the holder of the ``reconciler`` lease (compare-and-set in the database,
  ``lease_ttl_s``, renewed with every heartbeat). There is no separate start-up recovery: a
  restarted controller is a new instance, its previous life's work is a dead instance's like any
  other, and whichever controller holds the lease recovers it once that instance has expired.
  A starting controller tries for the lease at once, so alone it recovers within
  ``instance_expiry_s`` + ``recovery_interval_s`` (+ the agents' answers) of the crash.
* Each VM taken over is first made the recovering instance's (compare-and-set on the owner), so
  two passes that overlap (a lease lost while a pass waits on an agent) never recover one VM twice.

What is done with left work, always the same way:

* A VM ``building`` on a host that is up: the host's agent is asked for the domain
  (``vm.memstat``, which answers NotFound for a domain it does not have). A domain that exists is
  adopted in the state the host reports (``active``); one that never reached the host is built
  by re-sending ``vm.create`` with the definition stored with the claim. The create is
  idempotent by uuid on the agent, so a re-send that meets the original command (still queued on
  a slow agent) builds once. A host that refuses the re-sent build gets the failure path of any
  create: claim released, ``error`` with the host's reason. No answer within the command's
  timeout: ``error``, the claim kept (the host may still build it); the pass adopts it as
  ``active`` once its host reports it running.
* A VM with a task: the task is cleared and the state set from what the agent reports; a VM that
  was being deleted and whose domain is gone is deleted (and its claim released).
* A VM on a host that is down is left alone (nothing that may run is released); the host-down
  handling and the build timeout apply to it as before.

The full pass (every ``reconcile_interval_s``) also fails builds older than ``build_timeout_s``,
adopts ``error`` VMs their host reports running, drops claims no VM on that host holds and
claims again for VMs placed on a host that hold none.
"""

from __future__ import annotations

import logging
import secrets
import threading
from concurrent.futures import ThreadPoolExecutor

from sqlalchemy import Engine
from sqlalchemy.orm import sessionmaker

from common.errors import HostDown, NotFound, RequestTimeout, VirtfleetError
from common.messages.base import replace
from common.messages.descriptor import TIMEOUT_SECONDS
from common.messages.vm import (
    VM_CREATE,
    CreateVm,
    DesiredPower,
    Lifecycle,
    PowerState,
    Task,
    VmAction,
    VmRef,
    VmSpec,
    VmStatus,
)
from common.messages.vmops import VM_MEMSTAT
from common.transport.port import Interrupted
from controller import fleet, tuning_inventory
from controller.db import liveness
from controller.db import repository as repo
from controller.db.errors import typed_database_errors
from controller.service import ControllerService

log = logging.getLogger(__name__)

#: An in-flight VM without an owner (written before owners were recorded) is taken as left once
#: it has not changed for this long: no caller waits on a command longer than its timeout class.
UNOWNED_AFTER_S = max(TIMEOUT_SECONDS.values())


class Recovery:
    """One controller instance's liveness record, its part in the reconciler lease, and the passes.

    ``name``: how operators know the process (its log name), stored with its instance id.
    """

    def __init__(self, service: ControllerService, name: str, engine: Engine, *, workers: int = 8) -> None:
        self.service = service
        #: the whole-fleet reads run on their own sessions, outside the service's SQLite write
        #: lock: creates never queue behind them (WAL lets them read beside the writer)
        self._reads = sessionmaker(engine)
        self.config = service.config
        self.instance_id = service.instance_id
        self.name = name
        #: agents are asked about left VMs in parallel: one slow host does not hold up the others
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="recovery")
        self._lock = threading.Lock()
        self._holding = False

    # ------------------------------------------------------------------ liveness and lease

    def register(self) -> None:
        """Record this instance as alive (before it takes any work)."""
        with self.service.tx() as s:
            liveness.register(s, self.instance_id, self.name, self.service.clock())

    def heartbeat(self) -> None:
        """Move this instance's liveness record; renew the lease if it is held."""
        now = self.service.clock()
        with self.service.tx() as s:
            liveness.beat(s, self.instance_id, self.name, now)
            with self._lock:
                if self._holding:
                    self._holding = liveness.acquire(
                        s, liveness.RECONCILER, self.instance_id, now, self.config.lease_ttl_s
                    )

    def holds_lease(self) -> bool:
        """Take or renew the reconciler lease; True while this instance holds it."""
        now = self.service.clock()
        with self.service.tx() as s:
            held = liveness.acquire(s, liveness.RECONCILER, self.instance_id, now, self.config.lease_ttl_s)
        with self._lock:
            if held != self._holding:
                log.info("reconciler lease %s by %s", "taken" if held else "lost", self.name)
            self._holding = held
        return held

    def resign(self) -> None:
        """A clean stop: the liveness record and the lease go, so what is left is recovered at
        once by another controller (a stopping controller hands its waits back first)."""
        self._pool.shutdown(wait=True)
        with self.service.tx() as s:
            liveness.forget(s, self.instance_id)
        with self._lock:
            self._holding = False

    # ------------------------------------------------------------------ passes

    def step(self, *, full: bool) -> list[str]:
        """One pass if this instance holds the lease (else nothing): the work left by dead
        controllers, and with ``full`` the fleet-wide checks. Returns what it changed."""
        if not self.holds_lease():
            return []
        changes = self.recover_left_work()
        if full:
            changes += self.fail_stale_builds()
            changes += self.adopt_running_errors()
            changes += self.fix_claims()
            with self.service.tx() as s:
                liveness.forget_dead(s, self.service.clock(), self.config.instance_expiry_s)
        return changes

    def recover_left_work(self) -> list[str]:
        """Finish or undo the builds and tasks of dead controllers on hosts that are up."""
        now = self.service.clock()
        with self.service.tx() as s:
            left = liveness.left_work(s, now, self.config.instance_expiry_s, UNOWNED_AFTER_S)
        if not left:
            return []
        up = {
            r.id for r in self.service.fleet.records() if fleet.host_is_up(r, now, self.config.down_after_s)
        }
        mine: list[liveness.LeftWork] = []
        for work in left:
            if work.host_id is not None and work.host_id not in up:
                continue  # the host-down handling's: nothing on it is released
            with self.service.tx() as s:
                if liveness.take_over(s, work, self.instance_id):
                    mine.append(work)
        return [f.result() for f in [self._pool.submit(self._recover, w) for w in mine]]

    def fail_stale_builds(self) -> list[str]:
        """Fail builds stuck longer than the build timeout (the claim stays: the host may have
        built it). Reads only the VMs still building (a read of every VM, at 100,000 VMs, held
        the GIL for seconds and heartbeats queued behind it)."""
        now = self.service.clock()
        changed = []
        with self.service.tx() as s:
            for vm in repo.list_vms(s, status=Lifecycle.BUILDING):
                if now - vm.created_at > self.config.build_timeout_s:
                    repo.update_vm(
                        s, vm.uuid, now, status=Lifecycle.ERROR, task=None, last_error="build timed out"
                    )
                    changed.append(f"{vm.name}: build timed out")
        return changed

    def adopt_running_errors(self) -> list[str]:
        """VMs in ``error`` that kept their host (a build that got no answer) and that the host
        reports running are ``active``: the host's word is the truth."""
        with self.service.tx() as s:
            names = liveness.adopt_running_errors(s, self.service.clock())
        return [f"{name}: runs on its host; active" for name in names]

    def fix_claims(self) -> list[str]:
        """Drop claims that no VM on that host holds; claim again for placed VMs holding none."""
        changes: list[str] = []
        hosts: set[str] = set()
        with self.service.tx() as s:
            for vm_uuid, host_id in liveness.stray_claims(s):
                liveness.drop_claim(s, vm_uuid, host_id)
                hosts.add(host_id)
                changes.append(f"claim of {vm_uuid} on {host_id} released: no such VM there")
        with typed_database_errors(), self._reads() as s:
            unclaimed = liveness.unclaimed_vms(s)  # O(VMs): 80 ms at 100,000 VMs on SQLite
        for vm_uuid in unclaimed:
            with self.service.tx() as s:
                if repo.allocations_of(s, vm_uuid):
                    continue  # claimed meanwhile
                vm = repo.get_vm_by_uuid(s, vm_uuid)
                if vm.host_id is None or vm.status not in (Lifecycle.ACTIVE, Lifecycle.BUILDING):
                    continue  # moved or failed meanwhile
                repo.bump_generation(s, vm.host_id)
                repo.set_allocations(s, vm.uuid, vm.host_id, _amounts(vm))
                hosts.add(vm.host_id)
                changes.append(f"{vm.name}: claimed again on {vm.host_id} (it held no claim)")
        if hosts:
            self.service.hosts_changed(*sorted(hosts))
        return changes

    # ------------------------------------------------------------------ one VM

    def _recover(self, work: liveness.LeftWork) -> str:
        try:
            return self._recover_vm(work)
        except Interrupted:
            self._give_back(work)
            return f"{work.name}: recovery interrupted (this controller stops); left for the next"
        except VirtfleetError as exc:
            self._give_back(work)
            return f"{work.name}: not recovered this pass: {exc.message}"
        except Exception:
            log.exception("recovery of %s crashed", work.name)
            self._give_back(work)
            return f"{work.name}: recovery crashed (logged); tried again next pass"

    def _give_back(self, work: liveness.LeftWork) -> None:
        """The VM goes back to its dead owner: the next pass tries again."""
        with self.service.tx() as s:
            liveness.give_back(s, work, self.instance_id)

    def _recover_vm(self, work: liveness.LeftWork) -> str:
        who = f"controller instance {work.owner or '(unknown)'}"
        host_id = work.host_id
        now = self.service.clock()
        if host_id is None:
            # Between a failed host and the next claim (a reschedule): it holds no claim.
            with self.service.tx() as s:
                repo.update_vm(
                    s,
                    work.uuid,
                    now,
                    task=None,
                    **(
                        {"status": Lifecycle.ERROR, "last_error": f"build interrupted: {who} stopped"}
                        if work.status is Lifecycle.BUILDING
                        else {}
                    ),
                )
            return f"{work.name}: left without a host by {who}; task cleared"
        state = self._state_on(host_id, work)
        if work.status is Lifecycle.BUILDING:
            if state is not None:
                with self.service.tx() as s:
                    repo.record_result(s, work.uuid, self.service.clock(), state, Lifecycle.ACTIVE)
                return f"{work.name}: its build had reached {host_id} ({state.state.value}); active"
            return self._resend(work, host_id, who)
        if state is not None:
            with self.service.tx() as s:
                repo.record_result(s, work.uuid, self.service.clock(), state)
            return f"{work.name}: {work.task} left by {who} cleared; {state.state.value} on {host_id}"
        if work.task is Task.DELETING:
            with self.service.tx() as s:
                repo.release(s, work.uuid, host_id)
                repo.delete_vm(s, work.uuid)
            self.service.hosts_changed(host_id)
            return f"{work.name}: its delete had finished on {host_id}; forgotten, claim released"
        with self.service.tx() as s:
            repo.update_vm(
                s,
                work.uuid,
                self.service.clock(),
                task=None,
                power_state=PowerState.MISSING,
                last_error=f"{work.task} left unfinished by {who}; the domain is not on {host_id}",
            )
        return f"{work.name}: {work.task} left by {who} cleared; missing on {host_id}"

    def _state_on(self, host_id: str, work: liveness.LeftWork) -> VmStatus | None:
        """The domain as its host has it now; None when the host has no such domain."""
        try:
            return self.service.agents.call(host_id, VM_MEMSTAT, VmAction(VmRef(work.uuid, work.name))).status
        except NotFound:
            return None

    def _resend(self, work: liveness.LeftWork, host_id: str, who: str) -> str:
        with self.service.tx() as s:
            vm = repo.get_vm_by_uuid(s, work.uuid)
        if vm.spec is None:
            return self._undo(work, host_id, f"build left by {who} has no stored definition to re-send")
        body = CreateVm(
            spec=_console_password(vm.spec),
            start=vm.desired_power is DesiredPower.RUNNING,
            allow_shared_disk=vm.allow_shared_disk,
        )
        try:
            result = self.service.agents.call(host_id, VM_CREATE, body)
        except Interrupted:
            raise
        except (RequestTimeout, HostDown) as exc:
            with self.service.tx() as s:
                repo.update_vm(
                    s,
                    work.uuid,
                    self.service.clock(),
                    status=Lifecycle.ERROR,
                    task=None,
                    last_error=f"build on {host_id} re-sent after {who} stopped got no reply: {exc.message}",
                )
            return f"{work.name}: re-sent build got no reply from {host_id}; error, claim kept"
        except VirtfleetError as exc:
            return self._undo(
                work, host_id, f"build re-sent after {who} stopped failed on {host_id}: {exc.message}"
            )
        self.service.apply_result(work.uuid, result, status=Lifecycle.ACTIVE)
        return f"{work.name}: build left by {who} re-sent to {host_id}; active"

    def _undo(self, work: liveness.LeftWork, host_id: str, why: str) -> str:
        """Release the claim and fail the VM (nothing of it runs)."""
        with self.service.tx() as s:
            repo.release(s, work.uuid, host_id)
            repo.update_vm(
                s,
                work.uuid,
                self.service.clock(),
                status=Lifecycle.ERROR,
                task=None,
                host_id=None,
                last_error=why,
            )
        self.service.hosts_changed(host_id)
        return f"{work.name}: {why}; claim released"


def _console_password(spec: VmSpec) -> VmSpec:
    """The stored definition as it may be re-sent: the database never holds the VNC password
    (controller.db.models.without_secrets), so a console gets a new random one rather than none
    (an admin reads it with ``vm export --secure``)."""
    graphics = spec.graphics
    if graphics is None or graphics.password is not None:
        return spec
    return replace(spec, graphics=replace(graphics, password=secrets.token_hex(4)))


def _amounts(vm: repo.VmRecord) -> dict[str, int]:
    """What a placed VM claims, from its row (the same amounts as its create's claim)."""
    resources = tuning_inventory.request_resources(
        vm.vcpus,
        vm.memory_mib,
        vm.disk_gib,
        dedicated=vm.cpu_policy == "dedicated",
        hugepage_size_kib=vm.hugepage_size_kib,
    )
    return {**{str(k): v for k, v in resources.items()}, **tuning_inventory.pcpu_allocations(vm.pcpus)}
