"""The agent's tuning module: report facts (topology, CPU sets, hugepages, THP, IO) and the
``tuning.*`` command handlers (pinning, taskset, hugepage pools, IO schedulers, profiles).

On a real host the kernel is this machine's (``/sys``, ``/proc``). On a simulated host
(``test:///`` URIs) it is a tree of plain files in the agent's state directory, shaped like the
simulated node (:func:`agent.tuning.sysfs.seed_simulated_root`), so the real machine's
tunables are never touched by a simulated agent and its processes are never visible to it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from agent.config import DEFAULT_HUGEPAGE_SHARE, AgentConfig
from agent.drivers import host_facts
from agent.drivers.libvirt_driver import libvirt_errors
from agent.tuning import cpusets, parse
from agent.tuning import profile as profiles
from agent.tuning.pinning import LibvirtPinning, Pinning
from agent.tuning.sysfs import HostKernel, seed_simulated_root
from common import cpuset
from common.domain_xml import DomainXmlError, parse_domain_xml
from common.errors import Conflict, InvalidRequest, NotFound, VirtfleetError
from common.messages import tuning as msgs
from common.messages.base import replace
from common.messages.host import HostReport
from common.messages.tuning import (
    ApplyProfile,
    GetAffinity,
    HostTuningReport,
    HugepagesResult,
    IoSchedulerResult,
    PinVm,
    ProcessInfo,
    ProcessQuery,
    ProfileResult,
    SetHugepages,
    SetIoScheduler,
    SetTaskset,
    SettingChange,
    TasksetResult,
    ThreadAffinity,
    VmAffinity,
    page_size_label,
)
from common.messages.vm import PowerState
from common.transport.rpc import HandlerTable

log = logging.getLogger(__name__)

_ACTIVE = frozenset({PowerState.RUNNING, PowerState.BLOCKED, PowerState.PAUSED, PowerState.SHUTDOWN})


def _cpus(text: str, what: str) -> frozenset[int]:
    try:
        return cpuset.parse_cpuset(text)
    except cpuset.CpuSetSyntaxError as exc:
        raise InvalidRequest(f"{what}: {exc}") from None


class TuningModule:
    """:class:`agent.host_runtime.AgentModule` for performance tuning."""

    def __init__(
        self,
        pinning: Pinning,
        kernel: HostKernel,
        sets: cpusets.CpuSets,
        *,
        simulated: bool = False,
        hugepage_share: float = DEFAULT_HUGEPAGE_SHARE,
    ) -> None:
        self.kernel = kernel
        self.hugepage_share = hugepage_share
        self.sets = sets
        self.simulated = simulated
        self.pinning: Pinning = pinning
        self._lock = threading.Lock()
        self._request_report: Callable[[], int] = lambda: 0

    @classmethod
    def for_host(cls, cfg: AgentConfig, conn: Any) -> TuningModule:
        """The module for the agent's host; InvalidRequest when the CPU sets do not fit it."""
        simulated = host_facts.is_test_uri(cfg.libvirt_uri)
        if simulated:
            with libvirt_errors("cannot read node facts"):
                _model, memory_mib, cpus, _mhz, nodes, sockets, cores, threads = conn.getInfo()
            root = cfg.state_dir / "simulated-host"
            seed_simulated_root(
                root,
                cpus=int(cpus),
                cells=max(1, int(nodes)),
                sockets=int(sockets),
                cores=int(cores),
                threads=int(threads),
                memory_mib=int(memory_mib),
            )
            kernel = HostKernel(root, emulate=True)
        else:
            kernel = HostKernel()
        sets = cpusets.resolve(kernel.online_cpus(), cfg.dedicated_cpus, cfg.shared_cpus, cfg.reserved_cpus)
        module = cls(
            LibvirtPinning(conn, simulated=simulated),
            kernel,
            sets,
            simulated=simulated,
            hugepage_share=cfg.hugepage_max_share,
        )
        width = module.pinning.cpu_map_width()
        beyond = sorted(c for c in sets.dedicated if c >= width)
        if beyond:
            raise InvalidRequest(
                f"config dedicated_cpus: CPU(s) {cpuset.format_cpuset(beyond)} are beyond libvirt's CPU map "
                f"(0-{width - 1}); libvirt's test driver knows 8 CPUs and drops pins beyond them"
            )
        return module

    # -- AgentModule ----------------------------------------------------------------------
    def register(self, table: HandlerTable, request_report: Callable[[], int]) -> None:
        """Serve the ``tuning.*`` commands."""
        self._request_report = request_report
        table.register(msgs.TUNING_PIN, self.pin)
        table.register(msgs.TUNING_AFFINITY, self.affinity)
        table.register(msgs.TUNING_PROCESS, self.process)
        table.register(msgs.TUNING_TASKSET, self.taskset)
        table.register(msgs.TUNING_HUGEPAGES, self.hugepages)
        table.register(msgs.TUNING_IO_SCHEDULER, self.io_scheduler)
        table.register(msgs.TUNING_PROFILE, self.profile)

    def enrich_report(self, report: HostReport) -> HostReport:
        return replace(report, tuning=self.facts())

    def facts(self) -> HostTuningReport:
        k = self.kernel
        sockets, cores, threads = parse.topology_counts(k.cpu_topology())
        return HostTuningReport(
            sockets=sockets,
            cores_per_socket=cores,
            threads_per_core=threads,
            cells=k.numa_cells(),
            online_cpus=cpuset.format_cpuset(self.sets.online),
            dedicated_cpus=cpuset.format_cpuset(self.sets.dedicated),
            shared_cpus=cpuset.format_cpuset(self.sets.shared),
            reserved_cpus=cpuset.format_cpuset(self.sets.reserved),
            hugepages=k.hugepage_pools(),
            default_hugepage_kib=k.default_hugepage_kib(),
            thp_enabled=k.thp("enabled").selected,
            thp_defrag=k.thp("defrag").selected,
            block_devices=k.block_devices(),
            simulated=self.simulated,
        )

    # -- pinning --------------------------------------------------------------------------
    def _allowed(self, cpus: frozenset[int], what: str) -> frozenset[int]:
        outside = cpus - self.sets.allowed()
        if outside:
            reserved = outside & self.sets.reserved
            why = "reserved for the host" if reserved == outside else "not dedicated or shared on this host"
            raise InvalidRequest(f"{what}: CPU(s) {cpuset.format_cpuset(outside)} are {why}")
        return cpus

    def _managed_domain(self, uuid: str, name: str) -> Any:
        dom = self.pinning.domain(uuid)
        with libvirt_errors(f"VM {name}"):
            xml = dom.XMLDesc(0)
        try:
            managed = parse_domain_xml(xml).managed
        except DomainXmlError:
            managed = False
        if not managed:
            raise Conflict(f"VM {name} ({uuid}) was not created by virtfleet; not touching its pinning")
        return dom

    def pin(self, body: PinVm) -> VmAffinity:
        if not body.vcpu_pins and body.emulator_cpuset is None:
            raise InvalidRequest("nothing to pin: give vCPU pins and/or an emulator CPU set")
        with self._lock:
            dom = self._managed_domain(body.vm.uuid, body.vm.name)
            for pin in body.vcpu_pins:
                cpus = self._allowed(_cpus(pin.cpuset, f"vCPU {pin.vcpu}"), f"vCPU {pin.vcpu}")
                self.pinning.pin_vcpu(dom, pin.vcpu, cpus)
                log.info("VM %s: vCPU %d pinned to %s", body.vm.name, pin.vcpu, cpuset.format_cpuset(cpus))
            if body.emulator_cpuset is not None:
                cpus = self._allowed(_cpus(body.emulator_cpuset, "emulator"), "emulator threads")
                self.pinning.pin_emulator(dom, cpus)
                self._align_emulator_threads(body.vm.uuid, cpus)
                log.info("VM %s: emulator threads pinned to %s", body.vm.name, cpuset.format_cpuset(cpus))
        return self.affinity(GetAffinity(body.vm))

    def _align_emulator_threads(self, uuid: str, cpus: frozenset[int]) -> None:
        """Give every emulator thread of a running VM the new set.

        libvirt 9.0's live emulatorpin changes the emulator cgroup's cpuset but the affinity of
        the main thread only: after widening 0 -> 0-1 the RCU and monitor IO threads still show
        ``Cpus_allowed_list: 0`` (seen on this project's hosts). The cgroup now allows the set, so
        the agent applies it to the other non-vCPU threads itself.
        """
        if self.simulated:
            return
        pid = self.qemu_pid(uuid)
        if pid is None:
            return
        wanted = cpuset.format_cpuset(cpus)
        for thread in self.kernel.threads(pid):
            if thread.vcpu is None and thread.cpus != wanted:
                self.kernel.set_thread_affinity(thread.tid, cpus)

    def affinity(self, body: GetAffinity) -> VmAffinity:
        dom = self.pinning.domain(body.vm.uuid)
        state = self.pinning.state(dom)
        pid: int | None = None
        threads: tuple[ThreadAffinity, ...] = ()
        if state in _ACTIVE and not self.simulated:
            pid = self.qemu_pid(body.vm.uuid)
            if pid is not None:
                try:
                    threads = self.kernel.threads(pid)
                except NotFound:
                    pid = None
        return VmAffinity(
            uuid=body.vm.uuid,
            name=body.vm.name,
            state=state.value,
            vcpu_pins=self.pinning.vcpu_pins(dom),
            emulator_cpuset=self.pinning.emulator_cpuset(dom),
            pid=pid,
            threads=threads,
            observed=pid is not None,
        )

    def qemu_pid(self, uuid: str) -> int | None:
        """The QEMU process running domain ``uuid``, as libvirt recorded it, or None.

        Never from a ``-uuid`` match on command lines: any user can start a process whose argv
        names a VM's uuid."""
        try:
            dom = self.pinning.domain(uuid)
            with libvirt_errors("cannot read the domain"):
                name = str(dom.name())
        except NotFound:
            return None
        return self.kernel.libvirt_qemu_pid(name)

    # -- taskset --------------------------------------------------------------------------
    def process(self, body: ProcessQuery) -> ProcessInfo:
        """Which VM's QEMU ``body.pid`` is: the uuid its command line names, believed only when
        libvirt's own record of that domain's QEMU process is this very PID."""
        uuid = parse.qemu_uuid(self.kernel.cmdline(body.pid))
        if uuid is None or self.qemu_pid(uuid) != body.pid:
            return ProcessInfo(pid=body.pid, qemu=False)
        try:
            dom = self.pinning.domain(uuid)
            with libvirt_errors("cannot read the domain"):
                name: str | None = str(dom.name())
                xml = dom.XMLDesc(0)
            managed = parse_domain_xml(xml).managed
        except (NotFound, DomainXmlError):
            name, managed = None, False
        return ProcessInfo(
            pid=body.pid,
            qemu=True,
            vm_uuid=uuid,
            vm_name=name,
            managed=managed,
            threads=self.kernel.threads(body.pid),
        )

    def taskset(self, body: SetTaskset) -> TasksetResult:
        cpus = self._allowed(_cpus(body.cpuset, "taskset"), "taskset")
        with self._lock:
            info = self.process(ProcessQuery(body.pid))
            if not info.qemu or info.vm_uuid != body.vm_uuid.lower() or not info.managed:
                raise Conflict(
                    f"process {body.pid} is not the QEMU process of VM {body.vm_uuid} managed by virtfleet"
                )
            before = info.threads
            done: list[ThreadAffinity] = []
            try:
                for thread in before:
                    self.kernel.set_thread_affinity(thread.tid, cpus)
                    done.append(thread)
            except VirtfleetError:
                for thread in done:  # all threads or none, as far as we can
                    try:
                        self.kernel.set_thread_affinity(thread.tid, _cpus(thread.cpus, "restore"))
                    except VirtfleetError as exc:
                        log.warning("could not restore thread %d: %s", thread.tid, exc.message)
                raise
            after = self.kernel.threads(body.pid)
        log.info("taskset -a -pc %s %d (VM %s)", cpuset.format_cpuset(cpus), body.pid, info.vm_name)
        return TasksetResult(pid=body.pid, vm_uuid=info.vm_uuid or "", before=before, after=after)

    # -- hugepages, IO, profiles ----------------------------------------------------------
    def _check_hugepage_share(self, size_kib: int, count: int) -> None:
        """InvalidRequest when every hugepage pool together, with ``count`` pages of ``size_kib``,
        would take more than the configured share of MemTotal."""
        total_kib = self.kernel.meminfo().get("MemTotal", 0)
        others = sum(p.size_kib * p.total for p in self.kernel.hugepage_pools() if p.size_kib != size_kib)
        wanted = others + size_kib * count
        cap = int(total_kib * self.hugepage_share)
        if wanted > cap:
            most = max(0, (cap - others) // size_kib)
            raise InvalidRequest(
                f"{count} {page_size_label(size_kib)} hugepages would put {wanted // 1024} MiB of this host's "
                f"{total_kib // 1024} MiB in hugepage pools, above the configured share "
                f"{self.hugepage_share:g} (hugepage_max_share); at most {most} pages",
                details={"max_pages": most},
            )

    def hugepages(self, body: SetHugepages) -> HugepagesResult:
        label = page_size_label(body.size_kib)
        with self._lock:
            self._check_hugepage_share(body.size_kib, body.count)
            before = self.kernel.hugepage_pool(body.size_kib)
            self.kernel.set_hugepages(body.size_kib, body.count)
            pool = self.kernel.hugepage_pool(body.size_kib)
        self._request_report()
        message = f"{label} pool {before.total} -> {pool.total} pages"
        if pool.total != body.count:
            message += f" (asked for {body.count}: the kernel could not free or find more)"
        if not pool.mounted and pool.total:
            message += f"; no hugetlbfs for {label} pages is mounted, guests cannot use them"
        log.info("hugepages: %s", message)
        return HugepagesResult(
            size_kib=body.size_kib, requested=body.count, before=before.total, pool=pool, message=message
        )

    def io_scheduler(self, body: SetIoScheduler) -> IoSchedulerResult:
        with self._lock:
            before = self.kernel.block_device(body.device)
            self.kernel.set_io_scheduler(body.device, body.scheduler)
            after = self.kernel.block_device(body.device)
        self._request_report()
        log.info("IO scheduler of %s: %s -> %s", body.device, before.scheduler, after.scheduler)
        return IoSchedulerResult(
            device=body.device, before=before.scheduler, after=after.scheduler, available=after.available
        )

    def profile(self, body: ApplyProfile) -> ProfileResult:
        chosen = profiles.lookup(body.profile)
        targets = {t.size_kib: t.count for t in body.hugepages}
        with self._lock:
            options = {which: self.kernel.thp(which).options for which in ("enabled", "defrag")}
            steps = profiles.plan(chosen, self.facts(), options, targets)
            if body.dry_run:
                return ProfileResult(chosen.name, tuple(s.as_change() for s in steps), dry_run=True)
            results: list[SettingChange] = []
            for step in steps:
                if not step.changes:
                    results.append(step.as_change())
                    continue
                try:
                    results.append(step.as_change(after=self._apply(step)))
                except VirtfleetError as exc:
                    results.append(step.as_change(after=step.before, note=f"failed: {exc.message}"))
        self._request_report()
        changed = [f"{c.setting} {c.before}->{c.after}" for c in results if c.changed]
        log.info("profile %s: %s", chosen.name, ", ".join(changed) or "nothing to change")
        return ProfileResult(chosen.name, tuple(results))

    def _apply(self, step: profiles.Step) -> str:
        """Apply one step and return the value the kernel shows afterwards."""
        kind, what = step.target
        if kind == "hugepages":
            self._check_hugepage_share(int(what), int(step.after))
        if kind == "thp":
            self.kernel.set_thp(str(what), step.after)
            return self.kernel.thp(str(what)).selected
        if kind == "io":
            self.kernel.set_io_scheduler(str(what), step.after)
            return self.kernel.block_device(str(what)).scheduler
        self.kernel.set_hugepages(int(what), int(step.after))
        return str(self.kernel.hugepage_pool(int(what)).total)
