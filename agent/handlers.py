"""One handler per agent command kind; each is idempotent by VM uuid, so redelivery is harmless.

Handlers take typed bodies (the :class:`~common.transport.rpc.Dispatcher` decodes them) and an
injected :class:`~agent.ports.Hypervisor`; they raise only virtfleet errors. Commands on the same
VM are serialised by a per-uuid lock (a redelivered command may overlap its first run). After
every state-changing command the reporter is told which VM changed (``vm_changed``): it sends
that VM's state in a ``host.vm_changes`` delta, not a full host report.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from agent import disks as disk_helpers
from agent.host_storage import HostStorage
from agent.ports import ACTIVE_STATES, Hypervisor, Images
from agent.vmops import STARTABLE, VmOpsHandlers, refuse_kvm_without_hw_virt, refuse_name_of_another
from common.domain_xml import build_domain_xml
from common.errors import AlreadyExists, Conflict, InvalidRequest, NotFound, VirtfleetError
from common.messages import vm
from common.messages.base import replace
from common.messages.host import HOST_REPORT_NOW, ReportAck, ReportRequest
from common.transport.rpc import HandlerTable

log = logging.getLogger(__name__)

#: Not running in any form: nothing to stop.
_STOPPED = frozenset(vm.PowerState) - ACTIVE_STATES
#: Running or paused already: nothing to start.
_STARTED = frozenset(vm.PowerState) - STARTABLE
#: Running and not paused.
_UP = frozenset({vm.PowerState.RUNNING, vm.PowerState.BLOCKED})


def _owned(disks: tuple[vm.DiskSpec, ...]) -> tuple[str, ...]:
    """The volumes virtfleet created for a VM: what ``vm delete --delete-disks`` may remove."""
    return tuple(d.path for d in disks if d.source == "new" and d.path is not None)


def volume_name(spec: vm.VmSpec, disk: vm.DiskSpec) -> str:
    """The pool volume for a new disk: the spec's name, else ``<vmname>-<target>.<fmt>``."""
    return disk_helpers.volume_name(spec.name, disk.target, disk.format, disk.volume)


class AgentHandlers:
    """The agent's command handlers over one hypervisor."""

    def __init__(
        self,
        hypervisor: Hypervisor,
        request_report: Callable[[], int],
        images: Images | None = None,
        *,
        vm_changed: Callable[[str], None] = lambda _uuid: None,
        storage: HostStorage | None = None,
    ) -> None:
        """``request_report`` asks for a full report (``host.report_now``); ``vm_changed(uuid)``
        for a delta of one VM, after every command that may have changed it; ``storage``: where
        commands may touch the host's files (default: the hypervisor's default pool only)."""
        self._hv = hypervisor
        self.storage = storage or HostStorage.for_host(hypervisor)
        self._request_report = request_report
        self._vm_changed = vm_changed
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        #: serialises the name and disk checks and the define of vm.create/vm.define across VMs
        self._define_lock = threading.Lock()
        if images is None:
            from agent.drivers.images import QemuImg  # noqa: PLC0415 - the default tool; tests inject theirs

            images = QemuImg()
        self._images = images
        self.vmops = VmOpsHandlers(hypervisor, images, self._changing, self._define_lock, self.storage)

    def register(self, table: HandlerTable) -> None:
        """Serve the VM and host commands (and, through :attr:`vmops`, the other VM operations)."""
        table.register(vm.VM_CREATE, self.create)
        table.register(vm.VM_START, self.start)
        table.register(vm.VM_SHUTDOWN, self.shutdown)
        table.register(vm.VM_DESTROY, self.destroy)
        table.register(vm.VM_REBOOT, self.reboot)
        table.register(vm.VM_RESET, self.reset)
        table.register(vm.VM_SUSPEND, self.suspend)
        table.register(vm.VM_RESUME, self.resume)
        table.register(vm.VM_DELETE, self.delete)
        table.register(vm.VM_AUTOSTART, self.autostart)
        table.register(HOST_REPORT_NOW, self.report_now)
        self.vmops.register(table)

    # -- helpers ----------------------------------------------------------------------
    @contextmanager
    def _changing(self, uuid: str) -> Iterator[None]:
        """Hold the VM's lock; afterwards (even after a failure) have the VM's state sent in a delta.

        Not the status of the command's own result: the reporter re-reads the VM when it sends
        the delta, so that a delta is never older than a lifecycle event noted meanwhile.
        """
        with self._locks_guard:
            lock = self._locks.setdefault(uuid, threading.Lock())
        try:
            with lock:
                yield
        finally:
            self._vm_changed(uuid)

    def _existing(self, ref: vm.VmRef) -> vm.VmStatus:
        status = self._hv.find(ref.uuid)
        if status is None:
            raise NotFound(f"VM {ref.name} ({ref.uuid}) is not defined on this host")
        return status

    def _result(self, uuid: str, message: str) -> vm.VmResult:
        return vm.VmResult(status=self._hv.status(uuid), message=message)

    # -- vm.create --------------------------------------------------------------------
    def create(self, body: vm.CreateVm) -> vm.VmResult:
        spec = body.spec
        refuse_kvm_without_hw_virt(
            self._hv,
            spec.name,
            spec.domain_type.value,
            " (/dev/kvm unusable or no vmx/svm CPU flag); use domain type qemu (TCG)",
        )
        with self._changing(spec.uuid):
            with self._define_lock:
                refuse_name_of_another(self._hv, spec.name, spec.uuid)
                existing = self._hv.find(spec.uuid)
                if existing is None:
                    self.storage.check_spec_files(spec, self._images)  # before anything uses those files
                    if not body.allow_shared_disk:
                        self._refuse_disks_in_use(spec)
                    disks = self._create_and_define(spec)  # its volumes recorded by the define
                    message = "defined"
                else:
                    disks = self._resolve_disks(spec, None)
                    message = "already defined"
                    owned = _owned(disks)
                    if owned and not self._hv.owned_volumes(spec.uuid):
                        # defined by an agent that recorded them after the define, and died between
                        self._hv.set_owned_volumes(spec.uuid, owned)
            state, autostart = self._hv.power(spec.uuid)  # the full status only once, at the end
            if spec.autostart and not autostart:
                self._hv.set_autostart(spec.uuid, True)
            if body.start and state in STARTABLE:
                self._hv.start(spec.uuid)
                message += " and started"
            return vm.VmResult(status=self._hv.status(spec.uuid), message=message, disks=disks)

    def _refuse_disks_in_use(self, spec: vm.VmSpec) -> None:
        """virt-install's "in use by other guests": an existing image another domain writes to."""
        for disk in spec.disks:
            if disk.source != "existing" or disk.device is not vm.DiskDevice.DISK or disk.readonly:
                continue
            assert disk.path is not None  # vm.DiskSpec guarantees it
            users = disk_helpers.disk_users(self._hv, disk.path, exclude_uuid=spec.uuid)
            if users:
                raise AlreadyExists(
                    disk_helpers.in_use_message(disk.path, users), details={"path": disk.path, "users": users}
                )

    def _resolve_disks(self, spec: vm.VmSpec, created: list[str] | None) -> tuple[vm.DiskSpec, ...]:
        """Every disk with its pool, volume and path filled in.

        With ``created`` (a new VM), missing volumes are created and their paths appended to it, a
        volume already there is used only if it was made for this VM (by an attempt that died;
        AlreadyExists otherwise), and existing images must exist; without it (the VM is defined
        already) nothing is touched.
        """
        resolved = []
        for disk in spec.disks:
            if disk.source == "existing":
                resolved.append(disk)
                continue
            if disk.device is vm.DiskDevice.CDROM:
                raise InvalidRequest(
                    f"disk {disk.target}: a CD-ROM must be an existing image (source 'existing')"
                )
            pool = disk.pool or self._hv.default_pool
            name = volume_name(spec, disk)
            path = self._hv.volume_path(pool, name)
            if created is not None:
                if path is None:
                    path = self._new_volume(spec, disk, pool, name, created)
                elif self.storage.formats.owner(path) != spec.uuid:
                    raise AlreadyExists(
                        f"disk {disk.target}: volume {pool}/{name} exists already and was not made for "
                        f"this VM (a disk kept by a deleted VM of this name?); use another VM name, "
                        f"attach that image on purpose (--disk path={path},format=...), or delete it "
                        f"on the host (virsh vol-delete --pool {pool} {name})",
                        details={"pool": pool, "volume": name, "path": path},
                    )
            resolved.append(replace(disk, pool=pool, volume=name, path=path))
        return tuple(resolved)

    def _new_volume(
        self, spec: vm.VmSpec, disk: vm.DiskSpec, pool: str, name: str, created: list[str]
    ) -> str:
        """Create the volume of a new disk. Its record (format, and this VM as its owner) is
        written first: if the agent dies after the volume is made, the redelivered create knows it
        for its own; if the volume cannot be made, the record goes again."""
        planned = self.storage.pool_volume(pool, self._hv.pool_path(pool), name, disk.format)
        self.storage.formats.record(planned, disk.format.value, owner=spec.uuid)
        try:
            path = self._hv.create_volume(pool, name, disk.format, disk.size_gib)
        except BaseException:
            self.storage.formats.forget(planned)
            raise
        created.append(path)
        if path != planned:  # a pool whose volumes are not files of its directory
            self.storage.formats.record(path, disk.format.value, owner=spec.uuid)
            self.storage.formats.forget(planned)
        return path

    def _discard_volumes(self, paths: list[str]) -> None:
        """Best effort: remove volumes this create made before its define failed."""
        for path in paths:
            try:
                self._hv.delete_volume_path(path)
                self.storage.formats.forget(path)
            except VirtfleetError as exc:
                log.warning("could not remove volume %s after a failed define: %s", path, exc.message)

    def _create_and_define(self, spec: vm.VmSpec) -> tuple[vm.DiskSpec, ...]:
        """Create the new volumes and define the domain; on failure remove the volumes made here."""
        created: list[str] = []
        try:
            disks = self._resolve_disks(spec, created)
            resolved = replace(spec, disks=disks)
            try:
                xml = build_domain_xml(resolved, owned_volumes=_owned(disks))
            except ValueError as exc:
                raise InvalidRequest(f"VM {spec.name}: {exc}") from exc
            self._hv.define(xml)
        except VirtfleetError:
            self._discard_volumes(created)
            raise
        log.info("defined VM %s (%s); %d new volume(s)", spec.name, spec.uuid, len(created))
        return disks

    # -- lifecycle --------------------------------------------------------------------
    def _lifecycle(
        self,
        ref: vm.VmRef,
        act: Callable[[str], None],
        done: str,
        *,
        acts_in: frozenset[vm.PowerState],
        idle_in: frozenset[vm.PowerState] = frozenset(),
        refusal: str = "",
    ) -> vm.VmResult:
        """One lifecycle action: ``act`` in a state of ``acts_in`` (then ``done``); nothing to do in
        a state of ``idle_in`` ("already ..."); Conflict ``VM <name> <refusal>`` in any other."""
        with self._changing(ref.uuid):
            state = self._existing(ref).state
            if state in idle_in:
                return self._result(ref.uuid, f"already {state.value}")
            if state not in acts_in:
                raise Conflict(f"VM {ref.name} {refusal}: it is {state.value}")
            act(ref.uuid)
            return self._result(ref.uuid, done)

    def start(self, body: vm.VmAction) -> vm.VmResult:
        return self._lifecycle(body.vm, self._hv.start, "started", acts_in=STARTABLE, idle_in=_STARTED)

    def shutdown(self, body: vm.ShutdownVm) -> vm.VmResult:
        return self._lifecycle(
            body.vm,
            lambda uuid: self._hv.shutdown(uuid, body.timeout_s, body.force_after_timeout),
            "shut down",
            acts_in=ACTIVE_STATES,
            idle_in=_STOPPED,
        )

    def destroy(self, body: vm.VmAction) -> vm.VmResult:
        return self._lifecycle(
            body.vm, self._hv.destroy, "powered off", acts_in=ACTIVE_STATES, idle_in=_STOPPED
        )

    def reboot(self, body: vm.VmAction) -> vm.VmResult:
        return self._lifecycle(body.vm, self._hv.reboot, "rebooted", acts_in=_UP, refusal="cannot reboot")

    def reset(self, body: vm.VmAction) -> vm.VmResult:
        return self._lifecycle(
            body.vm, self._hv.reset, "reset", acts_in=_UP | {vm.PowerState.PAUSED}, refusal="cannot be reset"
        )

    def suspend(self, body: vm.VmAction) -> vm.VmResult:
        return self._lifecycle(
            body.vm,
            self._hv.suspend,
            "suspended",
            acts_in=_UP,
            idle_in=frozenset({vm.PowerState.PAUSED}),
            refusal="cannot be suspended",
        )

    def resume(self, body: vm.VmAction) -> vm.VmResult:
        return self._lifecycle(
            body.vm,
            self._hv.resume,
            "resumed",
            acts_in=frozenset({vm.PowerState.PAUSED}),
            idle_in=_UP,
            refusal="cannot be resumed",
        )

    def delete(self, body: vm.DeleteVm) -> vm.VmResult:
        uuid = body.vm.uuid
        with self._changing(uuid):
            status = self._hv.find(uuid)
            if status is None:
                return vm.VmResult(status=None, message="not defined on this host")
            if status.state in ACTIVE_STATES:
                self._hv.destroy(uuid)
            deleted = 0
            if body.delete_disks:
                # Before undefine: if we die in between, the redelivered delete still knows the volumes.
                for path in self._hv.owned_volumes(uuid):
                    deleted += self._hv.delete_volume_path(path)
                    self.storage.formats.forget(path)
            self._hv.undefine(uuid)
            log.info("deleted VM %s (%s) and %d volume(s)", body.vm.name, uuid, deleted)
            return vm.VmResult(status=None, message=f"deleted ({deleted} volume(s) removed)")

    def autostart(self, body: vm.SetAutostart) -> vm.VmResult:
        with self._changing(body.vm.uuid):
            status = self._existing(body.vm)
            if status.autostart != body.enabled:
                self._hv.set_autostart(body.vm.uuid, body.enabled)
            return self._result(body.vm.uuid, "autostart " + ("enabled" if body.enabled else "disabled"))

    # -- host -------------------------------------------------------------------------
    def report_now(self, body: ReportRequest) -> ReportAck:
        seq = self._request_report()
        log.info(
            "report requested%s; it will carry seq >= %d", f" ({body.reason})" if body.reason else "", seq
        )
        return ReportAck(seq=seq)
