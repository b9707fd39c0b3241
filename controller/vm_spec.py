"""Pure: the VmSpec the controller sends to an agent, from an API create request and the host.

Also the controller's naming decisions: disk targets (vda, vdb, ..., sda, hda) and generated MAC
addresses (52:54:00:xx:xx:xx, derived from the VM's uuid so a rebuild on another host, or a retried
NIC attach, gets the same one).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from common.errors import InvalidRequest
from common.messages import api
from common.messages.base import replace
from common.messages.tuning import page_size_kib
from common.messages.vm import (
    CpuTune,
    DiskBus,
    DiskDevice,
    DiskFormat,
    DiskSpec,
    DomainType,
    NicSpec,
    VcpuPin,
    VmSpec,
)
from controller.db.repository import HostRecord

#: QEMU/KVM's locally administered OUI, as virt-install and libvirt use it.
MAC_PREFIX = "52:54:00"
_BUS_PREFIX = {DiskBus.VIRTIO: "vd", DiskBus.SCSI: "sd", DiskBus.SATA: "sd", DiskBus.IDE: "hd"}
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def target_names(prefix: str) -> Iterable[str]:
    """vda .. vdz, vdaa .. vdzz: the order libvirt and virt-install name disks in."""
    yield from (prefix + a for a in _LETTERS)
    yield from (prefix + a + b for a in _LETTERS for b in _LETTERS)


def next_target(bus: DiskBus, taken: Iterable[str]) -> str:
    """The first free disk name on ``bus`` (SATA and SCSI share sdX, as in libvirt)."""
    used = set(taken)
    for name in target_names(_BUS_PREFIX[bus]):
        if name not in used:
            return name
    raise InvalidRequest(f"no free disk name left on the {bus.value} bus")


def assign_targets(disks: Iterable[DiskSpec]) -> tuple[DiskSpec, ...]:
    """Give every disk without a target the next free name on its bus; keep the given ones."""
    disks = tuple(disks)
    taken = {d.target for d in disks if d.target}
    out = []
    for disk in disks:
        if disk.target:
            out.append(disk)
            continue
        target = next_target(disk.bus, taken)
        taken.add(target)
        out.append(replace(disk, target=target))
    return tuple(out)


def generated_mac(vm_uuid: str, index: int, taken: Iterable[str] = ()) -> str:
    """A deterministic 52:54:00:xx:xx:xx for NIC ``index`` of a VM, avoiding the MACs in ``taken``."""
    used = {m.lower() for m in taken}
    for attempt in range(1000):
        digest = hashlib.sha256(f"{vm_uuid.lower()}/{index}/{attempt}".encode()).digest()
        mac = f"{MAC_PREFIX}:{digest[0]:02x}:{digest[1]:02x}:{digest[2]:02x}"
        if mac not in used:
            return mac
    raise InvalidRequest("could not generate a free MAC address")  # pragma: no cover - 1000 collisions


def with_macs(vm_uuid: str, nics: Iterable[NicSpec]) -> tuple[NicSpec, ...]:
    """Every NIC with a MAC: the given one, else a generated one distinct from the VM's others."""
    nics = tuple(nics)
    taken = [n.mac for n in nics if n.mac is not None]
    out = []
    for index, nic in enumerate(nics):
        if nic.mac is not None:
            out.append(nic)
            continue
        mac = generated_mac(vm_uuid, index, taken)
        taken.append(mac)
        out.append(replace(nic, mac=mac))
    return tuple(out)


def request_disks(req: api.VmCreate) -> tuple[DiskSpec, ...]:
    """The disks of a create request, targets assigned: the listed ones (or the legacy root disk) and the CD-ROM."""
    if req.disks:
        disks = list(req.disks)
    elif req.disk_gib:
        disks = [DiskSpec(target="vda", source="new", format=DiskFormat.QCOW2, size_gib=req.disk_gib)]
    else:
        disks = []
    if req.cdrom is not None:
        # IDE: every machine type boots from it, and libvirt adds no controller for it on i440fx.
        disks.append(
            DiskSpec(
                target="",
                source="existing",
                format=DiskFormat.RAW,
                path=req.cdrom,
                bus=DiskBus.IDE,
                device=DiskDevice.CDROM,
                readonly=True,
            )
        )
    return assign_targets(disks)


def domain_type_for(req: api.VmCreate, host: HostRecord) -> DomainType:
    """kvm where the host has hardware virtualisation, qemu (TCG) otherwise, test on test:///."""
    if req.domain_type is not None:
        return DomainType(req.domain_type)
    if host.hypervisor_type.lower() == "test":
        return DomainType.TEST
    return DomainType.KVM if host.hw_virt else DomainType.QEMU


def build_spec(
    req: api.VmCreate,
    vm_uuid: str,
    host: HostRecord,
    *,
    pcpus: tuple[int, ...] = (),
    emulator_cpuset: str | None = None,
) -> VmSpec:
    """The definition to build on ``host``; ``pcpus`` are the dedicated CPUs the scheduler picked.

    ``emulator_cpuset`` is the host's shared CPU set: a dedicated VM's emulator threads are pinned
    there (vCPU i to ``pcpus[i]``); a shared VM's vCPUs and emulator float over it.
    """
    cputune = None
    if pcpus:
        pins = tuple(VcpuPin(vcpu=i, cpuset=str(cpu)) for i, cpu in enumerate(pcpus))
        cputune = CpuTune(vcpu_pins=pins, emulator_cpuset=emulator_cpuset)
    return VmSpec(
        uuid=vm_uuid,
        name=req.name,
        vcpus=req.vcpus,
        memory_mib=req.memory_mib,
        max_vcpus=req.max_vcpus,
        max_memory_mib=req.max_memory_mib,
        domain_type=domain_type_for(req, host),
        machine=req.machine,
        disks=request_disks(req),
        nics=with_macs(vm_uuid, req.nics),
        graphics=req.graphics,
        kernel_boot=req.kernel_boot,
        autostart=req.autostart,
        serial_log=req.serial_log,
        # The operator's --cpuset wins for a shared VM; a dedicated VM is pinned instead.
        cpuset=None if pcpus else (req.cpuset or emulator_cpuset),
        cputune=cputune,
        hugepage_size_kib=page_size_kib(req.hugepage_size) if req.hugepage_size else None,
    )
