"""Thin readers and writers of the kernel's tuning files, under an injectable root.

:class:`HostKernel` reads ``<root>/sys`` and ``<root>/proc`` and writes the few tunables
virtfleet changes (hugepage pools, THP, IO schedulers, thread affinity). On a real host the root
is ``/``. A simulated host (libvirt's test driver) and the unit tests use a directory tree of
plain files instead, with ``emulate=True``: writes then also do what the kernel would do (a
scheduler file shows ``none [mq-deadline]`` after ``mq-deadline`` was written, a bigger hugepage
pool has more free pages, a thread's ``Cpus_allowed_list`` changes), so the same reading code
serves all three. :func:`seed_simulated_root` builds such a tree for a simulated host.

Every failure is raised as a virtfleet error: a missing file is :class:`Unsupported` (the
kernel has no such feature) or :class:`NotFound` (no such device or process), a refused write
is :class:`HypervisorError` with the errno.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

from agent.tuning import parse
from common import cpuset
from common.errors import HypervisorError, InvalidRequest, NotFound, Unsupported
from common.messages.tuning import BlockDevice, HugepagePool, NumaCell, ThreadAffinity

_CPU_DIR = re.compile(r"cpu([0-9]+)")
_NODE_DIR = re.compile(r"node([0-9]+)")
_THP_FILES = ("enabled", "defrag")


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def _read_int(path: Path, default: int = 0) -> int:
    try:
        return int(_read(path).strip() or default)
    except (OSError, ValueError):
        return default


def _selection_text(options: tuple[str, ...], selected: str) -> str:
    return " ".join(f"[{o}]" if o == selected else o for o in options) + "\n"


class HostKernel:
    """The kernel's CPU, memory and block tunables under ``root`` (``/`` on a real host)."""

    def __init__(
        self,
        root: Path = Path("/"),
        *,
        emulate: bool = False,
        set_affinity: Callable[[int, frozenset[int]], None] | None = None,
    ) -> None:
        self.root = root
        self.emulate = emulate
        self._set_affinity: Callable[[int, frozenset[int]], None] = set_affinity or os.sched_setaffinity

    # -- paths --------------------------------------------------------------------------
    def _sys(self, *parts: str) -> Path:
        return self.root.joinpath("sys", *parts)

    def _proc(self, *parts: str) -> Path:
        return self.root.joinpath("proc", *parts)

    def _write(self, path: Path, value: str, what: str) -> None:
        try:
            with path.open("w", encoding="utf-8") as handle:
                handle.write(value)
        except FileNotFoundError:
            raise Unsupported(f"{what}: {path} does not exist on this host") from None
        except OSError as exc:
            raise HypervisorError(
                f"{what}: the kernel refused {value.strip()!r} in {path}: {exc.strerror or exc}",
                details={"errno": exc.errno, "path": str(path)},
            ) from None

    # -- CPUs and NUMA ------------------------------------------------------------------
    def online_cpus(self) -> frozenset[int]:
        try:
            return parse.cpu_list(_read(self._sys("devices", "system", "cpu", "online")))
        except OSError:
            return frozenset({0})

    def cpu_topology(self) -> dict[int, tuple[int, int]]:
        """``{cpu: (package id, core id)}`` for the online CPUs."""
        base = self._sys("devices", "system", "cpu")
        out: dict[int, tuple[int, int]] = {}
        for cpu in sorted(self.online_cpus()):
            topo = base / f"cpu{cpu}" / "topology"
            out[cpu] = (_read_int(topo / "physical_package_id"), _read_int(topo / "core_id", cpu))
        return out

    def meminfo(self) -> dict[str, int]:
        try:
            return parse.meminfo(_read(self._proc("meminfo")))
        except OSError:
            return {}

    def numa_cells(self) -> tuple[NumaCell, ...]:
        """NUMA nodes with CPUs and memory; one cell with every online CPU when sysfs has none."""
        base = self._sys("devices", "system", "node")
        cells: list[NumaCell] = []
        with contextlib.suppress(OSError):
            for entry in sorted(base.iterdir(), key=lambda p: p.name):
                match = _NODE_DIR.fullmatch(entry.name)
                if match is None:
                    continue
                try:
                    cpus = parse.cpu_list(_read(entry / "cpulist"))
                    memory_kib = parse.meminfo(_read(entry / "meminfo")).get("MemTotal", 0)
                except OSError:
                    continue
                cells.append(NumaCell(int(match.group(1)), cpuset.format_cpuset(cpus), memory_kib // 1024))
        if not cells:
            online = self.online_cpus()
            cells.append(NumaCell(0, cpuset.format_cpuset(online), self.meminfo().get("MemTotal", 0) // 1024))
        return tuple(sorted(cells, key=lambda c: c.id))

    # -- hugepages ----------------------------------------------------------------------
    def default_hugepage_kib(self) -> int:
        return self.meminfo().get("Hugepagesize", 0)

    def _pool_dir(self, size_kib: int) -> Path:
        return self._sys("kernel", "mm", "hugepages", f"hugepages-{size_kib}kB")

    def hugepage_pools(self) -> tuple[HugepagePool, ...]:
        base = self._sys("kernel", "mm", "hugepages")
        try:
            mounts = _read(self._proc("mounts"))
        except OSError:
            mounts = ""
        mounted = parse.hugetlbfs_page_sizes(mounts, self.default_hugepage_kib())
        pools = []
        with contextlib.suppress(OSError):
            for entry in base.iterdir():
                size = parse.hugepage_dir_kib(entry.name)
                if size is None:
                    continue
                pools.append(
                    HugepagePool(
                        size_kib=size,
                        total=_read_int(entry / "nr_hugepages"),
                        free=_read_int(entry / "free_hugepages"),
                        reserved=_read_int(entry / "resv_hugepages"),
                        surplus=_read_int(entry / "surplus_hugepages"),
                        mounted=size in mounted,
                    )
                )
        return tuple(sorted(pools, key=lambda p: p.size_kib))

    def hugepage_pool(self, size_kib: int) -> HugepagePool:
        for pool in self.hugepage_pools():
            if pool.size_kib == size_kib:
                return pool
        raise Unsupported(f"this host's kernel has no {size_kib} KiB hugepages")

    def set_hugepages(self, size_kib: int, count: int) -> None:
        """Ask the kernel for ``count`` pages of ``size_kib`` (it may get fewer; read the pool back)."""
        if count < 0:
            raise InvalidRequest(f"hugepage count must be 0 or more, got {count}")
        before = self.hugepage_pool(size_kib)
        directory = self._pool_dir(size_kib)
        self._write(directory / "nr_hugepages", f"{count}\n", f"hugepages {size_kib} KiB")
        if self.emulate:
            in_use = before.total - before.free
            total = max(count, in_use)
            self._write(directory / "nr_hugepages", f"{total}\n", "hugepages")
            self._write(directory / "free_hugepages", f"{total - in_use}\n", "hugepages")

    # -- transparent hugepages ----------------------------------------------------------
    def thp(self, which: str) -> parse.Selection:
        """``enabled`` or ``defrag`` of /sys/kernel/mm/transparent_hugepage."""
        if which not in _THP_FILES:
            raise InvalidRequest(f"THP setting must be one of {', '.join(_THP_FILES)}, got {which!r}")
        try:
            return parse.selection(_read(self._sys("kernel", "mm", "transparent_hugepage", which)))
        except OSError:
            return parse.Selection("", ())

    def set_thp(self, which: str, value: str) -> None:
        current = self.thp(which)
        if not current.options:
            raise Unsupported("this host's kernel has no transparent hugepages")
        if value not in current.options:
            raise InvalidRequest(f"THP {which} must be one of {', '.join(current.options)}, got {value!r}")
        path = self._sys("kernel", "mm", "transparent_hugepage", which)
        self._write(path, f"{value}\n", f"THP {which}")
        if self.emulate:
            self._write(path, _selection_text(current.options, value), f"THP {which}")

    # -- block devices ------------------------------------------------------------------
    def block_devices(self) -> tuple[BlockDevice, ...]:
        """Block devices that have an IO scheduler file, sorted by name."""
        devices = []
        with contextlib.suppress(OSError):
            for entry in self._sys("block").iterdir():
                device = self._block_device(entry.name)
                if device is not None:
                    devices.append(device)
        return tuple(sorted(devices, key=lambda d: d.name))

    def _block_device(self, name: str) -> BlockDevice | None:
        base = self._sys("block", name)
        try:
            chosen = parse.selection(_read(base / "queue" / "scheduler"))
        except OSError:
            return None
        return BlockDevice(
            name=name,
            scheduler=chosen.selected,
            available=chosen.options,
            rotational=_read_int(base / "queue" / "rotational") == 1,
            physical=(base / "device").exists(),
        )

    def block_device(self, name: str) -> BlockDevice:
        if "/" in name or name in {".", ".."}:
            raise InvalidRequest(f"invalid block device name {name!r}")
        device = self._block_device(name)
        if device is None:
            raise NotFound(f"no block device {name} with an IO scheduler on this host")
        return device

    def set_io_scheduler(self, name: str, scheduler: str) -> None:
        device = self.block_device(name)
        if scheduler not in device.available:
            raise InvalidRequest(
                f"{name} offers the IO schedulers {', '.join(device.available)}, not {scheduler!r}"
            )
        path = self._sys("block", name, "queue", "scheduler")
        self._write(path, f"{scheduler}\n", f"IO scheduler of {name}")
        if self.emulate:
            self._write(path, _selection_text(device.available, scheduler), f"IO scheduler of {name}")

    # -- processes and threads ----------------------------------------------------------
    def pids(self) -> Iterator[int]:
        with contextlib.suppress(OSError):
            for entry in self._proc().iterdir():
                if entry.name.isdigit():
                    yield int(entry.name)

    def libvirt_qemu_pid(self, domain_name: str) -> int | None:
        """The PID libvirt recorded for the QEMU process of a running domain
        (``/run/libvirt/qemu/<name>.pid``, root's, written by libvirtd); None when there is none.
        Unlike a ``-uuid`` match on command lines, no other user's process can claim it."""
        if not domain_name or "/" in domain_name or domain_name.startswith("."):
            return None
        path = self.root.joinpath("run", "libvirt", "qemu", f"{domain_name}.pid")
        try:
            text = path.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError):
            return None
        return int(text) if text.isdigit() else None

    def cmdline(self, pid: int) -> bytes:
        try:
            return self._proc(str(pid), "cmdline").read_bytes()
        except OSError:
            raise NotFound(f"no process {pid} on this host") from None

    def threads(self, pid: int) -> tuple[ThreadAffinity, ...]:
        """Every thread of ``pid`` with its name and allowed CPUs (``taskset -p`` of each TID)."""
        tasks = self._proc(str(pid), "task")
        out = []
        try:
            entries = sorted(int(e.name) for e in tasks.iterdir() if e.name.isdigit())
        except OSError:
            raise NotFound(f"no process {pid} on this host") from None
        for tid in entries:
            try:
                comm = _read(tasks / str(tid) / "comm").strip()
                allowed = parse.status_field(_read(tasks / str(tid) / "status"), "Cpus_allowed_list")
            except OSError:
                continue  # the thread ended while we looked
            cpus = parse.cpu_list(allowed or "")
            out.append(ThreadAffinity(tid, comm, cpuset.format_cpuset(cpus), parse.vcpu_of_thread(comm)))
        return tuple(out)

    def set_thread_affinity(self, tid: int, cpus: frozenset[int]) -> None:
        """``taskset -pc CPUS TID`` (sched_setaffinity); EINVAL when a cgroup forbids those CPUs."""
        if self.emulate:
            for status in self._proc().glob(f"*/task/{tid}/status"):
                lines = [
                    f"Cpus_allowed_list:\t{cpuset.format_cpuset(cpus)}"
                    if line.startswith("Cpus_allowed_list:")
                    else line
                    for line in _read(status).splitlines()
                ]
                self._write(status, "\n".join(lines) + "\n", f"affinity of thread {tid}")
                return
            raise NotFound(f"no thread {tid} on this host")
        try:
            self._set_affinity(tid, cpus)
        except ProcessLookupError:
            raise NotFound(f"thread {tid} ended") from None
        except OSError as exc:
            hint = (
                " (its cgroup cpuset does not allow those CPUs; libvirt's pinning sets that cgroup)"
                if exc.errno == errno.EINVAL
                else ""
            )
            raise HypervisorError(
                f"cannot set the affinity of thread {tid} to {cpuset.format_cpuset(cpus)}: "
                f"{exc.strerror or exc}{hint}",
                details={"errno": exc.errno, "tid": tid},
            ) from None


# ------------------------------------------------------------------------------ simulated hosts


def _write_if_absent(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.write_text(text, encoding="utf-8")


def seed_simulated_root(
    root: Path,
    *,
    cpus: int,
    cells: int,
    sockets: int,
    cores: int,
    threads: int,
    memory_mib: int,
) -> None:
    """A /sys and /proc tree for a simulated host of this shape (libvirt test driver hosts).

    The shape is libvirt's nodeinfo: ``cells`` NUMA nodes of ``sockets`` sockets of ``cores``
    cores of ``threads`` threads (``sockets`` is unused beyond that: CPUs are numbered
    thread-first, core by core, so package = core // cores).

    Topology files are rewritten on every call (they follow the node file); tunables (hugepage
    pools, THP, IO schedulers) are created once and then keep what was set, like a real host.
    """
    online = frozenset(range(max(1, cpus)))
    cpu_base = root / "sys" / "devices" / "system" / "cpu"
    cpu_base.mkdir(parents=True, exist_ok=True)
    (cpu_base / "online").write_text(cpuset.format_cpuset(online) + "\n", encoding="utf-8")
    per_core = max(1, threads)
    cores_per_package = max(1, cores)  # libvirt's nodeinfo: cores per socket, sockets per node
    for cpu in sorted(online):
        topo = cpu_base / f"cpu{cpu}" / "topology"
        topo.mkdir(parents=True, exist_ok=True)
        core = cpu // per_core
        (topo / "core_id").write_text(f"{core % cores_per_package}\n", encoding="utf-8")
        (topo / "physical_package_id").write_text(f"{core // cores_per_package}\n", encoding="utf-8")
    node_base = root / "sys" / "devices" / "system" / "node"
    node_base.mkdir(parents=True, exist_ok=True)
    for cell, cell_cpus in enumerate(parse.even_cells(online, cells)):
        node = node_base / f"node{cell}"
        node.mkdir(exist_ok=True)
        (node / "cpulist").write_text(cpuset.format_cpuset(cell_cpus) + "\n", encoding="utf-8")
        kib = memory_mib * 1024 // max(1, cells)
        (node / "meminfo").write_text(f"Node {cell} MemTotal:       {kib} kB\n", encoding="utf-8")
    (root / "proc").mkdir(parents=True, exist_ok=True)
    (root / "proc" / "meminfo").write_text(
        f"MemTotal:       {memory_mib * 1024} kB\nHugepagesize:       2048 kB\n", encoding="utf-8"
    )
    (root / "proc" / "mounts").write_text(
        "hugetlbfs /dev/hugepages hugetlbfs rw,relatime,pagesize=2M 0 0\n"
        "hugetlbfs /dev/hugepages1G hugetlbfs rw,relatime,pagesize=1024M 0 0\n",
        encoding="utf-8",
    )
    for size in (2048, 1048576):
        pool = root / "sys" / "kernel" / "mm" / "hugepages" / f"hugepages-{size}kB"
        for name in ("nr_hugepages", "free_hugepages", "resv_hugepages", "surplus_hugepages"):
            _write_if_absent(pool / name, "0\n")
    thp = root / "sys" / "kernel" / "mm" / "transparent_hugepage"
    _write_if_absent(thp / "enabled", "always [madvise] never\n")
    _write_if_absent(thp / "defrag", "always defer defer+madvise [madvise] never\n")
    vda = root / "sys" / "block" / "vda"
    _write_if_absent(vda / "queue" / "scheduler", "none [mq-deadline] kyber bfq\n")
    _write_if_absent(vda / "queue" / "rotational", "0\n")
    (vda / "device").mkdir(parents=True, exist_ok=True)
