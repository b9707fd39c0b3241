"""VM operations beyond the basic lifecycle: reboot/suspend/resume/autostart, console, export/import,
snapshots, live vCPU and memory changes (with capacity re-claims), disks, NICs and images.

Every use case finds the VM and its host, checks the host is up, sends one agent command and records
what the agent says the VM looks like afterwards. Capacity: a grow is claimed *before* the agent is
asked (refused with CapacityExceeded when the host has no room at its ratio) and given back if the
agent fails; a shrink is released only once the agent has done it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from common.domain_xml import DomainXmlError, spec_from_xml
from common.errors import (
    AlreadyExists,
    Conflict,
    HostDown,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    RequestTimeout,
    Unsupported,
    VirtfleetError,
)
from common.messages import api, vmops
from common.messages.base import replace
from common.messages.vm import (
    VM_AUTOSTART,
    DesiredPower,
    DiskDevice,
    DiskSpec,
    Lifecycle,
    NicSpec,
    SetAutostart,
    Task,
    VmAction,
    VmActionDone,
    VmRef,
    VmResult,
    VmSpec,
)
from common.transport.port import Interrupted
from common.transport.rpc import HandlerTable
from controller.db import repository as repo
from controller.service import ControllerService, _placement_view
from controller.vm_spec import generated_mac, next_target

log = logging.getLogger(__name__)

#: Listen addresses that mean "every address of the host": the console is reached at the host's name.
_ANY_ADDRESS = frozenset({"0.0.0.0", "::", "[::]", ""})  # noqa: S104 - compared, never bound


def console_address(info: vmops.ConsoleInfo, hostname: str) -> str:
    """``host:port`` for a VNC viewer ("" while there is no port)."""
    if info.port is None:
        return ""
    listen = info.listen or ""
    host = hostname if listen in _ANY_ADDRESS else listen
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{info.port}"


class VmOps:
    """The use cases of this feature area over the controller service."""

    def __init__(self, service: ControllerService) -> None:
        self.service = service

    # -- helpers ------------------------------------------------------------------------
    def _resize(self, vm: repo.VmRecord, host_id: str, changes: dict[str, int]) -> dict[str, int]:
        """Claim ``changes`` (resource -> new amount) on top of the VM's other allocations; return the old ones."""
        with self.service.tx() as s:
            old = repo.allocations_of(s, vm.uuid)
        self.service.resize_claim(vm.uuid, host_id, {**old, **changes})
        return old

    def _restore(self, vm: repo.VmRecord, host_id: str, old: dict[str, int]) -> None:
        try:
            self.service.resize_claim(vm.uuid, host_id, old)
        except VirtfleetError as exc:  # a shrink back always fits; log anything odd
            log.error("VM %s: could not give back a claim after a failed change: %s", vm.name, exc.message)

    def _with_claim(
        self,
        vm: repo.VmRecord,
        host_id: str,
        changes: dict[str, int],
        grow: bool,
        call: Callable[[], VmResult],
    ) -> VmResult:
        """Run ``call`` with the claim changed around it: grow first (undone on failure), shrink after."""
        if not grow:
            result = call()
            with self.service.tx() as s:
                old = repo.allocations_of(s, vm.uuid)
            self.service.resize_claim(vm.uuid, host_id, {**old, **changes})
            return result
        old = self._resize(vm, host_id, changes)
        try:
            return call()
        except (RequestTimeout, HostDown, Interrupted):
            raise  # the agent may still do it: keep the claim, the next report tells
        except VirtfleetError:
            self._restore(vm, host_id, old)
            raise

    # -- autostart, console ----------------------------------------------------------------
    def autostart(self, req: vmops.VmAutostartRequest) -> VmActionDone:
        return self.service.change_vm(
            req.name,
            Task.AUTOSTART,
            lambda _vm, h, ref: self.service.agents.call(h, VM_AUTOSTART, SetAutostart(ref, req.enabled)),
        )

    def console(self, name: str) -> vmops.ConsoleView:
        vm, host = self.service.locate_vm(name)
        info = self.service.agents.call(host.id, vmops.VM_CONSOLE, VmAction(VmRef(vm.uuid, vm.name)))
        if info.type is None:
            raise NotFound(f"VM {name} has no graphical console (create it with --graphics vnc)")
        return vmops.ConsoleView(
            name=vm.name,
            host=host.id,
            hostname=host.hostname,
            type=info.type,
            listen=info.listen,
            port=info.port,
            password_set=info.password_set,
            address=console_address(info, host.hostname or host.id),
        )

    # -- export / import ---------------------------------------------------------------
    def export(self, req: vmops.VmExportRequest) -> vmops.VmExport:
        """``api.vm.export`` (readers): the XML without its secrets."""
        if req.secure:
            raise PermissionDenied(
                f"vm export --secure reveals secrets: it is {vmops.API_VM_EXPORT_SECURE.kind}, "
                f"for role {vmops.API_VM_EXPORT_SECURE.role.value}"
            )
        return self.export_secure(req)

    def export_secure(self, req: vmops.VmExportRequest) -> vmops.VmExport:
        """``api.vm.export_secure`` (admins): the XML with secrets when ``req.secure``."""
        vm, host = self.service.locate_vm(req.name)
        body = vmops.DumpXml(VmRef(vm.uuid, vm.name), secure=req.secure, live=req.live)
        xml = self.service.agents.call(host.id, vmops.VM_DUMPXML, body).xml
        return vmops.VmExport(name=vm.name, host=host.id, xml=xml)

    def import_vm(self, req: vmops.VmImportRequest) -> api.VmCreated:
        try:
            spec = spec_from_xml(req.xml)  # refuses <filesystem>, <hostdev>, qemu:commandline, ...
        except DomainXmlError as exc:
            raise InvalidRequest(f"cannot import: {exc}") from exc
        with self.service.tx() as s:
            if repo.find_vm(s, spec.name) is not None:
                raise AlreadyExists(f"a VM named {spec.name!r} already exists in the fleet")
            try:
                other = repo.get_vm_by_uuid(s, spec.uuid)
            except NotFound:
                other = None
            if other is not None:
                raise AlreadyExists(f"VM {other.name} already has uuid {spec.uuid} in the fleet")
            if req.host is not None:
                repo.get_host(s, req.host)
        create = api.VmCreate(
            name=spec.name,
            vcpus=spec.vcpus,
            memory_mib=spec.memory_mib,
            host=req.host,
            start=req.start,
            domain_type=spec.domain_type.value,
            max_vcpus=spec.max_vcpus,
            max_memory_mib=spec.max_memory_mib,
            disks=spec.disks,
            nics=spec.nics,
            kernel_boot=spec.kernel_boot,
            cpuset=spec.cpuset,
            machine=spec.machine,
            allow_shared_disk=req.allow_shared_disk,
        )
        # The create flow's own placement and claim: the same rules, locks and reasons as vm create.
        claimed = self.service._claim(create, spec.uuid, self.service._placement_request(create, exclude=()))
        host_id = claimed.placement.host_id
        with self.service.tx() as s:
            repo.update_vm(s, spec.uuid, self.service.clock(), spec=spec)
        body = vmops.DefineVm(
            uuid=spec.uuid,
            name=spec.name,
            xml=req.xml,
            allow_shared_disk=req.allow_shared_disk,
            start=req.start,
        )
        try:
            result = self.service.agents.call(host_id, vmops.VM_DEFINE, body)
        except RequestTimeout as exc:
            self.service.finish_task(
                self._record(spec.uuid), status=Lifecycle.ERROR, last_error=f"import timed out: {exc.message}"
            )
            raise
        except VirtfleetError:
            with self.service.tx() as s:  # nothing was defined: forget the VM and its claim
                repo.release(s, spec.uuid, host_id)
                repo.delete_vm(s, spec.uuid)
            self.service.hosts_changed(host_id)
            raise
        view = self.service.apply_result(spec.uuid, result, status=Lifecycle.ACTIVE)
        log.info("imported VM %s onto %s", spec.name, host_id)
        return api.VmCreated(vm=view, placement=_placement_view(claimed.placement))

    def _record(self, uuid: str) -> repo.VmRecord:
        with self.service.tx() as s:
            return repo.get_vm_by_uuid(s, uuid)

    # -- snapshots -------------------------------------------------------------------------
    def snapshot_create(self, req: vmops.SnapshotCreateRequest) -> vmops.SnapshotListView:
        vm, host_id = self.service.target(req.name, Task.SNAPSHOTTING)
        body = vmops.SnapshotCreate(VmRef(vm.uuid, vm.name), req.snapshot, req.description)
        result = self._snapshot_call(
            vm, host_id, lambda: self.service.agents.call(host_id, vmops.VM_SNAPSHOT_CREATE, body)
        )
        return vmops.SnapshotListView(name=vm.name, snapshots=result.snapshots, message=result.message)

    def snapshot_list(self, name: str) -> vmops.SnapshotListView:
        vm, host = self.service.locate_vm(name)
        result = self.service.agents.call(host.id, vmops.VM_SNAPSHOT_LIST, VmAction(VmRef(vm.uuid, vm.name)))
        return vmops.SnapshotListView(name=vm.name, snapshots=result.snapshots)

    def snapshot_revert(self, req: vmops.SnapshotRequest) -> VmActionDone:
        vm, host_id = self.service.target(req.name, Task.REVERTING)
        body = vmops.SnapshotRef(VmRef(vm.uuid, vm.name), req.snapshot)
        result = self._snapshot_call(
            vm, host_id, lambda: self.service.agents.call(host_id, vmops.VM_SNAPSHOT_REVERT, body)
        )
        assert result.status is not None
        view = self.service.apply_result(vm.uuid, VmResult(status=result.status))
        return VmActionDone(view, result.message)

    def snapshot_delete(self, req: vmops.SnapshotRequest) -> vmops.SnapshotListView:
        vm, host_id = self.service.target(req.name, Task.SNAPSHOTTING)
        body = vmops.SnapshotRef(VmRef(vm.uuid, vm.name), req.snapshot)
        result = self._snapshot_call(
            vm, host_id, lambda: self.service.agents.call(host_id, vmops.VM_SNAPSHOT_DELETE, body)
        )
        return vmops.SnapshotListView(name=vm.name, snapshots=result.snapshots, message=result.message)

    def _snapshot_call(
        self, vm: repo.VmRecord, host_id: str, call: Callable[[], vmops.SnapshotResult]
    ) -> vmops.SnapshotResult:
        try:
            result = call()
        except VirtfleetError as exc:
            self.service.finish_task(vm, last_error=exc.message)
            raise
        if result.status is not None:
            with self.service.tx() as s:
                repo.update_vm(
                    s,
                    vm.uuid,
                    self.service.clock(),
                    desired_power=DesiredPower.after(result.status.state),
                )
            self.service.apply_result(vm.uuid, VmResult(status=result.status))
        else:
            self.service.finish_task(vm)
        return result

    # -- live vCPUs and memory ----------------------------------------------------------------
    def set_vcpus(self, req: vmops.VmSetVcpusRequest) -> VmActionDone:
        def call(vm: repo.VmRecord, host_id: str, ref: VmRef) -> VmResult:
            if vm.cpu_policy == "dedicated":
                raise Unsupported(
                    f"VM {vm.name} has dedicated CPUs: its vCPUs are pinned one to one and cannot change live"
                )
            if req.vcpus > vm.max_vcpus:
                raise InvalidRequest(f"VM {vm.name} can have at most {vm.max_vcpus} vCPUs (its max vCPUs)")
            result = self._with_claim(
                vm,
                host_id,
                {"VCPU": req.vcpus},
                req.vcpus > vm.vcpus,
                lambda: self.service.agents.call(host_id, vmops.VM_SET_VCPUS, vmops.SetVcpus(ref, req.vcpus)),
            )
            self._update_spec(vm, lambda spec: replace(spec, vcpus=req.vcpus))
            return result

        return self.service.change_vm(req.name, Task.RESIZING, call)

    def set_memory(self, req: vmops.VmSetMemoryRequest) -> VmActionDone:
        def call(vm: repo.VmRecord, host_id: str, ref: VmRef) -> VmResult:
            if req.memory_mib > vm.max_memory_mib:
                raise InvalidRequest(
                    f"cannot set the memory of VM {vm.name} higher than its max memory ({vm.max_memory_mib} MiB)"
                )
            result = self._with_claim(
                vm,
                host_id,
                {"MEMORY_MIB": req.memory_mib},
                req.memory_mib > vm.memory_mib,
                lambda: self.service.agents.call(
                    host_id, vmops.VM_SET_MEMORY, vmops.SetMemory(ref, req.memory_mib)
                ),
            )
            self._update_spec(vm, lambda spec: replace(spec, memory_mib=req.memory_mib))
            return result

        return self.service.change_vm(req.name, Task.RESIZING, call)

    def memstat(self, name: str) -> vmops.MemStatView:
        vm, host = self.service.locate_vm(name)
        stat = self.service.agents.call(host.id, vmops.VM_MEMSTAT, VmAction(VmRef(vm.uuid, vm.name)))
        return vmops.MemStatView(
            name=vm.name,
            host=host.id,
            memory_mib=stat.status.memory_mib,
            max_memory_mib=stat.status.max_memory_mib,
            balloon_kib=stat.balloon_kib,
            stats=stat.stats,
        )

    def _update_spec(self, vm: repo.VmRecord, change: Callable[[VmSpec], VmSpec], **values: Any) -> None:
        spec = vm.spec
        with self.service.tx() as s:
            current = repo.get_vm_by_uuid(s, vm.uuid).spec or spec
            if current is not None:
                values["spec"] = change(current)
            if values:
                repo.update_vm(s, vm.uuid, self.service.clock(), **values)

    # -- disks ---------------------------------------------------------------------------
    def disk_attach(self, req: vmops.VmDiskAttachRequest) -> VmActionDone:
        def call(vm: repo.VmRecord, host_id: str, ref: VmRef) -> VmResult:
            spec = vm.spec
            taken = [d.target for d in spec.disks] if spec is not None else []
            target = req.target or next_target(req.bus, taken)
            if target in taken:
                raise Conflict(f"VM {vm.name} has a disk {target} already")
            disk = DiskSpec(
                target=target,
                source="existing" if req.path is not None else "new",
                format=req.format,
                size_gib=req.size_gib,
                path=req.path,
                bus=req.bus,
                cache=req.cache,
                io=req.io,
                readonly=req.readonly,
            )
            body = vmops.DiskAttach(
                ref, disk, live=req.live, config=req.config, allow_shared_disk=req.allow_shared_disk
            )
            new_gib = req.size_gib if req.path is None else 0
            result = self._with_claim(
                vm,
                host_id,
                {"DISK_GIB": vm.disk_gib + new_gib},
                new_gib > 0,
                lambda: self.service.agents.call(host_id, vmops.VM_DISK_ATTACH, body),
            )
            attached = result.disks[0] if result.disks else disk
            self._update_spec(
                vm, lambda s: replace(s, disks=(*s.disks, attached)), disk_gib=vm.disk_gib + new_gib
            )
            return result

        return self.service.change_vm(req.name, Task.ATTACHING, call)

    def disk_detach(self, req: vmops.VmDiskDetachRequest) -> VmActionDone:
        def call(vm: repo.VmRecord, host_id: str, ref: VmRef) -> VmResult:
            spec = vm.spec
            known = next((d for d in spec.disks if d.target == req.target), None) if spec else None
            body = vmops.DiskDetach(
                ref, req.target, live=req.live, config=req.config, delete_volume=req.delete_volume
            )
            result = self.service.agents.call(host_id, vmops.VM_DISK_DETACH, body)
            # Capacity comes back only for a volume the agent says it deleted: a detach the guest has
            # not acknowledged yet keeps its volume (and so its claim).
            freed = known.size_gib if known is not None and result.deleted_volumes else 0
            if freed:
                with self.service.tx() as s:
                    old = repo.allocations_of(s, vm.uuid)
                self.service.resize_claim(vm.uuid, host_id, {**old, "DISK_GIB": max(0, vm.disk_gib - freed)})
            if req.config:
                self._update_spec(
                    vm,
                    lambda s: replace(s, disks=tuple(d for d in s.disks if d.target != req.target)),
                    disk_gib=max(0, vm.disk_gib - freed),
                )
            return result

        return self.service.change_vm(req.name, Task.DETACHING, call)

    def disk_resize(self, req: vmops.VmDiskResizeRequest) -> VmActionDone:
        if not req.i_know:
            raise InvalidRequest(
                "growing a disk is refused without --yes-i-know: the ops notes advise adding a disk instead, never "
                "growing a system disk, and backing up a data disk first"
            )

        def call(vm: repo.VmRecord, host_id: str, ref: VmRef) -> VmResult:
            spec = vm.spec
            known = next((d for d in spec.disks if d.target == req.target), None) if spec else None
            grow = 0
            if known is not None and known.source == "new" and known.device is DiskDevice.DISK:
                grow = max(0, req.size_gib - known.size_gib)
            body = vmops.DiskResize(ref, req.target, req.size_gib)
            result = self._with_claim(
                vm,
                host_id,
                {"DISK_GIB": vm.disk_gib + grow},
                grow > 0,
                lambda: self.service.agents.call(host_id, vmops.VM_DISK_RESIZE, body),
            )
            self._update_spec(
                vm,
                lambda s: replace(
                    s,
                    disks=tuple(
                        replace(d, size_gib=req.size_gib)
                        if d.target == req.target and d.source == "new"
                        else d
                        for d in s.disks
                    ),
                ),
                disk_gib=vm.disk_gib + grow,
            )
            return result

        return self.service.change_vm(req.name, Task.RESIZING, call)

    # -- NICs ------------------------------------------------------------------------------
    def nic_attach(self, req: vmops.VmNicAttachRequest) -> vmops.NicListView:
        vm, host_id = self.service.target(req.name, Task.ATTACHING)
        try:
            spec = vm.spec
            nics = spec.nics if spec is not None else ()
            mac = req.mac or generated_mac(vm.uuid, len(nics), [n.mac for n in nics if n.mac])
            nic = NicSpec(kind=req.kind, source=req.source, model=req.model, mac=mac)
            body = vmops.NicAttach(VmRef(vm.uuid, vm.name), nic, live=req.live, config=req.config)
            result = self.service.agents.call(host_id, vmops.VM_NIC_ATTACH, body)
        except VirtfleetError as exc:
            self.service.finish_task(vm, last_error=exc.message)
            raise
        if req.config:
            self._update_spec(vm, lambda s: replace(s, nics=(*tuple(n for n in s.nics if n.mac != mac), nic)))
        self.service.finish_task(vm)
        return vmops.NicListView(name=vm.name, host=host_id, nics=result.nics, message=result.message)

    def nic_detach(self, req: vmops.VmNicDetachRequest) -> vmops.NicListView:
        vm, host_id = self.service.target(req.name, Task.DETACHING)
        try:
            body = vmops.NicDetach(VmRef(vm.uuid, vm.name), req.mac, live=req.live, config=req.config)
            result = self.service.agents.call(host_id, vmops.VM_NIC_DETACH, body)
        except VirtfleetError as exc:
            self.service.finish_task(vm, last_error=exc.message)
            raise
        if req.config:
            self._update_spec(vm, lambda s: replace(s, nics=tuple(n for n in s.nics if n.mac != req.mac)))
        self.service.finish_task(vm)
        return vmops.NicListView(name=vm.name, host=host_id, nics=result.nics, message=result.message)

    def nic_list(self, name: str) -> vmops.NicListView:
        vm, host = self.service.locate_vm(name)
        result = self.service.agents.call(host.id, vmops.VM_NIC_LIST, VmAction(VmRef(vm.uuid, vm.name)))
        return vmops.NicListView(name=vm.name, host=host.id, nics=result.nics)

    # -- images ---------------------------------------------------------------------------
    def image_create(self, req: vmops.ImageCreateRequest) -> vmops.ImageView:
        self.service.up_host(req.host)
        info = self.service.agents.call(
            req.host, vmops.IMAGE_CREATE, vmops.ImageCreate(req.image, req.format, req.size_gib)
        )
        return vmops.ImageView(host=req.host, image=info, message=f"created {req.image.describe()}")

    def image_info(self, req: vmops.ImageInfoApiRequest) -> vmops.ImageView:
        self.service.up_host(req.host)
        info = self.service.agents.call(req.host, vmops.IMAGE_INFO, vmops.ImageInfoRequest(req.image))
        return vmops.ImageView(host=req.host, image=info)

    def image_convert(self, req: vmops.ImageConvertRequest) -> vmops.ImageView:
        self.service.up_host(req.host)
        body = vmops.ImageConvert(req.source, req.dest, req.format)
        info = self.service.agents.call(req.host, vmops.IMAGE_CONVERT, body)
        return vmops.ImageView(
            host=req.host, image=info, message=f"converted {req.source.describe()} to {req.dest.describe()}"
        )


def register(table: HandlerTable, service: ControllerService) -> None:
    """Serve the API calls of this feature area (simple VM operations are served generically)."""
    ops = VmOps(service)
    table.register(vmops.API_VM_AUTOSTART, ops.autostart)
    table.register(vmops.API_VM_CONSOLE, lambda b: ops.console(b.name))
    table.register(vmops.API_VM_EXPORT, ops.export)
    table.register(vmops.API_VM_EXPORT_SECURE, ops.export_secure)
    table.register(vmops.API_VM_IMPORT, ops.import_vm)
    table.register(vmops.API_VM_SNAPSHOT_CREATE, ops.snapshot_create)
    table.register(vmops.API_VM_SNAPSHOT_LIST, lambda b: ops.snapshot_list(b.name))
    table.register(vmops.API_VM_SNAPSHOT_REVERT, ops.snapshot_revert)
    table.register(vmops.API_VM_SNAPSHOT_DELETE, ops.snapshot_delete)
    table.register(vmops.API_VM_SETVCPUS, ops.set_vcpus)
    table.register(vmops.API_VM_SETMEM, ops.set_memory)
    table.register(vmops.API_VM_MEMSTAT, lambda b: ops.memstat(b.name))
    table.register(vmops.API_VM_DISK_ATTACH, ops.disk_attach)
    table.register(vmops.API_VM_DISK_DETACH, ops.disk_detach)
    table.register(vmops.API_VM_DISK_RESIZE, ops.disk_resize)
    table.register(vmops.API_VM_NIC_ATTACH, ops.nic_attach)
    table.register(vmops.API_VM_NIC_DETACH, ops.nic_detach)
    table.register(vmops.API_VM_NIC_LIST, lambda b: ops.nic_list(b.name))
    table.register(vmops.API_IMAGE_CREATE, ops.image_create)
    table.register(vmops.API_IMAGE_INFO, ops.image_info)
    table.register(vmops.API_IMAGE_CONVERT, ops.image_convert)
