"""Pure parsers of the /sys and /proc text the tuning module reads (unit-tested on captured text).

CPU lists use the kernel's format (``0-3,8-11``), a subset of libvirt's cpuset syntax, so they
are parsed by :func:`common.cpuset.parse_cpuset` (the one cpuset parser of the
project); the kernel writes an empty line for an empty list, which is the empty set here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from common.cpuset import parse_cpuset

__all__ = [
    "Selection",
    "cpu_list",
    "hugepage_dir_kib",
    "hugetlbfs_page_sizes",
    "meminfo",
    "qemu_uuid",
    "selection",
    "size_kib",
    "status_field",
    "topology_counts",
    "vcpu_of_thread",
]

_HUGEPAGE_DIR = re.compile(r"hugepages-([0-9]+)kB")
_VCPU_THREAD = re.compile(r"CPU ([0-9]+)/(?:KVM|TCG|HVF|WHPX)")
_SIZE = re.compile(r"([0-9]+)([KMGT]?)", re.IGNORECASE)
_SIZE_FACTOR_KIB = {"": 1 / 1024, "K": 1, "M": 1024, "G": 1024**2, "T": 1024**3}
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def cpu_list(text: str) -> frozenset[int]:
    """A kernel CPU list (``/sys/devices/system/cpu/online``, ``Cpus_allowed_list``); ``""`` is empty."""
    text = text.strip()
    return frozenset() if not text else parse_cpuset(text)


@dataclass(frozen=True, slots=True)
class Selection:
    """A sysfs choice file such as ``always [madvise] never``: the options and the selected one."""

    selected: str
    options: tuple[str, ...]


def selection(text: str) -> Selection:
    """Parse ``none [mq-deadline] kyber bfq`` -> selected ``mq-deadline``; a file with a single
    unbracketed word (``none`` on devices without a choice) selects that word."""
    options: list[str] = []
    selected = ""
    for raw in text.split():
        word = raw
        if raw.startswith("[") and raw.endswith("]"):
            word = raw[1:-1]
            selected = word
        options.append(word)
    if not selected and len(options) == 1:
        selected = options[0]
    return Selection(selected, tuple(options))


def meminfo(text: str) -> dict[str, int]:
    """``/proc/meminfo`` (or a node's meminfo) as ``{key: number}``; ``kB`` values stay in KiB.

    Node files prefix lines with ``Node 0``; the prefix is dropped.
    """
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, rest = line.partition(":")
        if not sep:
            continue
        key = re.sub(r"^Node [0-9]+ ", "", key.strip())
        fields = rest.split()
        if fields and fields[0].isdigit():
            out[key] = int(fields[0])
    return out


def hugepage_dir_kib(name: str) -> int | None:
    """``hugepages-2048kB`` -> 2048; None for anything else."""
    match = _HUGEPAGE_DIR.fullmatch(name)
    return int(match.group(1)) if match else None


def size_kib(text: str) -> int | None:
    """A mount option size (``2M``, ``1024M``, ``1G``) in KiB; None when unparsable."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        return None
    kib = int(match.group(1)) * _SIZE_FACTOR_KIB[match.group(2).upper()]
    return int(kib) if kib >= 1 else None


def hugetlbfs_page_sizes(mounts_text: str, default_kib: int) -> frozenset[int]:
    """Page sizes (KiB) that have a hugetlbfs mounted, from ``/proc/mounts``; a mount without
    ``pagesize=`` uses the default size."""
    sizes: set[int] = set()
    for line in mounts_text.splitlines():
        fields = line.split()
        if len(fields) < 4 or fields[2] != "hugetlbfs":
            continue
        size: int | None = default_kib
        for option in fields[3].split(","):
            if option.startswith("pagesize="):
                size = size_kib(option.removeprefix("pagesize="))
        if size:
            sizes.add(size)
    return frozenset(sizes)


def status_field(status_text: str, name: str) -> str | None:
    """One field of ``/proc/PID[/task/TID]/status``, e.g. ``Cpus_allowed_list`` -> ``"0-1"``."""
    for line in status_text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key == name:
            return value.strip()
    return None


def vcpu_of_thread(comm: str) -> int | None:
    """The vCPU a QEMU thread runs, from its name (``CPU 0/KVM``, ``CPU 3/TCG``); None otherwise.

    QEMU names its threads only with ``-name ...,debug-threads=on``, which libvirt always sets.
    """
    match = _VCPU_THREAD.fullmatch(comm.strip())
    return int(match.group(1)) if match else None


def qemu_uuid(cmdline: bytes) -> str | None:
    """The domain uuid of a QEMU process from ``/proc/PID/cmdline`` (NUL-separated argv).

    None when argv[0] is not a QEMU system emulator (``qemu-system-*``, ``qemu-kvm``) or there
    is no ``-uuid`` argument.
    """
    argv = [a.decode(errors="replace") for a in cmdline.split(b"\0") if a]
    if not argv:
        return None
    program = argv[0].rsplit("/", 1)[-1]
    if not (program.startswith("qemu-system-") or program == "qemu-kvm"):
        return None
    for index, arg in enumerate(argv[:-1]):
        if arg == "-uuid" and _UUID.fullmatch(argv[index + 1]):
            return argv[index + 1].lower()
    return None


def topology_counts(cpus: Mapping[int, tuple[int, int]]) -> tuple[int, int, int]:
    """(sockets, cores per socket, threads per core) from ``{cpu: (package id, core id)}``."""
    if not cpus:
        return (1, 1, 1)
    packages = {pkg for pkg, _core in cpus.values()}
    cores: dict[tuple[int, int], int] = {}
    for key in cpus.values():
        cores[key] = cores.get(key, 0) + 1
    sockets = len(packages)
    cores_per_socket = max(1, len(cores) // sockets)
    threads = max(cores.values())
    return (sockets, cores_per_socket, threads)


def even_cells(cpus: Iterable[int], cells: int) -> list[frozenset[int]]:
    """Split CPUs into ``cells`` contiguous blocks (a simulated host's NUMA layout)."""
    ordered = sorted(cpus)
    cells = max(1, cells)
    size, extra = divmod(len(ordered), cells)
    out: list[frozenset[int]] = []
    start = 0
    for cell in range(cells):
        end = start + size + (1 if cell < extra else 0)
        out.append(frozenset(ordered[start:end]))
        start = end
    return out
