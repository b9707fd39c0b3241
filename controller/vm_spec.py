"""Pure: the VmSpec the controller sends to an agent, from an API create request and the host."""

from __future__ import annotations

from common.messages import api
from common.messages.vm import DiskFormat, DiskSpec, DomainType, VmSpec
from controller.db.repository import HostRecord


def domain_type_for(req: api.VmCreate, host: HostRecord) -> DomainType:
    """kvm where the host has hardware virtualisation, qemu (TCG) otherwise, test on test:///."""
    if req.domain_type is not None:
        return DomainType(req.domain_type)
    if host.hypervisor_type.lower() == "test":
        return DomainType.TEST
    return DomainType.KVM if host.hw_virt else DomainType.QEMU


def build_spec(req: api.VmCreate, vm_uuid: str, host: HostRecord, *, pcpus: tuple[int, ...] = ()) -> VmSpec:
    """The definition to build on ``host``; ``pcpus`` are the dedicated CPUs the scheduler picked."""
    return VmSpec(
        uuid=vm_uuid,
        name=req.name,
        vcpus=req.vcpus,
        memory_mib=req.memory_mib,
        domain_type=domain_type_for(req, host),
        disks=(DiskSpec(target="vda", source="new", format=DiskFormat.QCOW2, size_gib=req.disk_gib),),
    )
