"""Test data with defaults, for the tests of several modules and tiers: VM specs and stored host records.

Each builder takes the fields a test cares about as keywords, which replace the defaults; a module
whose tests share other values wraps it (``functools.partial``) with them.
"""

from __future__ import annotations

import uuid
from typing import Any

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
