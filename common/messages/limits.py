"""The bounds of message fields: one Annotated alias per kind of value.

Every integer, string and list an API body (and the command bodies the controller builds from
it) carries is declared with one of these, so that msgspec refuses an out-of-range value while
decoding, before any state changes, with ``InvalidRequest`` naming the field and the bound
(:func:`common.codec.from_wire`); docs/protocol.md prints the bounds (generated from these).

The bounds are chosen so that every real value passes (the largest hosts of today, with room)
while a typo or an attack is refused at the edge instead of reaching libvirt or the database.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from common.cpuset import MAX_CPU_ID

#: The largest signed 64-bit integer: what a SQL BIGINT column and the wire's int64 hold.
INT64_MAX = 2**63 - 1
#: Memory of one VM in MiB: 16 TiB (the largest VMs clouds sell have 12-24 TiB hosts).
MAX_MEMORY_MIB = 16 * 1024 * 1024
#: vCPUs of one VM (QEMU's q35 limit is 4096 with x2apic) and CPUs of one host.
MAX_VCPUS = 4096
#: One disk or a VM's total of disks in GiB: 1 PiB.
MAX_DISK_GIB = 1024 * 1024
#: Characters of a name (VM, host, network, group, pool, ...): the name rules allow 1-64.
MAX_NAME_CHARS = 64
#: Characters of an idempotency key: the width of its database column.
MAX_KEY_CHARS = 128
#: Characters of a path on a host (Linux PATH_MAX).
MAX_PATH_CHARS = 4096
#: Characters of a cpuset string (libvirt syntax): every other CPU of the largest host libvirt
#: knows (8192 ids of up to 5 digits and a comma) still fits.
MAX_CPUSET_CHARS = 64 * 1024
#: Characters of free text (a reason, a description, a kernel command line).
MAX_TEXT_CHARS = 4096
#: Characters of a short token (a MAC, a listen address, a machine type, a size such as "2M").
MAX_TOKEN_CHARS = 256
#: Items of a list in a request body (disks, NICs, pins, names).
MAX_ITEMS = 256
#: Disks of one VM (a virtio-scsi controller takes more, but no real VM has more than this).
MAX_DISKS = 64
#: NICs of one VM (a PCI bus has 32 slots).
MAX_NICS = 32
#: Characters of a libvirt domain XML document (an import): 1 MiB, far above any real domain.
MAX_XML_CHARS = 1024 * 1024
#: Seconds of a timeout a client may ask for: one day.
MAX_TIMEOUT_S = 86400.0

#: An integer the database can store (SQL BIGINT): a field that reaches a column is declared with
#: it, so that a bigger number is refused at decoding (InvalidRequest) instead of overflowing
#: in the driver (found by the fuzz run, docs/security.md "Fuzzing").
Int64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=INT64_MAX)]
#: A count or size that cannot be negative, within BIGINT.
Count = Annotated[int, msgspec.Meta(ge=0, le=INT64_MAX)]
MemoryMiB = Annotated[int, msgspec.Meta(ge=0, le=MAX_MEMORY_MIB)]
Vcpus = Annotated[int, msgspec.Meta(ge=0, le=MAX_VCPUS)]
DiskGiB = Annotated[int, msgspec.Meta(ge=0, le=MAX_DISK_GIB)]
#: A CPU number on a host (see common.cpuset.MAX_CPU_ID).
CpuId = Annotated[int, msgspec.Meta(ge=0, le=MAX_CPU_ID)]
#: A TCP port (0 lets libvirt choose; -1 is "autoport" in libvirt's XML).
Port = Annotated[int, msgspec.Meta(ge=-1, le=65535)]
#: A process id (Linux pid_max is at most 2^22).
Pid = Annotated[int, msgspec.Meta(ge=1, le=2**22)]
Seconds = Annotated[float, msgspec.Meta(ge=0.0, le=MAX_TIMEOUT_S)]

#: No string of a message holds NUL: no name, path or XML can, and PostgreSQL refuses it in
#: every text column (the fuzz run found it in lookups by host id).
NO_NUL = "^[^\x00]*$"

Name = Annotated[str, msgspec.Meta(max_length=MAX_NAME_CHARS, pattern=NO_NUL)]
Key = Annotated[str, msgspec.Meta(max_length=MAX_KEY_CHARS, pattern=NO_NUL)]
Path = Annotated[str, msgspec.Meta(max_length=MAX_PATH_CHARS, pattern=NO_NUL)]
CpuSetText = Annotated[str, msgspec.Meta(max_length=MAX_CPUSET_CHARS, pattern=NO_NUL)]
Text = Annotated[str, msgspec.Meta(max_length=MAX_TEXT_CHARS, pattern=NO_NUL)]
Token = Annotated[str, msgspec.Meta(max_length=MAX_TOKEN_CHARS, pattern=NO_NUL)]
Xml = Annotated[str, msgspec.Meta(max_length=MAX_XML_CHARS, pattern=NO_NUL)]

__all__ = [
    "INT64_MAX",
    "MAX_CPUSET_CHARS",
    "MAX_DISKS",
    "MAX_DISK_GIB",
    "MAX_ITEMS",
    "MAX_KEY_CHARS",
    "MAX_MEMORY_MIB",
    "MAX_NAME_CHARS",
    "MAX_NICS",
    "MAX_PATH_CHARS",
    "MAX_TEXT_CHARS",
    "MAX_TIMEOUT_S",
    "MAX_TOKEN_CHARS",
    "MAX_VCPUS",
    "MAX_XML_CHARS",
    "NO_NUL",
    "Count",
    "CpuId",
    "CpuSetText",
    "DiskGiB",
    "Int64",
    "Key",
    "MemoryMiB",
    "Name",
    "Path",
    "Pid",
    "Port",
    "Seconds",
    "Text",
    "Token",
    "Vcpus",
    "Xml",
]
