"""VM operations beyond the basic lifecycle: reboot/suspend/resume/autostart, console, export/import,
snapshots, live vCPU and memory changes (with capacity re-claims), disks, NICs and images.

Every use case finds the VM and its host, checks the host is up, sends one agent command and records
what the agent says the VM looks like afterwards. Capacity: a grow is claimed *before* the agent is
asked (refused with CapacityExceeded when the host has no room at its ratio) and given back if the
agent fails; a shrink is released only once the agent has done it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from common.domain_xml import DomainXmlError, parse_domain_xml, spec_from_parsed
from common.errors import (
    AlreadyExists,
    Conflict,
    InvalidRequest,
    NotFound,
    RequestTimeout,
    Unsupported,
    VirtfleetError,
)
from common.messages import api
from common.messages.vm import (
    DiskDevice,
    DiskSpec,
    NicSpec,
    PowerState,
    SetAutostart,
    VmAction,
    VmRef,
    VmResult,
    VmSpec,
)
from common.messages.vmops import (
    ConsoleInfo,
    ConsoleView,
    DefineVm,
    DiskAttach,
    DiskDetach,
    DiskResize,
    DomainXml,
    DumpXml,
    ImageConvert,
    ImageConvertRequest,
    ImageCreate,
    ImageCreateRequest,
    ImageInfo,
    ImageInfoApiRequest,
    ImageInfoRequest,
    ImageView,
    MemStat,
    MemStatView,
    NicAttach,
    NicDetach,
    NicList,
    NicListView,
    SetMemory,
    SetVcpus,
    SnapshotCreate,
    SnapshotCreateRequest,
    SnapshotListView,
    SnapshotRef,
    SnapshotRequest,
    SnapshotResult,
    VmAutostartRequest,
    VmDiskAttachRequest,
    VmDiskDetachRequest,
    VmDiskResizeRequest,
    VmExport,
    VmExportRequest,
    VmImportRequest,
    VmNicAttachRequest,
    VmNicDetachRequest,
    VmSetMemoryRequest,
    VmSetVcpusRequest,
)
from common.schema import from_plain, to_plain
from common.transport.rpc import HandlerFn
from controller import fleet
from controller.db import repository as repo
from controller.service import ControllerService, _placement_view
from controller.vm_spec import generated_mac, next_target

log = logging.getLogger(__name__)

#: Listen addresses that mean "every address of the host": the console is reached at the host's name.
_ANY_ADDRESS = frozenset({"0.0.0.0", "::", "[::]", ""})  # noqa: S104 - compared, never bound
_RUNNING_STATES = frozenset({PowerState.RUNNING.value, PowerState.BLOCKED.value, PowerState.PAUSED.value})


def _spec(vm: repo.VmRecord) -> VmSpec | None:
    """The VmSpec the controller last recorded for the VM (None when it has none yet)."""
    if not vm.spec:
        return None
    try:
        return from_plain(VmSpec, vm.spec, "spec")
    except InvalidRequest:
        log.warning("VM %s: its recorded spec is unreadable; treating it as unknown", vm.name)
        return None


def _spec_json(spec: VmSpec) -> str:
    return json.dumps(to_plain(spec), sort_keys=True)


def _desired_after(state: PowerState) -> str:
    return "running" if state.value in _RUNNING_STATES else "shutoff"


def console_address(info: ConsoleInfo, hostname: str) -> str:
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
    def _locate(self, name: str) -> tuple[repo.VmRecord, repo.HostRecord]:
        """The VM and its host for a read-only query (no task is marked)."""
        now = self.service.clock()
        with self.service.tx() as s:
            vm = repo.get_vm(s, name)
            if vm.host_id is None:
                raise Conflict(f"VM {name} has no host (status {vm.status})")
            host = repo.get_host(s, vm.host_id)
        if not fleet.host_is_up(host, now, self.service.config.down_after_s):
            raise Conflict(
                f"host {host.id} of VM {name} is down; try again when its agent is back", retryable=True
            )
        return vm, host

    def _host(self, host_id: str) -> repo.HostRecord:
        now = self.service.clock()
        with self.service.tx() as s:
            host = repo.get_host(s, host_id)
        if not fleet.host_is_up(host, now, self.service.config.down_after_s):
            raise Conflict(f"host {host_id} is down; try again when its agent is back", retryable=True)
        return host

    def _done(self, vm: repo.VmRecord, **values: Any) -> None:
        """Clear the task (after a failure: with ``last_error``) and store ``values``."""
        with self.service.tx() as s:
            repo.update_vm(s, vm.uuid, self.service.clock(), task=None, **values)

    def _change(
        self,
        name: str,
        task: str,
        call: Callable[[repo.VmRecord, str, VmRef], VmResult],
        *,
        desired: Callable[[VmResult], str | None] = lambda _r: None,
    ) -> api.VmActionDone:
        """Mark the task, call the agent, record the VM's state afterwards (or the error)."""
        vm, host_id = self.service.target(name, task)
        try:
            result = call(vm, host_id, VmRef(uuid=vm.uuid, name=vm.name))
        except VirtfleetError as exc:
            self._done(vm, last_error=exc.message)
            raise
        want = desired(result)
        if want is not None:
            with self.service.tx() as s:
                repo.update_vm(s, vm.uuid, self.service.clock(), desired_power=want)
        return api.VmActionDone(self.service.apply_result(vm.uuid, result), result.message)

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
        except RequestTimeout:
            raise  # the agent may still do it: keep the claim, the next report tells
        except VirtfleetError:
            self._restore(vm, host_id, old)
            raise

    # -- simple lifecycle ----------------------------------------------------------------
    def action(self, name: str, action: str) -> api.VmActionDone:
        tasks = {"reboot": "rebooting", "suspend": "suspending", "resume": "resuming"}
        return self._change(
            name,
            tasks[action],
            lambda _vm, h, ref: self.service.agents.vm_action(h, action, ref),
            desired=lambda r: None if r.status is None else _desired_after(r.status.state),
        )

    def autostart(self, req: VmAutostartRequest) -> api.VmActionDone:
        return self._change(
            req.name,
            "autostart",
            lambda _vm, h, ref: self.service.agents.set_autostart(h, SetAutostart(ref, req.enabled)),
        )

    def console(self, name: str) -> ConsoleView:
        vm, host = self._locate(name)
        info = self.service.agents.call(host.id, "vm.console", VmAction(VmRef(vm.uuid, vm.name)), ConsoleInfo)
        if info.type is None:
            raise NotFound(f"VM {name} has no graphical console (create it with --graphics vnc)")
        return ConsoleView(
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
    def export(self, req: VmExportRequest) -> VmExport:
        vm, host = self._locate(req.name)
        body = DumpXml(VmRef(vm.uuid, vm.name), secure=req.secure, live=req.live)
        xml = self.service.agents.call(host.id, "vm.dumpxml", body, DomainXml).xml
        return VmExport(name=vm.name, host=host.id, xml=xml)

    def import_vm(self, req: VmImportRequest) -> api.VmCreated:
        try:
            parsed = parse_domain_xml(req.xml)
            spec = spec_from_parsed(parsed)
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
            repo.update_vm(s, spec.uuid, self.service.clock(), spec=_spec_json(spec))
        body = DefineVm(
            uuid=spec.uuid,
            name=spec.name,
            xml=req.xml,
            allow_shared_disk=req.allow_shared_disk,
            start=req.start,
        )
        try:
            result = self.service.agents.call(host_id, "vm.define", body, VmResult)
        except RequestTimeout as exc:
            self._done(self._record(spec.uuid), status="error", last_error=f"import timed out: {exc.message}")
            raise
        except VirtfleetError:
            with self.service.tx() as s:  # nothing was defined: forget the VM and its claim
                repo.release(s, spec.uuid, host_id)
                repo.delete_vm(s, spec.uuid)
            raise
        view = self.service.apply_result(spec.uuid, result, status="active")
        log.info("imported VM %s onto %s", spec.name, host_id)
        return api.VmCreated(vm=view, placement=_placement_view(claimed.placement))

    def _record(self, uuid: str) -> repo.VmRecord:
        with self.service.tx() as s:
            return repo.get_vm_by_uuid(s, uuid)

    # -- snapshots -------------------------------------------------------------------------
    def snapshot_create(self, req: SnapshotCreateRequest) -> SnapshotListView:
        vm, host_id = self.service.target(req.name, "snapshotting")
        body = SnapshotCreate(VmRef(vm.uuid, vm.name), req.snapshot, req.description)
        result = self._snapshot_call(vm, host_id, "vm.snapshot.create", body)
        return SnapshotListView(name=vm.name, snapshots=result.snapshots, message=result.message)

    def snapshot_list(self, name: str) -> SnapshotListView:
        vm, host = self._locate(name)
        result = self.service.agents.call(
            host.id, "vm.snapshot.list", VmAction(VmRef(vm.uuid, vm.name)), SnapshotResult
        )
        return SnapshotListView(name=vm.name, snapshots=result.snapshots)

    def snapshot_revert(self, req: SnapshotRequest) -> api.VmActionDone:
        vm, host_id = self.service.target(req.name, "reverting")
        result = self._snapshot_call(
            vm, host_id, "vm.snapshot.revert", SnapshotRef(VmRef(vm.uuid, vm.name), req.snapshot)
        )
        assert result.status is not None
        view = self.service.apply_result(vm.uuid, VmResult(status=result.status))
        return api.VmActionDone(view, result.message)

    def snapshot_delete(self, req: SnapshotRequest) -> SnapshotListView:
        vm, host_id = self.service.target(req.name, "snapshotting")
        result = self._snapshot_call(
            vm, host_id, "vm.snapshot.delete", SnapshotRef(VmRef(vm.uuid, vm.name), req.snapshot)
        )
        return SnapshotListView(name=vm.name, snapshots=result.snapshots, message=result.message)

    def _snapshot_call(self, vm: repo.VmRecord, host_id: str, kind: str, body: object) -> SnapshotResult:
        try:
            result = self.service.agents.call(host_id, kind, body, SnapshotResult)
        except VirtfleetError as exc:
            self._done(vm, last_error=exc.message)
            raise
        if result.status is not None:
            with self.service.tx() as s:
                repo.update_vm(
                    s, vm.uuid, self.service.clock(), desired_power=_desired_after(result.status.state)
                )
            self.service.apply_result(vm.uuid, VmResult(status=result.status))
        else:
            self._done(vm)
        return result

    # -- live vCPUs and memory ----------------------------------------------------------------
    def set_vcpus(self, req: VmSetVcpusRequest) -> api.VmActionDone:
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
                lambda: self.service.agents.call(host_id, "vm.set_vcpus", SetVcpus(ref, req.vcpus), VmResult),
            )
            self._update_spec(vm, lambda spec: replace(spec, vcpus=req.vcpus))
            return result

        return self._change(req.name, "resizing", call)

    def set_memory(self, req: VmSetMemoryRequest) -> api.VmActionDone:
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
                    host_id, "vm.set_memory", SetMemory(ref, req.memory_mib), VmResult
                ),
            )
            self._update_spec(vm, lambda spec: replace(spec, memory_mib=req.memory_mib))
            return result

        return self._change(req.name, "resizing", call)

    def memstat(self, name: str) -> MemStatView:
        vm, host = self._locate(name)
        stat = self.service.agents.call(host.id, "vm.memstat", VmAction(VmRef(vm.uuid, vm.name)), MemStat)
        return MemStatView(
            name=vm.name,
            host=host.id,
            memory_mib=stat.status.memory_mib,
            max_memory_mib=stat.status.max_memory_mib,
            balloon_kib=stat.balloon_kib,
            stats=stat.stats,
        )

    def _update_spec(self, vm: repo.VmRecord, change: Callable[[VmSpec], VmSpec], **values: Any) -> None:
        spec = _spec(vm)
        with self.service.tx() as s:
            current = _spec(repo.get_vm_by_uuid(s, vm.uuid)) or spec
            if current is not None:
                values["spec"] = _spec_json(change(current))
            if values:
                repo.update_vm(s, vm.uuid, self.service.clock(), **values)

    # -- disks ---------------------------------------------------------------------------
    def disk_attach(self, req: VmDiskAttachRequest) -> api.VmActionDone:
        def call(vm: repo.VmRecord, host_id: str, ref: VmRef) -> VmResult:
            spec = _spec(vm)
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
            body = DiskAttach(
                ref, disk, live=req.live, config=req.config, allow_shared_disk=req.allow_shared_disk
            )
            new_gib = req.size_gib if req.path is None else 0
            result = self._with_claim(
                vm,
                host_id,
                {"DISK_GIB": vm.disk_gib + new_gib},
                new_gib > 0,
                lambda: self.service.agents.call(host_id, "vm.disk.attach", body, VmResult),
            )
            attached = result.disks[0] if result.disks else disk
            self._update_spec(
                vm, lambda s: replace(s, disks=(*s.disks, attached)), disk_gib=vm.disk_gib + new_gib
            )
            return result

        return self._change(req.name, "attaching", call)

    def disk_detach(self, req: VmDiskDetachRequest) -> api.VmActionDone:
        def call(vm: repo.VmRecord, host_id: str, ref: VmRef) -> VmResult:
            spec = _spec(vm)
            known = next((d for d in spec.disks if d.target == req.target), None) if spec else None
            freed = known.size_gib if known is not None and known.source == "new" and req.delete_volume else 0
            body = DiskDetach(
                ref, req.target, live=req.live, config=req.config, delete_volume=req.delete_volume
            )
            result = self._with_claim(
                vm,
                host_id,
                {"DISK_GIB": max(0, vm.disk_gib - freed)},
                False,
                lambda: self.service.agents.call(host_id, "vm.disk.detach", body, VmResult),
            )
            if req.config:
                self._update_spec(
                    vm,
                    lambda s: replace(s, disks=tuple(d for d in s.disks if d.target != req.target)),
                    disk_gib=max(0, vm.disk_gib - freed),
                )
            return result

        return self._change(req.name, "detaching", call)

    def disk_resize(self, req: VmDiskResizeRequest) -> api.VmActionDone:
        if not req.i_know:
            raise InvalidRequest(
                "growing a disk is refused without --yes-i-know: the ops notes advise adding a disk instead, never "
                "growing a system disk, and backing up a data disk first"
            )

        def call(vm: repo.VmRecord, host_id: str, ref: VmRef) -> VmResult:
            spec = _spec(vm)
            known = next((d for d in spec.disks if d.target == req.target), None) if spec else None
            grow = 0
            if known is not None and known.source == "new" and known.device is DiskDevice.DISK:
                grow = max(0, req.size_gib - known.size_gib)
            body = DiskResize(ref, req.target, req.size_gib)
            result = self._with_claim(
                vm,
                host_id,
                {"DISK_GIB": vm.disk_gib + grow},
                grow > 0,
                lambda: self.service.agents.call(host_id, "vm.disk.resize", body, VmResult),
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

        return self._change(req.name, "resizing", call)

    # -- NICs ------------------------------------------------------------------------------
    def nic_attach(self, req: VmNicAttachRequest) -> NicListView:
        vm, host_id = self.service.target(req.name, "attaching")
        try:
            spec = _spec(vm)
            nics = spec.nics if spec is not None else ()
            mac = req.mac or generated_mac(vm.uuid, len(nics), [n.mac for n in nics if n.mac])
            nic = NicSpec(kind=req.kind, source=req.source, model=req.model, mac=mac)
            body = NicAttach(VmRef(vm.uuid, vm.name), nic, live=req.live, config=req.config)
            result = self.service.agents.call(host_id, "vm.nic.attach", body, NicList)
        except VirtfleetError as exc:
            self._done(vm, last_error=exc.message)
            raise
        if req.config:
            self._update_spec(vm, lambda s: replace(s, nics=(*tuple(n for n in s.nics if n.mac != mac), nic)))
        self._done(vm)
        return NicListView(name=vm.name, host=host_id, nics=result.nics, message=result.message)

    def nic_detach(self, req: VmNicDetachRequest) -> NicListView:
        vm, host_id = self.service.target(req.name, "detaching")
        try:
            body = NicDetach(VmRef(vm.uuid, vm.name), req.mac, live=req.live, config=req.config)
            result = self.service.agents.call(host_id, "vm.nic.detach", body, NicList)
        except VirtfleetError as exc:
            self._done(vm, last_error=exc.message)
            raise
        if req.config:
            self._update_spec(vm, lambda s: replace(s, nics=tuple(n for n in s.nics if n.mac != req.mac)))
        self._done(vm)
        return NicListView(name=vm.name, host=host_id, nics=result.nics, message=result.message)

    def nic_list(self, name: str) -> NicListView:
        vm, host = self._locate(name)
        result = self.service.agents.call(host.id, "vm.nic.list", VmAction(VmRef(vm.uuid, vm.name)), NicList)
        return NicListView(name=vm.name, host=host.id, nics=result.nics)

    # -- images ---------------------------------------------------------------------------
    def image_create(self, req: ImageCreateRequest) -> ImageView:
        self._host(req.host)
        info = self.service.agents.call(
            req.host, "image.create", ImageCreate(req.image, req.format, req.size_gib), ImageInfo
        )
        return ImageView(host=req.host, image=info, message=f"created {req.image.describe()}")

    def image_info(self, req: ImageInfoApiRequest) -> ImageView:
        self._host(req.host)
        info = self.service.agents.call(req.host, "image.info", ImageInfoRequest(req.image), ImageInfo)
        return ImageView(host=req.host, image=info)

    def image_convert(self, req: ImageConvertRequest) -> ImageView:
        self._host(req.host)
        body = ImageConvert(req.source, req.dest, req.format)
        info = self.service.agents.call(req.host, "image.convert", body, ImageInfo)
        return ImageView(
            host=req.host, image=info, message=f"converted {req.source.describe()} to {req.dest.describe()}"
        )


def api_handlers(service: ControllerService) -> dict[str, HandlerFn]:
    """The API kinds of this feature area, bound to the service."""
    ops = VmOps(service)
    return {
        "api.vm.reboot": lambda b: ops.action(b.name, "reboot"),
        "api.vm.suspend": lambda b: ops.action(b.name, "suspend"),
        "api.vm.resume": lambda b: ops.action(b.name, "resume"),
        "api.vm.autostart": ops.autostart,
        "api.vm.console": lambda b: ops.console(b.name),
        "api.vm.export": ops.export,
        "api.vm.import": ops.import_vm,
        "api.vm.snapshot.create": ops.snapshot_create,
        "api.vm.snapshot.list": lambda b: ops.snapshot_list(b.name),
        "api.vm.snapshot.revert": ops.snapshot_revert,
        "api.vm.snapshot.delete": ops.snapshot_delete,
        "api.vm.setvcpus": ops.set_vcpus,
        "api.vm.setmem": ops.set_memory,
        "api.vm.memstat": lambda b: ops.memstat(b.name),
        "api.vm.disk.attach": ops.disk_attach,
        "api.vm.disk.detach": ops.disk_detach,
        "api.vm.disk.resize": ops.disk_resize,
        "api.vm.nic.attach": ops.nic_attach,
        "api.vm.nic.detach": ops.nic_detach,
        "api.vm.nic.list": lambda b: ops.nic_list(b.name),
        "api.image.create": ops.image_create,
        "api.image.info": ops.image_info,
        "api.image.convert": ops.image_convert,
    }
