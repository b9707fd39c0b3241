"""What the full fuzz run found (docs/security.md, "Fuzzing"), kept as plain regression tests.

Each input crashed a handler (an InternalError reply and a "crashed (bug)" traceback) before its
field got bounds or a check; now the decoder refuses it with InvalidRequest, naming the field.
"""

from __future__ import annotations

from typing import Any

import pytest

from common import codec
from common.errors import InvalidRequest
from common.messages import api, host, network, placement, tuning, vm
from common.messages.descriptor import Op

FOUND: list[tuple[Op[Any, Any], dict[str, Any], str]] = [
    # OverflowError: Python int too large to convert to SQLite INTEGER
    (
        placement.API_HOSTGROUP_SET,
        {"name": "0", "cpu_ratio": None, "ram_ratio": None, "reserved_disk_gib": 2**63},
        "body.reserved_disk_gib",
    ),
    # the same, from an agent's report
    (host.HOST_VM_CHANGES, {"host_id": "", "started_at": 0.0, "seq": 2**63, "reported_at": 0.0}, "body.seq"),
    # ValueError: embedded null byte (the device name became a /sys path on the agent)
    (tuning.TUNING_IO_SCHEDULER, {"device": "\x00", "scheduler": ""}, "body"),
    # On PostgreSQL: DataError: PostgreSQL text fields cannot contain NUL (0x00) bytes
    (api.API_HOST_SHOW, {"host": "\x00"}, "body"),
    (api.API_VM_LIST, {"host": "\x00"}, "body"),
    (host.HOST_VM_CHANGES, {"host_id": "\x00", "started_at": 0.0, "seq": 0, "reported_at": 0.0}, "body"),
    # a NUL in a VM reference reached the controller in the agent's next host.vm_changes
    (vm.VM_RESUME, {"vm": {"uuid": "\x00", "name": "w"}}, "body.vm"),
    # ValueError: embedded null byte (the interface name became a /sys path)
    (network.NET_BRIDGE_CREATE, {"name": "\x00"}, "body"),
    # On PostgreSQL, found by the input-limits run: the lookup's DataError (now typed, but
    # logged with a traceback); every bounded string refuses NUL at decoding since
    (placement.API_HOST_CAPACITY, {"host": "\x00"}, "body.host"),
    # ValueError: inventory total/reserved must be >= 0 (the full run on the merged tree, 2026-12-04:
    # a signed report from a host's own login can still say anything about its size)
    (
        host.HOST_REPORT,
        {
            "host_id": "h0",
            "hostname": "",
            "agent_version": "",
            "hypervisor_type": "",
            "hypervisor_version": "",
            "libvirt_uri": "",
            "hw_virt": False,
            "cpu": {"cpus": 0},
            "memory_mib": -1,
            "memory_free_mib": 0,
            "storage": None,
            "networks": [],
            "bridges": [],
            "vms": [],
            "seq": 0,
            "started_at": 0.0,
            "reported_at": 0.0,
        },
        "body.memory_mib",
    ),
]


@pytest.mark.parametrize(("op", "body", "field"), FOUND, ids=[op.kind for op, _b, _f in FOUND])
def test_found_inputs_are_refused_at_decoding(op: Op[Any, Any], body: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        codec.from_wire(op.body, body, "body")
    assert refused.value.message.startswith(field)
