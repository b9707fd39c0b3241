"""Test data with defaults, for the tests of several modules and tiers: VM specs, stored host records,
host reports, and a QEMU process in a simulated /proc.

Each builder takes the fields a test cares about as keywords, which replace the defaults; a module
whose tests share other values wraps it (``functools.partial``) with them.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from common.messages.host import CpuTopology, HostReport
from common.messages.vm import DiskSpec, DomainType, VmSpec
from controller.db.repository import HostRecord


def vm_spec(name: str = "web1", **fields: Any) -> VmSpec:
    """A spec for libvirt's test driver (domain type ``test``) with a fresh UUID, 2 vCPUs, 1 GiB and a
    new 10 GiB disk ``vda``."""
    values: dict[str, Any] = {
        "uuid": str(uuid.uuid4()),
        "name": name,
        "vcpus": 2,
        "memory_mib": 1024,
        "domain_type": DomainType.TEST,
        "disks": (DiskSpec(target="vda", size_gib=10),),
    }
    return VmSpec(**(values | fields))


def host_record(host_id: str = "h1", **fields: Any) -> HostRecord:
    """A stored host, enabled, last heard of at 100.0: 8 CPUs in one NUMA cell, 16 GiB (16000 MiB
    free), 500 GiB of disk, no networks, bridges or VMs, nothing used and no overcommit of its own."""
    values: dict[str, Any] = {
        "id": host_id,
        "hostname": host_id,
        "enabled": True,
        "maintenance": False,
        "hypervisor_type": "QEMU",
        "hypervisor_version": "7.2.0",
        "libvirt_uri": "qemu:///system",
        "hw_virt": True,
        "cpus": 8,
        "numa_cells": 1,
        "memory_mib": 16384,
        "memory_free_mib": 16000,
        "disk_gib": 500,
        "disk_free_gib": 500,
        "networks": (),
        "bridges": (),
        "reported_vms": (),
        "cpu_ratio": None,
        "ram_ratio": None,
        "disk_ratio": None,
        "reserved_memory_mib": None,
        "reserved_cpus": None,
        "reserved_disk_gib": None,
        "max_vms": None,
        "generation": 1,
        "last_heartbeat": 100.0,
        "last_report": 100.0,
        "used": {},
        "vm_count": 0,
    }
    return HostRecord(**(values | fields))


def host_report(host_id: str = "h1", **fields: Any) -> HostReport:
    """The first report (seq 1, sent at 0.0) of a host on libvirt's test driver: 8 CPUs, 16 GiB all
    free, no storage pool, networks, bridges or VMs."""
    values: dict[str, Any] = {
        "host_id": host_id,
        "hostname": host_id,
        "agent_version": "test",
        "hypervisor_type": "TEST",
        "hypervisor_version": "1.0.0",
        "libvirt_uri": "test:///default",
        "hw_virt": True,
        "cpu": CpuTopology(cpus=8),
        "memory_mib": 16384,
        "memory_free_mib": 16384,
        "storage": None,
        "networks": (),
        "bridges": (),
        "vms": (),
        "seq": 1,
        "started_at": 0.0,
        "reported_at": 0.0,
    }
    return HostReport(**(values | fields))


def qemu_process(
    root: Path, pid: int, vm_uuid: str, accel: str = "KVM", *, libvirt_name: str | None = None
) -> Path:
    """A QEMU process of ``vm_uuid`` in the simulated /proc under ``root`` (what ``-uuid`` on its command
    line and its thread names look like): a main thread ``pid`` and the vCPU thread ``pid + 1``
    (``CPU 0/<accel>``), both allowed on CPUs 0-7. With ``libvirt_name`` libvirt's record of the
    domain's PID is written too (``run/libvirt/qemu/<name>.pid``); without it the process only
    claims the uuid, as anyone's process could. Returns its /proc directory."""
    if libvirt_name is not None:
        run = root / "run" / "libvirt" / "qemu"
        run.mkdir(parents=True, exist_ok=True)
        (run / f"{libvirt_name}.pid").write_text(f"{pid}\n")
    proc = root / "proc" / str(pid)
    proc.mkdir(parents=True)
    (proc / "cmdline").write_bytes(b"/usr/bin/qemu-system-x86_64\0-uuid\0" + vm_uuid.encode() + b"\0")
    for tid, name in ((pid, "qemu-system-x86"), (pid + 1, f"CPU 0/{accel}")):
        task = proc / "task" / str(tid)
        task.mkdir(parents=True)
        (task / "comm").write_text(name + "\n")
        (task / "status").write_text(f"Name:\t{name}\nCpus_allowed_list:\t0-7\n")
    return proc
