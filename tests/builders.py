"""Test data with defaults, for the tests of several modules and tiers: VM specs.

Each builder takes the fields a test cares about as keywords, which replace the defaults; a module
whose tests share other values wraps it (``functools.partial``) with them.
"""

from __future__ import annotations

import uuid
from typing import Any

from common.messages.vm import DiskSpec, DomainType, VmSpec


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
