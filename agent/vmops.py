"""The agent's handlers for the VM operations of the ops notes beyond the basic lifecycle.

define/dumpxml (import/export), console, snapshots, live vCPU and memory changes, disk and NIC
hot-plug, and qemu-img images. Like :mod:`agent.handlers` each handler is idempotent or refuses
clearly, takes the VM's lock (shared with the lifecycle handlers) and asks for a fresh report after
changing something. Checks come first, so a refusal changes nothing.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TypeVar

from agent import disks as disk_helpers
from agent.host_storage import HostStorage
from agent.ports import ACTIVE_STATES, GIB, Hypervisor, Images
from agent.storage_pools import FileKind
from common.domain_xml import (
    DomainXmlError,
    ParsedDisk,
    ParsedDomain,
    ParsedNic,
    build_disk_xml,
    build_domain_xml,
    build_interface_xml,
    build_snapshot_xml,
    detach_disk_xml,
    detach_interface_xml,
    domiflist,
    parse_domain_xml,
    parse_snapshot_xml,
    spec_from_xml,
    writable_disk_paths,
)
from common.errors import (
    AlreadyExists,
    Conflict,
    HypervisorError,
    InvalidRequest,
    NotFound,
    Unsupported,
    VirtfleetError,
)
from common.messages import vmops as ops
from common.messages.base import replace
from common.messages.vm import (
    DiskDevice,
    DiskSpec,
    DomainType,
    NicKind,
    PowerState,
    VmAction,
    VmRef,
    VmResult,
    VmSpec,
    VmStatus,
)
from common.messages.vmops import (
    ConsoleInfo,
    DefineVm,
    DiskAttach,
    DiskDetach,
    DiskResize,
    DomainXml,
    DumpXml,
    ImageConvert,
    ImageCreate,
    ImageInfo,
    ImageInfoRequest,
    ImageLocation,
    MemStat,
    NicAttach,
    NicDetach,
    NicList,
    NicRow,
    SetMemory,
    SetVcpus,
    SnapshotCreate,
    SnapshotInfo,
    SnapshotRef,
    SnapshotResult,
)
from common.transport.rpc import HandlerTable

log = logging.getLogger(__name__)

_RUNNING = frozenset({PowerState.RUNNING, PowerState.BLOCKED, PowerState.PAUSED})
#: States from which a domain can be started.
STARTABLE = frozenset({PowerState.SHUTOFF, PowerState.CRASHED, PowerState.NOSTATE})

Changing = Callable[[str], AbstractContextManager[None]]
T = TypeVar("T")


def refuse_kvm_without_hw_virt(hv: Hypervisor, name: str, domain_type: str, what_to_do: str) -> None:
    """Unsupported for a kvm domain on a host without usable hardware virtualisation."""
    if domain_type == DomainType.KVM.value and not hv.hw_virt():
        raise Unsupported(
            f"VM {name}: domain type kvm needs hardware virtualisation, which this host does not have"
            f"{what_to_do}"
        )


def refuse_name_of_another(hv: Hypervisor, name: str, uuid: str) -> None:
    """AlreadyExists when another domain on the host (another uuid) is named ``name``."""
    other = hv.uuid_for_name(name)
    if other is not None and other.lower() != uuid.lower():
        raise AlreadyExists(
            f"a VM named {name} exists on this host with another uuid ({other})",
            details={"name": name, "uuid": other},
        )


def _parse(xml: str, what: str) -> ParsedDomain:
    try:
        return parse_domain_xml(xml)
    except DomainXmlError as exc:
        raise HypervisorError(f"{what}: libvirt returned domain XML virtfleet cannot read: {exc}") from exc


def _nic_rows(parsed: ParsedDomain) -> tuple[NicRow, ...]:
    return tuple(NicRow(*row) for row in domiflist(parsed))


class VmOpsHandlers:
    """Handlers for the ``vm.*`` operations of common.messages.vmops and the ``image.*`` commands."""

    def __init__(
        self,
        hypervisor: Hypervisor,
        images: Images,
        changing: Changing,
        define_lock: threading.Lock,
        storage: HostStorage,
    ) -> None:
        self._hv = hypervisor
        self._images = images
        self._storage = storage
        self._changing = changing
        self._define_lock = define_lock

    def register(self, table: HandlerTable) -> None:
        """Serve the VM operations beyond the lifecycle, and the image commands."""
        table.register(ops.VM_DEFINE, self.define)
        table.register(ops.VM_DUMPXML, self.dumpxml)
        table.register(ops.VM_CONSOLE, self.console)
        table.register(ops.VM_SNAPSHOT_CREATE, self.snapshot_create)
        table.register(ops.VM_SNAPSHOT_LIST, self.snapshot_list)
        table.register(ops.VM_SNAPSHOT_REVERT, self.snapshot_revert)
        table.register(ops.VM_SNAPSHOT_DELETE, self.snapshot_delete)
        table.register(ops.VM_SET_VCPUS, self.set_vcpus)
        table.register(ops.VM_SET_MEMORY, self.set_memory)
        table.register(ops.VM_MEMSTAT, self.memstat)
        table.register(ops.VM_DISK_ATTACH, self.disk_attach)
        table.register(ops.VM_DISK_DETACH, self.disk_detach)
        table.register(ops.VM_DISK_RESIZE, self.disk_resize)
        table.register(ops.VM_NIC_ATTACH, self.nic_attach)
        table.register(ops.VM_NIC_DETACH, self.nic_detach)
        table.register(ops.VM_NIC_LIST, self.nic_list)
        table.register(ops.IMAGE_CREATE, self.image_create)
        table.register(ops.IMAGE_INFO, self.image_info)
        table.register(ops.IMAGE_CONVERT, self.image_convert)

    # -- helpers ----------------------------------------------------------------------
    def _existing(self, ref: VmRef) -> VmStatus:
        status = self._hv.find(ref.uuid)
        if status is None:
            raise NotFound(f"VM {ref.name} ({ref.uuid}) is not defined on this host")
        return status

    def _config(self, ref: VmRef) -> ParsedDomain:
        return _parse(self._hv.domain_xml(ref.uuid, live=False), f"VM {ref.name}")

    def _live(self, ref: VmRef) -> ParsedDomain:
        return _parse(self._hv.domain_xml(ref.uuid, live=True), f"VM {ref.name}")

    def _scope(self, ref: VmRef, status: VmStatus, live: bool | None, config: bool) -> tuple[bool, bool]:
        """(change the running domain, change the definition) for a device or resource change."""
        running = status.state in ACTIVE_STATES
        if live is True and not running:
            raise Conflict(
                f"VM {ref.name} is {status.state.value}: there is no running domain to change live "
                "(use --config to change only its definition)"
            )
        if config and not status.persistent:
            raise Conflict(f"VM {ref.name} is transient: it has no definition to change (--live only)")
        return (running if live is None else live), config

    # -- define / dumpxml / console -------------------------------------------------------
    def define(self, body: DefineVm) -> VmResult:
        """``vm import``: the domain defined is rebuilt from the validated spec of ``body.xml``,
        never the XML as given (elements that reach the host are refused, every file must lie in
        a storage pool)."""
        spec = _spec_from_request_xml(body.xml)
        if spec.uuid != body.uuid.lower() or spec.name != body.name:
            raise InvalidRequest(f"the XML defines {spec.name} ({spec.uuid}), not {body.name} ({body.uuid})")
        refuse_kvm_without_hw_virt(
            self._hv,
            spec.name,
            spec.domain_type.value,
            "; change <domain type='kvm'> to 'qemu' (TCG) in the XML",
        )
        try:
            xml = build_domain_xml(spec)
        except ValueError as exc:
            raise InvalidRequest(f"VM {spec.name}: {exc}") from exc
        with self._changing(spec.uuid):
            with self._define_lock:
                refuse_name_of_another(self._hv, spec.name, spec.uuid)
                self._storage.check_spec_files(spec, self._images)
                if not body.allow_shared_disk:
                    for path in writable_disk_paths(parse_domain_xml(xml)):
                        users = disk_helpers.disk_users(self._hv, path, exclude_uuid=spec.uuid)
                        if users:
                            raise AlreadyExists(
                                disk_helpers.in_use_message(path, users),
                                details={"path": path, "users": users},
                            )
                existed = self._hv.find(spec.uuid) is not None
                self._hv.define(xml)
                self._hv.mark_managed(spec.uuid)
                owned = self._vouched_volumes(spec, body.xml)
                if owned and not self._hv.owned_volumes(spec.uuid):
                    self._hv.set_owned_volumes(spec.uuid, owned)
            message = "definition replaced" if existed else "defined"
            status = self._hv.status(spec.uuid)
            if body.start and status.state in STARTABLE:
                self._hv.start(spec.uuid)
                message += " and started"
            log.info("defined VM %s (%s) from XML, rebuilt from its spec", spec.name, spec.uuid)
            return VmResult(status=self._hv.status(spec.uuid), message=message)

    def _vouched_volumes(self, spec: VmSpec, xml: str) -> tuple[str, ...]:
        """The volumes an exported VM says virtfleet made for it that are its own writable disks
        and pool volumes of this host (so `vm delete --delete-disks` can never reach another
        file through a forged claim)."""
        disks = {
            d.path
            for d in spec.disks
            if d.path is not None and d.device is DiskDevice.DISK and not d.readonly
        }
        return tuple(
            p for p in disk_helpers.claimed_volumes(xml) if p in disks and self._hv.is_pool_volume(p)
        )

    def dumpxml(self, body: DumpXml) -> DomainXml:
        self._existing(body.vm)
        return DomainXml(xml=self._hv.domain_xml(body.vm.uuid, live=body.live, secure=body.secure))

    def console(self, body: VmAction) -> ConsoleInfo:
        status = self._existing(body.vm)
        running = status.state in ACTIVE_STATES
        # The secure XML only to learn whether a password is set; the password itself is not returned.
        parsed = _parse(self._hv.domain_xml(body.vm.uuid, live=True, secure=True), f"VM {body.vm.name}")
        graphics = parsed.graphics
        if graphics is None:
            return ConsoleInfo(None, None, None, False, False, running)
        # An automatic port exists only while the VM runs; the definition says port -1 (or a stale one).
        port = None if graphics.autoport and not running else graphics.port
        return ConsoleInfo(
            graphics.type, graphics.listen, port, graphics.autoport, graphics.password_set, running
        )

    # -- snapshots ----------------------------------------------------------------------
    def _snapshots(self, uuid: str) -> tuple[SnapshotInfo, ...]:
        infos = []
        for xml, current in self._hv.list_snapshots(uuid):
            try:
                snap = parse_snapshot_xml(xml)
            except DomainXmlError as exc:
                log.warning("VM %s: unreadable snapshot XML: %s", uuid, exc)
                continue
            infos.append(
                SnapshotInfo(
                    name=snap.name,
                    created_at=snap.created_at,
                    state=snap.state,
                    description=snap.description,
                    current=current,
                    parent=snap.parent,
                    memory=snap.memory,
                )
            )
        return tuple(sorted(infos, key=lambda s: (s.created_at, s.name)))

    def snapshot_create(self, body: SnapshotCreate) -> SnapshotResult:
        ref = body.vm
        with self._changing(ref.uuid):
            status = self._existing(ref)
            config = self._config(ref)
            for disk in config.disks:
                if disk.device != "disk" or disk.readonly or disk.path is None:
                    continue
                fmt = disk.format or "raw"
                if fmt != "qcow2":
                    raise Unsupported(
                        f"VM {ref.name} cannot be snapshotted: disk {disk.target} ({disk.path}) is {fmt}, and "
                        "snapshots need qcow2 disks. Convert it (virtfleet image convert HOST SRC DST --format "
                        "qcow2) and attach the copy instead",
                        details={"target": disk.target, "format": fmt},
                    )
            if status.state in ACTIVE_STATES:
                hotplugged = self._live(ref).hotplugged_vcpus
                if hotplugged:
                    raise Conflict(
                        f"VM {ref.name} has {hotplugged} vCPU(s) hot-added since it started; QEMU cannot restore "
                        "a snapshot of that state (reverting would leave the VM shut off). Shut it down and start "
                        "it again, then take the snapshot"
                    )
            if any(s.name == body.name for s in self._snapshots(ref.uuid)):
                raise AlreadyExists(f"VM {ref.name} already has a snapshot named {body.name}")
            self._hv.create_snapshot(ref.uuid, build_snapshot_xml(body.name, body.description))
            log.info("VM %s: snapshot %s created", ref.name, body.name)
            return SnapshotResult(
                status=self._hv.status(ref.uuid), snapshots=self._snapshots(ref.uuid), message="created"
            )

    def snapshot_list(self, body: VmAction) -> SnapshotResult:
        status = self._existing(body.vm)
        return SnapshotResult(status=status, snapshots=self._snapshots(body.vm.uuid))

    def _require_snapshot(self, body: SnapshotRef) -> None:
        names = [s.name for s in self._snapshots(body.vm.uuid)]
        if body.name not in names:
            known = ", ".join(names) or "none"
            raise NotFound(f"VM {body.vm.name} has no snapshot named {body.name} (it has: {known})")

    def snapshot_revert(self, body: SnapshotRef) -> SnapshotResult:
        with self._changing(body.vm.uuid):
            self._existing(body.vm)
            self._require_snapshot(body)
            self._hv.revert_snapshot(body.vm.uuid, body.name)
            status = self._hv.status(body.vm.uuid)
            log.info("VM %s reverted to snapshot %s (%s)", body.vm.name, body.name, status.state.value)
            return SnapshotResult(
                status=status, snapshots=self._snapshots(body.vm.uuid), message=f"reverted to {body.name}"
            )

    def snapshot_delete(self, body: SnapshotRef) -> SnapshotResult:
        with self._changing(body.vm.uuid):
            self._existing(body.vm)
            self._require_snapshot(body)
            self._hv.delete_snapshot(body.vm.uuid, body.name)
            return SnapshotResult(
                status=self._hv.status(body.vm.uuid),
                snapshots=self._snapshots(body.vm.uuid),
                message=f"deleted {body.name}",
            )

    # -- live vCPUs and memory ------------------------------------------------------------
    def set_vcpus(self, body: SetVcpus) -> VmResult:
        ref = body.vm
        with self._changing(ref.uuid):
            status = self._existing(ref)
            if body.vcpus > status.max_vcpus:
                raise InvalidRequest(
                    f"VM {ref.name} can have at most {status.max_vcpus} vCPUs (its max vCPUs, fixed when it was "
                    "created)"
                )
            running = status.state in ACTIVE_STATES
            if body.vcpus == status.vcpus:
                return VmResult(status=status, message=f"already {body.vcpus} vCPU(s)")
            if running and body.vcpus < status.vcpus:
                raise Unsupported(
                    f"VM {ref.name} is running: vCPUs can only be added live, not removed (QEMU's unplug needs "
                    "the guest and times out). Shut it down to lower its vCPUs"
                )
            self._hv.set_vcpus(ref.uuid, body.vcpus, live=running, config=status.persistent)
            log.info(
                "VM %s: %d -> %d vCPUs (%s)",
                ref.name,
                status.vcpus,
                body.vcpus,
                "live" if running else "config",
            )
            return VmResult(status=self._hv.status(ref.uuid), message=f"{body.vcpus} vCPU(s)")

    def set_memory(self, body: SetMemory) -> VmResult:
        ref = body.vm
        with self._changing(ref.uuid):
            status = self._existing(ref)
            if body.memory_mib > status.max_memory_mib:
                raise InvalidRequest(
                    f"cannot set the memory of VM {ref.name} higher than its max memory "
                    f"({status.max_memory_mib} MiB)"
                )
            running = status.state in ACTIVE_STATES
            if body.memory_mib == status.memory_mib:
                return VmResult(status=status, message=f"already {body.memory_mib} MiB")
            self._hv.set_memory(ref.uuid, body.memory_mib, live=running, config=status.persistent)
            status = self._hv.status(ref.uuid)
            if not running:
                return VmResult(status=status, message=f"{body.memory_mib} MiB at the next start")
            # libvirt updates a running domain's current memory only when QEMU's BALLOON_CHANGE
            # event arrives, a moment after setMemoryFlags returns: the reply states the target
            # that was set; `vm memstat` shows how far the guest has got.
            return VmResult(
                status=replace(status, memory_mib=body.memory_mib),
                message=f"balloon target {body.memory_mib} MiB (the guest's virtio_balloon driver hands the memory over)",
            )

    def memstat(self, body: VmAction) -> MemStat:
        status = self._existing(body.vm)
        if status.state not in ACTIVE_STATES:
            return MemStat(status=status, balloon_kib=None, stats={})
        stats = self._hv.memory_stats(body.vm.uuid)
        return MemStat(status=status, balloon_kib=stats.get("actual", status.memory_mib * 1024), stats=stats)

    # -- disks -----------------------------------------------------------------------------
    @staticmethod
    def _disk(parsed: ParsedDomain, target: str) -> ParsedDisk | None:
        return next((d for d in parsed.disks if d.target == target), None)

    def _views(self, ref: VmRef, live: bool, config: bool) -> list[tuple[str, ParsedDomain]]:
        views = []
        if config:
            views.append(("definition", self._config(ref)))
        if live:
            views.append(("running VM", self._live(ref)))
        return views

    def _found(
        self, ref: VmRef, live: bool, config: bool, pick: Callable[[ParsedDomain], T | None], missing: str
    ) -> dict[str, T]:
        """What ``pick`` finds in each view of the VM (see :meth:`_views`); NotFound in none."""
        found = {where: item for where, parsed in self._views(ref, live, config) if (item := pick(parsed))}
        if not found:
            raise NotFound(f"VM {ref.name} has {missing}")
        return found

    def disk_attach(self, body: DiskAttach) -> VmResult:
        ref, disk = body.vm, body.disk
        with self._changing(ref.uuid):
            status = self._existing(ref)
            live, config = self._scope(ref, status, body.live, body.config)
            if disk.device is not DiskDevice.DISK:
                raise InvalidRequest("only data disks can be attached (not CD-ROMs)")
            resolved = self._resolve_attach(ref, disk)
            pending = []
            for where, parsed in self._views(ref, live, config):
                present = self._disk(parsed, disk.target)
                if present is None:
                    pending.append(where)
                elif not (
                    present.path and resolved.path and disk_helpers.same_image(present.path, resolved.path)
                ):
                    raise Conflict(
                        f"VM {ref.name}: target {disk.target} is taken in its {where} by {present.path or 'an empty drive'}"
                    )
            if not pending:
                return VmResult(status=status, message=f"{disk.target} already attached", disks=(resolved,))
            if disk.source == "existing" and not body.allow_shared_disk and not disk.readonly:
                assert resolved.path is not None
                users = disk_helpers.disk_users(self._hv, resolved.path, exclude_uuid=ref.uuid)
                if users:
                    raise AlreadyExists(disk_helpers.in_use_message(resolved.path, users))
            created = []
            if disk.source == "new" and resolved.path is None:
                assert resolved.pool is not None and resolved.volume is not None
                path = self._hv.create_volume(resolved.pool, resolved.volume, disk.format, disk.size_gib)
                created.append(path)
                resolved = replace(resolved, path=path)
                # Recorded before the attach: a retry after a crash recognises the volume as ours.
                self._hv.set_owned_volumes(ref.uuid, (*self._hv.owned_volumes(ref.uuid), path))
            try:
                xml = build_disk_xml(resolved)
            except ValueError as exc:
                raise InvalidRequest(f"VM {ref.name}: {exc}") from exc
            try:
                self._hv.attach_device(
                    ref.uuid,
                    xml,
                    live=live and "running VM" in pending,
                    config=config and "definition" in pending,
                )
            except VirtfleetError:
                for path in created:
                    self._forget_volume(ref.uuid, path)
                raise
            log.info("VM %s: attached %s (%s)", ref.name, disk.target, resolved.path)
            return VmResult(
                status=self._hv.status(ref.uuid), message=f"attached {disk.target}", disks=(resolved,)
            )

    def _resolve_attach(self, ref: VmRef, disk: DiskSpec) -> DiskSpec:
        """The disk with pool, volume and path filled in (path None: a volume still to create)."""
        if disk.source == "existing":
            assert disk.path is not None
            self._storage.existing_disk(self._images, disk)
            return disk
        pool = disk.pool or self._hv.default_pool
        name = disk_helpers.volume_name(ref.name, disk.target, disk.format, disk.volume)
        self._storage.pool_volume(pool, self._hv.pool_path(pool), name, disk.format)
        path = self._hv.volume_path(pool, name)
        if path is not None and path not in self._hv.owned_volumes(ref.uuid):
            raise Conflict(
                f"volume {pool}/{name} exists already and does not belong to VM {ref.name} (kept from an earlier "
                "VM?); attach it with --path or delete it first"
            )
        return replace(disk, pool=pool, volume=name, path=path)

    def _forget_volume(self, uuid: str, path: str) -> None:
        try:
            self._hv.delete_volume_path(path)
            self._storage.formats.forget(path)
            self._hv.set_owned_volumes(uuid, tuple(p for p in self._hv.owned_volumes(uuid) if p != path))
        except VirtfleetError as exc:
            log.warning("could not remove volume %s after a failed attach: %s", path, exc.message)

    def disk_detach(self, body: DiskDetach) -> VmResult:
        ref = body.vm
        with self._changing(ref.uuid):
            status = self._existing(ref)
            live, config = self._scope(ref, status, body.live, body.config)
            found = self._found(
                ref, live, config, lambda parsed: self._disk(parsed, body.target), f"no disk {body.target}"
            )
            disk = next(iter(found.values()))
            owned = self._hv.owned_volumes(ref.uuid)
            if body.delete_volume:
                if disk.path is None or disk.path not in owned:
                    raise Conflict(
                        f"VM {ref.name}: {body.target} ({disk.path}) was not created by virtfleet for this VM; "
                        "it is never deleted, only detached"
                    )
                if status.state in ACTIVE_STATES and not (live and config):
                    raise Conflict(
                        f"VM {ref.name}: detach {body.target} from the running VM too before deleting it"
                    )
            self._hv.detach_device(
                ref.uuid, detach_disk_xml(disk), live="running VM" in found, config="definition" in found
            )
            message = f"detached {body.target}"
            deleted: tuple[str, ...] = ()
            if "running VM" in found and self._disk(self._live(ref), body.target) is not None:
                message += (
                    " from the definition; the guest has not released it yet (it goes at the next stop)"
                )
            elif body.delete_volume and disk.path is not None:
                self._hv.delete_volume_path(disk.path)
                self._storage.formats.forget(disk.path)
                self._hv.set_owned_volumes(ref.uuid, tuple(p for p in owned if p != disk.path))
                message += f" and deleted {disk.path}"
                deleted = (disk.path,)
            log.info("VM %s: %s", ref.name, message)
            return VmResult(status=self._hv.status(ref.uuid), message=message, deleted_volumes=deleted)

    def disk_resize(self, body: DiskResize) -> VmResult:
        ref = body.vm
        with self._changing(ref.uuid):
            status = self._existing(ref)
            running = status.state in ACTIVE_STATES
            parsed = self._live(ref) if running else self._config(ref)
            disk = self._disk(parsed, body.target)
            if disk is None or disk.device != "disk" or disk.path is None:
                raise NotFound(f"VM {ref.name} has no disk {body.target}")
            wanted = body.size_gib * GIB
            if running:
                current = self._hv.block_size(ref.uuid, body.target)
            else:
                confined = self._storage.existing(disk.path, f"disk {body.target}")
                if disk.format is not None:
                    self._storage.formats.record(confined.path, disk.format)
                current = self._storage.inspect(self._images, confined).virtual_size_bytes
            if wanted < current:
                raise InvalidRequest(
                    f"disk {body.target} of VM {ref.name} is {current / GIB:g} GiB; shrinking a disk loses data "
                    "and is not done"
                )
            if wanted == current:
                return VmResult(status=status, message=f"{body.target} is {body.size_gib} GiB already")
            if running:
                self._hv.block_resize(ref.uuid, body.target, wanted)
            else:
                self._images.resize(disk.path, self._storage.formats.format_of(disk.path), body.size_gib)
            log.info("VM %s: disk %s grown to %d GiB", ref.name, body.target, body.size_gib)
            return VmResult(
                status=self._hv.status(ref.uuid),
                message=f"{body.target} grown to {body.size_gib} GiB; grow the partition and filesystem in the guest",
            )

    # -- NICs ----------------------------------------------------------------------------
    @staticmethod
    def _nic(parsed: ParsedDomain, mac: str) -> ParsedNic | None:
        return next((n for n in parsed.nics if n.mac == mac), None)

    def _nic_list(self, ref: VmRef, status: VmStatus, message: str = "") -> NicList:
        parsed = self._live(ref) if status.state in ACTIVE_STATES else self._config(ref)
        return NicList(nics=_nic_rows(parsed), message=message)

    def nic_attach(self, body: NicAttach) -> NicList:
        ref, nic = body.vm, body.nic
        assert nic.mac is not None  # NicAttach guarantees it
        with self._changing(ref.uuid):
            status = self._existing(ref)
            live, config = self._scope(ref, status, body.live, body.config)
            pending = []
            for where, parsed in self._views(ref, live, config):
                present = self._nic(parsed, nic.mac)
                if present is None:
                    pending.append(where)
                elif present.source != nic.source or present.kind != nic.kind.value:
                    raise Conflict(
                        f"VM {ref.name}: MAC {nic.mac} is already on its interface to {present.kind} {present.source}"
                    )
            if not pending:
                return self._nic_list(ref, status, f"{nic.mac} already attached")
            if nic.kind is NicKind.NETWORK and not self._hv.network_exists(nic.source):
                raise NotFound(f"this host has no libvirt network {nic.source}")
            if nic.kind is NicKind.BRIDGE and not self._hv.bridge_exists(nic.source):
                raise NotFound(f"this host has no bridge {nic.source}")
            for uuid, name, xmls in self._hv.domain_xmls():
                if uuid.lower() == ref.uuid.lower():
                    continue
                for xml in xmls:
                    try:
                        if self._nic(parse_domain_xml(xml), nic.mac) is not None:
                            raise Conflict(f"MAC {nic.mac} is already used by VM {name} on this host")
                    except DomainXmlError:
                        continue
            self._hv.attach_device(
                ref.uuid,
                build_interface_xml(nic),
                live=live and "running VM" in pending,
                config=config and "definition" in pending,
            )
            log.info("VM %s: attached NIC %s to %s %s", ref.name, nic.mac, nic.kind.value, nic.source)
            return self._nic_list(ref, status, f"attached {nic.mac} to {nic.kind.value} {nic.source}")

    def nic_detach(self, body: NicDetach) -> NicList:
        ref = body.vm
        with self._changing(ref.uuid):
            status = self._existing(ref)
            live, config = self._scope(ref, status, body.live, body.config)
            found = self._found(
                ref,
                live,
                config,
                lambda parsed: self._nic(parsed, body.mac),
                f"no interface with MAC {body.mac}",
            )
            nic = next(iter(found.values()))
            self._hv.detach_device(
                ref.uuid, detach_interface_xml(nic), live="running VM" in found, config="definition" in found
            )
            message = f"detached {body.mac}"
            if "running VM" in found and self._nic(self._live(ref), body.mac) is not None:
                message += "; the guest has not released the device yet (it goes when the guest acknowledges)"
            return self._nic_list(ref, status, message)

    def nic_list(self, body: VmAction) -> NicList:
        status = self._existing(body.vm)
        return self._nic_list(body.vm, status)

    # -- images ------------------------------------------------------------------------
    def _image_path(self, image: ImageLocation) -> tuple[str, str | None]:
        """(path, pool or None) of an image location (not checked yet: see :attr:`_storage`)."""
        if image.path is not None:
            return image.path, None
        assert image.volume is not None
        pool = image.pool or self._hv.default_pool
        path = self._hv.volume_path(pool, image.volume)
        if path is None:
            path = f"{self._hv.pool_path(pool).rstrip('/')}/{image.volume}"
        return path, pool

    def image_create(self, body: ImageCreate) -> ImageInfo:
        path, pool = self._image_path(body.image)
        confined = self._storage.new(path, body.format)
        if (
            confined.kind is not FileKind.MISSING
            and self._storage.formats.get(confined.path) == body.format.value
        ):
            # A repeated create of the image it made: the same answer, nothing overwritten.
            existing = self._storage.inspect(self._images, confined)
            if existing.virtual_size_bytes == body.size_gib * GIB:
                return replace(existing, path=path)
        info = self._images.create(confined.path, body.format, body.size_gib)
        self._storage.formats.record(confined.path, body.format.value)
        if pool is not None:
            self._hv.refresh_pool(pool)
        return replace(info, path=path)

    def image_info(self, body: ImageInfoRequest) -> ImageInfo:
        path, _pool = self._image_path(body.image)
        info = self._storage.inspect(self._images, self._storage.existing(path))
        return replace(info, path=path)

    def image_convert(self, body: ImageConvert) -> ImageInfo:
        src, _ = self._image_path(body.source)
        dst, pool = self._image_path(body.dest)
        source = self._storage.existing(src)
        target = self._storage.new(dst, body.format)
        self._storage.inspect(self._images, source)  # refuses a chain leaving the pools
        info = self._images.convert(
            source.path, self._storage.formats.format_of(source.path), target.path, body.format
        )
        self._storage.formats.record(target.path, body.format.value)
        if pool is not None:
            self._hv.refresh_pool(pool)
        return replace(info, path=dst)


def _spec_from_request_xml(xml: str) -> VmSpec:
    try:
        return spec_from_xml(xml)
    except DomainXmlError as exc:
        raise InvalidRequest(f"not usable domain XML: {exc}") from exc
