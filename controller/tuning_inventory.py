"""Pure: what a host's tuning facts mean for the scheduler (dedicated CPUs and hugepages).

From a :class:`~controller.db.repository.HostRecord` (the last :class:`HostTuningReport` of its
agent, as plain data, plus the allocations claimed on it):

* ``PCPU`` inventory: one per CPU of the agent's dedicated set, never overcommitted;
  ``free_pcpus`` = dedicated set minus the pCPUs claimed by VMs on the host; ``pcpu_numa``
  maps each dedicated CPU to its NUMA cell (so the scheduler's pick stays NUMA-local);
* ``VCPU`` inventory: the *shared* set's size (shared VMs only float over it), keeping the
  operator's ratio and reserve;
* ``HUGEPAGES_2M`` / ``HUGEPAGES_1G`` inventories: the kernel's pool of that size, where a
  hugetlbfs of that size is mounted (libvirt needs one), with the pages in use outside
  virtfleet's claims reserved.

Which pCPUs a VM holds is recorded as one allocation per CPU (resource ``PCPU:<id>``, amount
1) next to its ``PCPU`` count: allocations are written in the claim transaction after the
host's generation bump and dropped with every release, so the fresh host state of a claim's
re-check always sees the pCPUs claimed concurrently, and a pCPU is never given to two VMs.
The scheduler ignores these keys (they are not resource classes).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from common.cpuset import CpuSetSyntaxError, format_cpuset, parse_cpuset
from common.errors import InvalidRequest
from common.messages.tuning import page_size_label
from controller.db.repository import HostRecord
from controller.scheduler.model import FrozenMap, Inventory, ResourceClass

#: allocation resource naming one claimed pCPU: ``PCPU:7``
PCPU_KEY_PREFIX = "PCPU:"

HUGEPAGE_CLASSES: Mapping[int, ResourceClass] = {
    2048: ResourceClass.HUGEPAGES_2M,
    1048576: ResourceClass.HUGEPAGES_1G,
}


@lru_cache(maxsize=4096)
def cpus(text: str) -> frozenset[int]:
    """A cpuset string as reported (``""`` is the empty set); bad text counts as empty."""
    if not text or not text.strip():
        return frozenset()
    try:
        return parse_cpuset(text)
    except CpuSetSyntaxError:
        return frozenset()


def pcpu_allocations(pcpus: tuple[int, ...] | frozenset[int]) -> dict[str, int]:
    """The per-CPU allocation entries of a claim of ``pcpus``."""
    return {f"{PCPU_KEY_PREFIX}{cpu}": 1 for cpu in sorted(pcpus)}


def claimed_pcpus(used: Mapping[str, int]) -> frozenset[int]:
    """The pCPUs claimed on a host, from its summed allocations."""
    out = set()
    for key, amount in used.items():
        if key.startswith(PCPU_KEY_PREFIX) and amount > 0:
            suffix = key.removeprefix(PCPU_KEY_PREFIX)
            if suffix.isdigit():
                out.add(int(suffix))
    return frozenset(out)


def hugepage_class(size_kib: int) -> ResourceClass:
    try:
        return HUGEPAGE_CLASSES[size_kib]
    except KeyError:
        raise InvalidRequest(f"unsupported hugepage size {size_kib} KiB: use 2M or 1G") from None


def hugepages_needed(memory_mib: int, size_kib: int) -> int:
    """Pages of ``size_kib`` that back ``memory_mib``; the memory must be a whole number of pages
    (QEMU refuses a hugepage-backed RAM size that is not)."""
    memory_kib = memory_mib * 1024
    if memory_kib % size_kib:
        raise InvalidRequest(
            f"memory {memory_mib} MiB is not a multiple of the {page_size_label(size_kib)} page size"
        )
    return memory_kib // size_kib


def request_resources(
    vcpus: int, memory_mib: int, disk_gib: int, *, dedicated: bool, hugepage_size_kib: int | None
) -> dict[ResourceClass, int]:
    """What one VM claims: shared VMs ``VCPU``, dedicated ones ``PCPU`` (one per vCPU, never
    both); memory and disk; hugepages of its page size when it asks for hugepage backing."""
    out = {
        ResourceClass.PCPU if dedicated else ResourceClass.VCPU: vcpus,
        ResourceClass.MEMORY_MIB: memory_mib,
        ResourceClass.DISK_GIB: disk_gib,
    }
    if hugepage_size_kib is not None:
        out[hugepage_class(hugepage_size_kib)] = hugepages_needed(memory_mib, hugepage_size_kib)
    return out


@dataclass(frozen=True, slots=True)
class HostTuning:
    """The scheduler-relevant part of one host's tuning facts (empty when it reported none)."""

    known: bool = False
    dedicated: frozenset[int] = frozenset()
    shared: frozenset[int] = frozenset()
    claimed: frozenset[int] = frozenset()
    pcpu_numa: Mapping[int, int] = field(default_factory=FrozenMap)
    #: resource class -> (total pages, pages in use outside virtfleet's claims)
    hugepages: Mapping[ResourceClass, tuple[int, int]] = field(default_factory=FrozenMap)

    @property
    def free_pcpus(self) -> frozenset[int]:
        return self.dedicated - self.claimed

    def inventories(self, base: Mapping[ResourceClass, Inventory]) -> dict[ResourceClass, Inventory]:
        """``base`` (vCPU, memory, disk) with the tuning inventories added; unchanged when unknown."""
        out = dict(base)
        if not self.known:
            return out
        vcpu = base.get(ResourceClass.VCPU)
        if vcpu is not None and self.shared:
            total = len(self.shared)
            out[ResourceClass.VCPU] = Inventory.for_class(
                ResourceClass.VCPU,
                total,
                reserved=min(total, vcpu.reserved),
                allocation_ratio=vcpu.allocation_ratio,
                min_unit=vcpu.min_unit,
                max_unit=vcpu.max_unit,
                step_size=vcpu.step_size,
            )
        if self.dedicated:
            out[ResourceClass.PCPU] = Inventory.for_class(ResourceClass.PCPU, len(self.dedicated))
        for resource, (total, reserved) in self.hugepages.items():
            out[resource] = Inventory.for_class(resource, total, reserved=reserved)
        return out


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def host_tuning(facts: Any, used: Mapping[str, int]) -> HostTuning:
    """:class:`HostTuning` from plain report data (``HostRecord.tuning``) and the host's usage."""
    if not isinstance(facts, Mapping):
        return HostTuning()
    dedicated = cpus(str(facts.get("dedicated_cpus") or ""))
    numa: dict[int, int] = {}
    for cell in facts.get("cells") or ():
        if isinstance(cell, Mapping):
            for cpu in cpus(str(cell.get("cpus") or "")) & dedicated:
                numa[cpu] = _int(cell.get("id"))
    pages: dict[ResourceClass, tuple[int, int]] = {}
    for pool in facts.get("hugepages") or ():
        if not isinstance(pool, Mapping) or not pool.get("mounted"):
            continue  # without a hugetlbfs of that size libvirt cannot back a guest with it
        resource = HUGEPAGE_CLASSES.get(_int(pool.get("size_kib")))
        if resource is None:
            continue
        total = _int(pool.get("total"))
        available = max(0, _int(pool.get("free")) - _int(pool.get("reserved")))
        in_use = max(0, total - available)
        outside = max(0, min(total, in_use - used.get(str(resource), 0)))
        pages[resource] = (total, outside)
    return HostTuning(
        known=True,
        dedicated=dedicated,
        shared=cpus(str(facts.get("shared_cpus") or "")),
        claimed=claimed_pcpus(used),
        pcpu_numa=FrozenMap(numa),
        hugepages=FrozenMap(pages),
    )


def from_record(record: HostRecord) -> HostTuning:
    return host_tuning(record.tuning, record.used)


def shared_cpuset(record: HostRecord) -> str | None:
    """The host's shared CPU set as a cpuset string, None when the host reported no tuning facts."""
    tuning = from_record(record)
    return format_cpuset(tuning.shared) if tuning.known and tuning.shared else None


def emulator_cpuset(record: HostRecord, *, dedicated: bool) -> str | None:
    """Where a VM's emulator threads (and a shared VM's vCPUs) go: the host's shared set.

    None (no pinning at all, as before tuning existed) for a shared VM on a host whose shared
    set is every online CPU, and for hosts that reported no tuning facts.
    """
    tuning = from_record(record)
    if not tuning.known or not tuning.shared:
        return None
    if not dedicated and isinstance(record.tuning, Mapping):
        online = cpus(str(record.tuning.get("online_cpus") or ""))
        if tuning.shared == online:
            return None
    return format_cpuset(tuning.shared)


def vm_allowance(record: HostRecord, cpu_policy: str, pcpus: tuple[int, ...]) -> frozenset[int]:
    """CPUs a VM's vCPUs may be re-pinned to: its own pCPUs (dedicated) or the shared set."""
    if cpu_policy == "dedicated":
        return frozenset(pcpus)
    return from_record(record).shared
