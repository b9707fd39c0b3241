"""Performance tuning use cases: pinning, taskset, hugepage pools, IO schedulers, host profiles.

Each use case checks what only the controller knows (which VMs virtfleet manages, each VM's
CPU policy and pCPUs, what VMs claim of a host's hugepages) and then asks the host's agent,
which checks what only the host knows (the process, the online CPUs, the kernel's choices).
"""

from __future__ import annotations

import logging

from common.codec import from_wire
from common.cpuset import CpuSetSyntaxError, format_cpuset, parse_cpuset
from common.errors import Conflict, InvalidRequest, NotFound, VirtfleetError
from common.messages import tuning as msgs
from common.messages.base import replace
from common.messages.vm import CpuTune, Task, VcpuPin, VmRef, VmSpec
from common.transport.rpc import HandlerTable
from controller import tuning_inventory
from controller.db import repository as repo
from controller.service import ControllerService

log = logging.getLogger(__name__)


def _cpus(text: str) -> frozenset[int]:
    try:
        return parse_cpuset(text)
    except CpuSetSyntaxError as exc:
        raise InvalidRequest(str(exc)) from None


def _facts(record: repo.HostRecord) -> msgs.HostTuningReport | None:
    if record.tuning is None:
        return None
    try:
        return from_wire(msgs.HostTuningReport, record.tuning, "tuning")
    except InvalidRequest:
        log.warning("host %s: stored tuning facts do not parse; ignoring them", record.id)
        return None


def _repin(parsed: VmSpec | None, body: msgs.PinVm) -> VmSpec | None:
    """The stored VmSpec with the new pins; None when there is no (readable) stored spec."""
    if parsed is None:
        return None
    tune = parsed.cputune or CpuTune()
    pins = {p.vcpu: p for p in tune.vcpu_pins}
    pins.update({p.vcpu: p for p in body.vcpu_pins})
    emulator = body.emulator_cpuset if body.emulator_cpuset is not None else tune.emulator_cpuset
    return replace(
        parsed, cputune=CpuTune(vcpu_pins=tuple(pins[v] for v in sorted(pins)), emulator_cpuset=emulator)
    )


class TuningService:
    """The tuning use cases over the controller service (store, agents, clock)."""

    def __init__(self, service: ControllerService) -> None:
        self.service = service

    # -- helpers ----------------------------------------------------------------------------
    def _vm_and_host(self, name: str) -> tuple[repo.VmRecord, repo.HostRecord]:
        return self.service.locate_vm(name)

    @staticmethod
    def _allowance_text(vm: repo.VmRecord, allowance: frozenset[int]) -> str:
        cpus = format_cpuset(allowance) or "none"
        if vm.cpu_policy == "dedicated":
            return f"{cpus} (its dedicated pCPUs)"
        return f"{cpus} (the host's shared CPUs)"

    def _view(
        self, vm: repo.VmRecord, host: repo.HostRecord, affinity: msgs.VmAffinity, message: str = ""
    ) -> msgs.VmAffinityView:
        return msgs.VmAffinityView(
            vm=vm.name,
            host=host.id,
            cpu_policy=vm.cpu_policy,
            pcpus=format_cpuset(vm.pcpus),
            allowance=format_cpuset(tuning_inventory.vm_allowance(host, vm.cpu_policy, vm.pcpus)),
            affinity=affinity,
            message=message,
        )

    # -- host facts -------------------------------------------------------------------------
    def show(self, host_id: str) -> msgs.HostTuningView:
        with self.service.tx() as s:
            record = repo.get_host(s, host_id)
            vms = repo.list_vms(s, host_id)
        tuned = tuning_inventory.from_record(record)
        claimed = {
            msgs.page_size_label(size): record.used.get(str(resource), 0)
            for size, resource in tuning_inventory.HUGEPAGE_CLASSES.items()
            if record.used.get(str(resource), 0)
        }
        return msgs.HostTuningView(
            host=record.id,
            reported_at=record.last_report,
            facts=_facts(record),
            free_pcpus=format_cpuset(tuned.free_pcpus),
            pinned=tuple(
                msgs.PinnedVm(v.name, v.cpu_policy, format_cpuset(v.pcpus), v.status)
                for v in vms
                if v.cpu_policy == "dedicated" or v.pcpus
            ),
            hugepages_claimed=claimed,
        )

    # -- pinning ----------------------------------------------------------------------------
    def pin(self, req: msgs.VmPinRequest) -> msgs.VmAffinityView:
        """Live re-pin of one vCPU (within the VM's allowance) or of the emulator threads (within
        the host's shared set)."""
        cpus = _cpus(req.cpus)
        vm, host_id = self.service.target(req.name, Task.PINNING)
        error: str | None = None
        try:
            with self.service.tx() as s:
                host = repo.get_host(s, host_id)
            if req.emulator:
                allowance = tuning_inventory.from_record(host).shared
                where = f"{format_cpuset(allowance) or 'none'} (the host's shared CPUs)"
                what = "the emulator threads"
            else:
                assert req.vcpu is not None  # msgs.VmPinRequest guarantees one of the two
                if req.vcpu >= max(vm.max_vcpus, vm.vcpus):
                    raise InvalidRequest(f"VM {vm.name} has vCPUs 0-{max(vm.max_vcpus, vm.vcpus) - 1}")
                allowance = tuning_inventory.vm_allowance(host, vm.cpu_policy, vm.pcpus)
                where = self._allowance_text(vm, allowance)
                what = f"vCPU {req.vcpu}"
            if not allowance:
                raise Conflict(f"host {host_id} has not reported its CPU sets yet; cannot pin VM {vm.name}")
            outside = cpus - allowance
            if outside:
                raise InvalidRequest(
                    f"cannot pin {what} of VM {vm.name} to {format_cpuset(cpus)}: CPU(s) "
                    f"{format_cpuset(outside)} are outside its allowance {where}",
                    details={"allowance": format_cpuset(allowance), "outside": format_cpuset(outside)},
                )
            body = msgs.PinVm(
                vm=VmRef(vm.uuid, vm.name),
                vcpu_pins=() if req.emulator else (VcpuPin(req.vcpu or 0, format_cpuset(cpus)),),
                emulator_cpuset=format_cpuset(cpus) if req.emulator else None,
            )
            affinity = self.service.agents.call(host_id, msgs.TUNING_PIN, body)
            spec = _repin(vm.spec, body)
            with self.service.tx() as s:
                if spec is not None:
                    repo.update_vm(s, vm.uuid, self.service.clock(), spec=spec)
        except VirtfleetError as exc:
            error = exc.message
            raise
        finally:
            with self.service.tx() as s:
                repo.update_vm(s, vm.uuid, self.service.clock(), task=None, last_error=error)
        log.info("VM %s: %s pinned to %s on %s", vm.name, what, format_cpuset(cpus), host_id)
        return self._view(vm, host, affinity, f"{what} pinned to {format_cpuset(cpus)}")

    def affinity(self, name: str) -> msgs.VmAffinityView:
        vm, host = self._vm_and_host(name)
        affinity = self.service.agents.call(
            host.id, msgs.TUNING_AFFINITY, msgs.GetAffinity(VmRef(vm.uuid, vm.name))
        )
        return self._view(vm, host, affinity)

    def taskset(self, req: msgs.HostTasksetRequest) -> msgs.HostTasksetDone:
        """``taskset -a -pc CPUS PID`` for the QEMU process of a VM virtfleet manages, within the
        VM's allowance (its pCPUs and the shared set for a dedicated VM, the shared set otherwise)."""
        cpus = _cpus(req.cpus)
        host = self.service.up_host(req.host)
        info = self.service.agents.call(host.id, msgs.TUNING_PROCESS, msgs.ProcessQuery(req.pid))
        if not info.qemu or info.vm_uuid is None:
            raise Conflict(
                f"process {req.pid} on {host.id} is not a QEMU process; virtfleet only tasksets VMs"
            )
        try:
            with self.service.tx() as s:
                vm = repo.get_vm_by_uuid(s, info.vm_uuid)
        except NotFound:
            raise Conflict(
                f"process {req.pid} on {host.id} runs VM {info.vm_name or info.vm_uuid}, "
                "which virtfleet does not manage"
            ) from None
        if vm.host_id != host.id or not info.managed:
            raise Conflict(f"process {req.pid} is not VM {vm.name} on {host.id} as virtfleet knows it")
        shared = tuning_inventory.from_record(host).shared
        allowance = (frozenset(vm.pcpus) | shared) if vm.cpu_policy == "dedicated" else shared
        outside = cpus - allowance
        if outside:
            raise InvalidRequest(
                f"cannot taskset VM {vm.name} to {format_cpuset(cpus)}: CPU(s) {format_cpuset(outside)} "
                f"are outside its allowance {format_cpuset(allowance) or 'none'}",
                details={"allowance": format_cpuset(allowance)},
            )
        result = self.service.agents.call(
            host.id, msgs.TUNING_TASKSET, msgs.SetTaskset(req.pid, vm.uuid, format_cpuset(cpus))
        )
        return msgs.HostTasksetDone(host=host.id, vm=vm.name, result=result)

    # -- host settings ----------------------------------------------------------------------
    def hugepages(self, req: msgs.HostHugepagesRequest) -> msgs.HostHugepagesDone:
        size = msgs.page_size_kib(req.size)
        host = self.service.up_host(req.host)
        claimed = host.used.get(str(tuning_inventory.hugepage_class(size)), 0)
        if req.count < claimed:
            raise Conflict(
                f"VMs on {host.id} claim {claimed} {msgs.page_size_label(size)} pages; "
                f"the pool cannot shrink to {req.count}",
                details={"claimed": claimed},
            )
        result = self.service.agents.call(host.id, msgs.TUNING_HUGEPAGES, msgs.SetHugepages(size, req.count))
        return msgs.HostHugepagesDone(host=host.id, result=result)

    def io_scheduler(self, req: msgs.HostIoSchedulerRequest) -> msgs.HostIoSchedulerDone:
        host = self.service.up_host(req.host)
        result = self.service.agents.call(
            host.id, msgs.TUNING_IO_SCHEDULER, msgs.SetIoScheduler(req.device, req.scheduler)
        )
        return msgs.HostIoSchedulerDone(host=host.id, result=result)

    def tune(self, req: msgs.HostTuneRequest) -> msgs.HostTuneDone:
        host = self.service.up_host(req.host)
        targets = tuple(
            msgs.HugepageTarget(msgs.page_size_kib(size), count)
            for size, count in sorted((req.hugepages or {}).items())
        )
        result = self.service.agents.call(
            host.id, msgs.TUNING_PROFILE, msgs.ApplyProfile(req.profile, targets, req.dry_run)
        )
        return msgs.HostTuneDone(host=host.id, result=result)


def register(table: HandlerTable, service: ControllerService) -> None:
    """Serve the API calls of this feature area."""
    tuning = TuningService(service)
    table.register(msgs.API_TUNING_SHOW, lambda body: tuning.show(body.host))
    table.register(msgs.API_TUNING_PIN, tuning.pin)
    table.register(msgs.API_TUNING_AFFINITY, lambda body: tuning.affinity(body.name))
    table.register(msgs.API_TUNING_TASKSET, tuning.taskset)
    table.register(msgs.API_TUNING_HUGEPAGES, tuning.hugepages)
    table.register(msgs.API_TUNING_IO_SCHEDULER, tuning.io_scheduler)
    table.register(msgs.API_TUNING_TUNE, tuning.tune)
