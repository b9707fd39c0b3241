"""A stateful, strict, in-memory hypervisor host: :class:`FakeHypervisor` and :class:`FakeImages`.

They implement :class:`agent.ports.Hypervisor` and :class:`agent.ports.Images` without libvirt,
root or QEMU, so the agent (handlers, reporter, tuning and network modules, see
:func:`build_fake_host`) runs fully in-process.

Whose behaviour is copied
    Where libvirt's test driver implements an operation, the fake does what the test driver does
    (same refusals, same libvirt error codes and messages, wrapped by the same action text as
    :class:`~agent.drivers.libvirt_driver.LibvirtHypervisor`, so the same virtfleet error types come
    out); ``tests/unit/test_fake_hypervisor.py`` runs the same scenarios against both. Where the test
    driver cannot (device hot-plug, block resize, live vCPU unplug, disk locks, missing disk files
    or networks at start), it does what libvirt + QEMU did on this project's hosts
    (``/work/shared/host-facts.md`` section 5): hot-plug needs ``<features><acpi/>``, a live vCPU
    unplug times out, a live disk detach may wait for the guest, a disk written by a running VM is
    locked.

Deliberately not modelled
    real guests (no console, no CPU time: ``cpu_time_ns`` stays 0, the balloon reaches its target at
    once), managed save, migration, NUMA placement and host memory limits (a start never fails for
    lack of memory, like QEMU with overcommit), storage pool types other than directories, inactive
    pools, image backing chains, the host's own files (:meth:`FakeHypervisor.path_exists` knows only
    the fake's file set, never the real disk), and free host memory (``free_memory_mib`` is 0, as on
    the test driver, so the reporter computes it from the running VMs).

Thread safety: one re-entrant lock per host (:attr:`FakeHypervisor.lock`), shared by the images
and by the network and pinning fakes built on the same host.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import threading
import time
import uuid as uuid_mod
import xml.etree.ElementTree as ET
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TypeVar

from agent.disks import OWNED_VOLUMES_NS as OWNED_VOLUMES_NS  # noqa: PLC0414 - re-exported
from agent.ports import (
    ACTIVE_STATES,
    GIB,
    Hypervisor,
    ImageFacts,
    Images,
    NodeFacts,
    grown_size,
    shutdown_timed_out,
)
from agent.storage_pools import FileKind, PathLookup
from common.cpuset import format_cpuset
from common.domain_xml import VF_NAMESPACE, DomainXmlError, ParsedDomain, parse_domain_xml
from common.errors import (
    AlreadyExists,
    HypervisorError,
    HypervisorUnavailable,
    InternalError,
    InvalidRequest,
    NotFound,
    StorageError,
    Unsupported,
    VirtfleetError,
)
from common.messages.host import CpuTopology, StoragePoolInfo
from common.messages.network import LibvirtNetworkInfo
from common.messages.vm import DiskFormat, PowerState, VmStatus
from common.messages.vmops import ImageInfo

_T = TypeVar("_T")

KIB = 1024
MIB = 1024**2

_TEST_NS = "http://libvirt.org/schemas/domain/test/1.0"
_PREFIXES = {VF_NAMESPACE: "vf", OWNED_VOLUMES_NS: "vfa", _TEST_NS: "test"}

# libvirt's error codes and error domains (virterror.h, stable public ABI). Spelled out so the
# fake needs no libvirt; tests/unit/test_fake_hypervisor.py pins them against the bindings.
VIR_ERR_INTERNAL_ERROR = 1
VIR_ERR_NO_SUPPORT = 3
VIR_ERR_INVALID_ARG = 8
VIR_ERR_OPERATION_FAILED = 9
VIR_ERR_XML_ERROR = 27
VIR_ERR_XML_DETAIL = 35
VIR_ERR_SYSTEM_ERROR = 38
VIR_ERR_NO_DOMAIN = 42
VIR_ERR_NO_NETWORK = 43
VIR_ERR_NO_STORAGE_POOL = 49
VIR_ERR_NO_STORAGE_VOL = 50
VIR_ERR_OPERATION_INVALID = 55
VIR_ERR_OPERATION_TIMEOUT = 68
VIR_ERR_NO_DOMAIN_SNAPSHOT = 72
VIR_ERR_OPERATION_UNSUPPORTED = 84
VIR_ERR_DEVICE_MISSING = 99
VIR_FROM_QEMU = 10
VIR_FROM_TEST = 12

#: The same classification as libvirt_driver.translate_error.
_NOT_FOUND_CODES = frozenset(
    {
        VIR_ERR_NO_DOMAIN,
        VIR_ERR_NO_STORAGE_POOL,
        VIR_ERR_NO_STORAGE_VOL,
        VIR_ERR_NO_NETWORK,
        VIR_ERR_NO_DOMAIN_SNAPSHOT,
    }
)
_UNSUPPORTED_CODES = frozenset({VIR_ERR_NO_SUPPORT, VIR_ERR_OPERATION_UNSUPPORTED})

_NOT_RUNNING = "Requested operation is not valid: domain is not running"
_TRANSIENT = "Requested operation is not valid: transient domains do not have any persistent config"
_STARTABLE = frozenset({PowerState.SHUTOFF, PowerState.CRASHED, PowerState.NOSTATE})
#: Port methods that change something: the ones :attr:`FakeHypervisor.calls` records.
MUTATING = frozenset(
    {
        "create_volume",
        "delete_volume",
        "delete_volume_path",
        "define",
        "set_owned_volumes",
        "start",
        "shutdown",
        "destroy",
        "reboot",
        "reset",
        "suspend",
        "resume",
        "undefine",
        "set_autostart",
        "mark_managed",
        "set_vcpus",
        "set_memory",
        "create_snapshot",
        "revert_snapshot",
        "delete_snapshot",
        "attach_device",
        "detach_device",
        "block_resize",
        "refresh_pool",
    }
)
_QCOW2_HEADER_BYTES = 196_608  # what `qemu-img info` shows as actual size of a fresh qcow2
_QCOW2_CLUSTER = 65_536


def libvirt_error(action: str, code: int, text: str, *, domain: int = VIR_FROM_TEST) -> VirtfleetError:
    """The virtfleet error LibvirtHypervisor raises for a libvirt error (see ``translate_error``)."""
    details = {"code": code, "domain": domain, "libvirt_message": text}
    if code in _NOT_FOUND_CODES:
        return NotFound(f"{action}: {text}", details=details)
    if code in _UNSUPPORTED_CODES:
        return Unsupported(f"{action}: {text}", details=details)
    return HypervisorError(f"{action}: {text}", details=details)


def _refuse_unless_active(dom: _Domain, action: str) -> None:
    """libvirt's refusal of ``action`` on a domain that is not running in any form."""
    if dom.state not in ACTIVE_STATES:
        raise libvirt_error(action, VIR_ERR_OPERATION_INVALID, _NOT_RUNNING)


# ------------------------------------------------------------------------------------------ XML helpers


def _parse_xml(text: str, what: str) -> ET.Element:
    """ElementTree of caller-supplied XML; ET.ParseError for malformed text."""
    if "<!ENTITY" in text or "<!DOCTYPE" in text:
        raise ET.ParseError(f"{what} must not contain a DOCTYPE or entity declarations")
    return ET.fromstring(text)  # noqa: S314 - entity declarations refused above; no external fetches


def _local(tag: str) -> tuple[str | None, str]:
    if tag.startswith("{"):
        uri, _, local = tag[1:].partition("}")
        return uri, local
    return None, tag


def _prefixed(elem: ET.Element, in_scope: dict[str, str], counter: Iterator[int]) -> ET.Element:
    """A copy of ``elem`` whose namespaced tags carry readable prefixes (``vf:instance``) instead of
    ElementTree's ``ns0``, declared where first used, like libvirt prints metadata. Spelling the
    prefix into the tag avoids ET.register_namespace, which is process-global state."""
    uri, local = _local(elem.tag)
    scope = in_scope
    attrs: dict[str, str] = {}
    tag = local
    if uri is not None:
        prefix = scope.get(uri)
        if prefix is None:
            prefix = _PREFIXES.get(uri) or f"ns{next(counter)}"
            scope = {**scope, uri: prefix}
            attrs[f"xmlns:{prefix}"] = uri
        tag = f"{prefix}:{local}"
    for key, value in elem.attrib.items():
        a_uri, a_local = _local(key)
        if a_uri is None:
            attrs[key] = value
            continue
        prefix = scope.get(a_uri)
        if prefix is None:
            prefix = _PREFIXES.get(a_uri) or f"ns{next(counter)}"
            scope = {**scope, a_uri: prefix}
            attrs[f"xmlns:{prefix}"] = a_uri
        attrs[f"{prefix}:{a_local}"] = value
    out = ET.Element(tag, attrs)
    out.text, out.tail = elem.text, elem.tail
    for child in elem:
        out.append(_prefixed(child, scope, counter))
    return out


def _render(root: ET.Element, *, secure: bool = True) -> str:
    """Pretty domain (or snapshot) XML; without ``secure`` the VNC passwords are left out, as libvirt does."""
    doc = _prefixed(root, {}, itertools.count())
    if not secure:
        for graphics in doc.iter("graphics"):
            graphics.attrib.pop("passwd", None)
    for elem in doc.iter():
        if elem.text is not None and not elem.text.strip():
            elem.text = None
        elem.tail = None
    ET.indent(doc, space="  ")
    return ET.tostring(doc, encoding="unicode") + "\n"


def _parsed(root: ET.Element) -> ParsedDomain:
    return parse_domain_xml(ET.tostring(root, encoding="unicode"))


def _child(parent: ET.Element, tag: str, *, after: Sequence[str] = ()) -> ET.Element:
    """``parent``'s ``tag`` child, created (after the last of ``after`` present) when missing."""
    found = parent.find(tag)
    if found is not None:
        return found
    elem = ET.Element(tag)
    index = 0
    for i, child in enumerate(parent):
        if child.tag in after:
            index = i + 1
    parent.insert(index, elem)
    return elem


def _set_current_vcpus(root: ET.Element, vcpus: int) -> None:
    vcpu = _child(root, "vcpu", after=("currentMemory", "memory"))
    maximum = int((vcpu.text or "1").strip())
    if vcpus < maximum:
        vcpu.set("current", str(vcpus))
    else:
        vcpu.attrib.pop("current", None)


def _set_current_memory(root: ET.Element, memory_mib: int) -> None:
    elem = _child(root, "currentMemory", after=("memory",))
    elem.set("unit", "KiB")
    elem.text = str(memory_mib * KIB)


def _devices(root: ET.Element) -> ET.Element:
    return _child(root, "devices", after=("on_crash", "on_reboot", "on_poweroff", "clock", "features", "os"))


def _insert_device(devices: ET.Element, device: ET.Element) -> None:
    """After the last device of the same kind (libvirt keeps disks first, then interfaces)."""
    order = ("disk", "controller", "interface")
    rank = order.index(device.tag) if device.tag in order else len(order)
    index = 0
    for i, child in enumerate(devices):
        if child.tag in order[: rank + 1]:
            index = i + 1
    devices.insert(index, device)


def _disk_target(elem: ET.Element) -> str | None:
    target = elem.find("target")
    return target.get("dev") if target is not None else None


def _disk_source(elem: ET.Element) -> str | None:
    source = elem.find("source")
    if source is None:
        return None
    return source.get("file") or source.get("dev") or None


def _nic_mac(elem: ET.Element) -> str | None:
    mac = elem.find("mac")
    address = mac.get("address") if mac is not None else None
    return address.lower() if address else None


def _nic_source(elem: ET.Element) -> tuple[str, str | None]:
    kind = elem.get("type", "")
    source = elem.find("source")
    return kind, (source.get(kind) if source is not None else None)


def _default_bus(target: str) -> str:
    if target.startswith("vd"):
        return "virtio"
    if target.startswith("hd"):
        return "ide"
    return "scsi"


# ------------------------------------------------------------------------------------------ storage


@dataclass
class FakeFile:
    """One image file of the fake host (what ``qemu-img info`` would show)."""

    format: str
    virtual_size: int
    actual_size: int = 0
    snapshots: list[str] = field(default_factory=list)  # internal qcow2 snapshots, by name
    backing: str | None = None  # qcow2 only: the backing file the header names
    backing_format: str | None = None


class FakeStorage:
    """The host's files and directories, shared by :class:`FakeHypervisor` and :class:`FakeImages`."""

    def __init__(self, lock: threading.RLock | None = None) -> None:
        self.lock = lock or threading.RLock()
        self.files: dict[str, FakeFile] = {}
        self.dirs: set[str] = {"/"}

    @staticmethod
    def norm(path: str) -> str:
        return str(PurePosixPath(path))

    def add_dir(self, path: str) -> None:
        """Create a directory and its parents."""
        with self.lock:
            p = PurePosixPath(path)
            self.dirs.update(str(d) for d in (p, *p.parents))

    def add_file(self, path: str, fmt: str, virtual_size: int, actual_size: int = 0) -> FakeFile:
        """Put an image file at ``path`` (its directory appears too); replaces nothing: AlreadyExists."""
        with self.lock:
            key = self.norm(path)
            if key in self.files:
                raise AlreadyExists(f"{path} exists already")
            self.add_dir(str(PurePosixPath(key).parent))
            made = FakeFile(fmt, virtual_size, actual_size)
            self.files[key] = made
            return made

    def get(self, path: str) -> FakeFile | None:
        with self.lock:
            return self.files.get(self.norm(path))

    def remove(self, path: str) -> bool:
        with self.lock:
            return self.files.pop(self.norm(path), None) is not None

    def exists(self, path: str) -> bool:
        with self.lock:
            key = self.norm(path)
            return key in self.files or key in self.dirs

    def is_dir(self, path: str) -> bool:
        with self.lock:
            return self.norm(path) in self.dirs

    def realpath(self, path: str) -> str:
        """:class:`agent.storage_pools.PathLookup`: the fake host has no symlinks."""
        return self.norm(path)

    def kind(self, path: str) -> FileKind:
        with self.lock:
            key = self.norm(path)
            if key in self.files:
                return FileKind.FILE
            return FileKind.DIRECTORY if key in self.dirs else FileKind.MISSING

    def in_dir(self, directory: str) -> dict[str, str]:
        """name -> path of the files directly in ``directory``."""
        with self.lock:
            d = PurePosixPath(directory)
            return {PurePosixPath(p).name: p for p in self.files if PurePosixPath(p).parent == d}


class FakeImages:
    """:class:`agent.ports.Images` over a :class:`FakeStorage`, with ``qemu-img``'s semantics as
    :class:`~agent.drivers.images.QemuImg` has them: never overwrite, grow only, and no writing to
    an image a running VM holds (``in_use``; reading with ``-U`` is fine)."""

    def __init__(self, storage: FakeStorage, in_use: Callable[[str], bool] | None = None) -> None:
        self.storage = storage
        self._in_use = in_use or (lambda _path: False)

    def _info(self, path: str, f: FakeFile, fmt: str | None = None) -> ImageInfo:
        fmt = fmt or f.format
        return ImageInfo(
            path=path,
            format=fmt,
            virtual_size_bytes=f.virtual_size if fmt == f.format else f.actual_size,
            actual_size_bytes=f.actual_size,
            cluster_size=_QCOW2_CLUSTER if fmt == "qcow2" else None,
            backing_file=f.backing if fmt == "qcow2" == f.format else None,
            snapshots=len(f.snapshots) if fmt == f.format else 0,
        )

    def inspect(self, path: str, fmt: str) -> ImageFacts:
        """NotFound when there is no such file. Read with another format than its own, a file is
        what qemu-img would make of its bytes: raw reads a qcow2 file as its bytes (no backing)."""
        with self.storage.lock:
            f = self.storage.get(path)
            if f is None:
                raise NotFound(f"image {path} does not exist on this host")
            info = self._info(path, f, fmt)
            if fmt not in (f.format, "raw"):
                raise StorageError(
                    f"qemu-img info {path}: Image is not in {fmt} format", details={"returncode": 1}
                )
            return ImageFacts(info, info.backing_file, f.backing_format if info.backing_file else None)

    def info(self, path: str, fmt: str | None = None) -> ImageInfo:
        """For tests: :meth:`inspect` with the file's own format unless ``fmt`` is given."""
        with self.storage.lock:
            f = self.storage.get(path)
            if f is None:
                raise NotFound(f"image {path} does not exist on this host")
            return self.inspect(path, fmt or f.format).info

    def create(self, path: str, fmt: DiskFormat, size_gib: int) -> ImageInfo:
        """Never overwrites: AlreadyExists when ``path`` exists."""
        with self.storage.lock:
            existing = self.storage.get(path)
            if existing is not None:
                raise AlreadyExists(
                    f"{path} exists already ({existing.format}, {existing.virtual_size // GIB} GiB); "
                    "virtfleet never overwrites an image"
                )
            if self.storage.exists(path):
                raise StorageError(f"cannot create {path}: Is a directory")
            if not self.storage.is_dir(str(PurePosixPath(path).parent)):
                raise NotFound(f"cannot create {path}: its directory does not exist")
            actual = _QCOW2_HEADER_BYTES if fmt is DiskFormat.QCOW2 else 0
            return self._info(path, self.storage.add_file(path, fmt.value, size_gib * GIB, actual))

    def _locked(self, path: str, what: str, lock: str) -> None:
        if self._in_use(path):
            raise StorageError(
                f"{what}: Failed to get {lock} lock (is a running VM using it?)", details={"returncode": 1}
            )

    def convert(self, src: str, src_fmt: str, dst: str, fmt: DiskFormat) -> ImageInfo:
        """AlreadyExists when ``dst`` exists."""
        with self.storage.lock:
            source = self.inspect(src, src_fmt).info
            if self.storage.exists(dst):
                raise AlreadyExists(f"{dst} exists already; virtfleet never overwrites an image")
            if not self.storage.is_dir(str(PurePosixPath(dst).parent)):
                raise NotFound(f"cannot convert to {dst}: its directory does not exist")
            self._locked(src, f"qemu-img convert {src} -> {dst}", 'shared "write"')
            made = self.storage.add_file(dst, fmt.value, source.virtual_size_bytes, source.actual_size_bytes)
            return self._info(dst, made)

    def resize(self, path: str, fmt: str, size_gib: int) -> ImageInfo:
        """Grow only."""
        with self.storage.lock:
            current = self.inspect(path, fmt).info
            wanted = grown_size(current, size_gib)
            if wanted is None:
                return current
            what = f"qemu-img resize {path}"
            self._locked(path, what, '"write"')
            f = self.storage.get(path)
            assert f is not None  # inspect() found it under the same lock
            if f.snapshots:
                raise StorageError(
                    f"{what}: Can't resize an image which has snapshots", details={"returncode": 1}
                )
            f.virtual_size = wanted
            return self._info(path, f)


# ------------------------------------------------------------------------------------------ host state


@dataclass
class _Pool:
    name: str
    path: str
    capacity: int
    volumes: dict[str, str] = field(default_factory=dict)  # name -> path, as libvirt last listed them


@dataclass
class _Snapshot:
    name: str
    description: str
    state: str  # running, paused, shutoff
    created: int
    parent: str | None
    memory: bool
    domain: ET.Element  # the definition in effect when it was taken (live when running)
    config: ET.Element | None  # the persistent definition at that time
    hotplugged: int  # vCPUs hot-added when it was taken: QEMU cannot load such a state


@dataclass
class _Domain:
    uuid: str
    persistent: ET.Element | None  # None: transient
    live: ET.Element | None = None  # None: not running
    state: PowerState = PowerState.SHUTOFF
    autostart: bool = False
    domid: int | None = None
    boot_vcpus: int = 0
    snapshots: dict[str, _Snapshot] = field(default_factory=dict)
    current_snapshot: str | None = None
    pending_release: list[ET.Element] = field(default_factory=list)

    @property
    def current(self) -> ET.Element:
        """The definition in effect: live while running, else the persistent one."""
        tree = self.live if self.live is not None else self.persistent
        assert tree is not None  # a domain is persistent or running (or both)
        return tree

    @property
    def name(self) -> str:
        return (self.current.findtext("name") or "").strip()


class FakeHypervisor:
    """:class:`agent.ports.Hypervisor` in memory: domains, storage pools and volumes, libvirt networks.

    Hooks for tests: :meth:`fail_next` (make a port method raise once), :attr:`ignore_acpi` (the guest
    ignores ACPI shutdown), :attr:`guest_acks_unplug` (False: a live detach waits for the guest, see
    :meth:`release_devices`), :attr:`calls` (the changing port calls, in order), :meth:`add_file`, :meth:`lose_libvirt` / :meth:`restore_libvirt` (a libvirtd restart).
    Lifecycle events as libvirt's (:meth:`watch_lifecycle`): a test that calls :meth:`destroy` or
    :meth:`start` itself acts as someone at the host's console, and the agent hears of it.
    """

    def __init__(
        self,
        host: str = "fake",
        *,
        cpus: int = 8,
        memory_mib: int = 16384,
        disk_gib: int = 200,
        networks: Iterable[str] = ("default",),
        bridges: Iterable[str] = (),
        hw_virt: bool = True,
        pool: str = "default",
        pool_path: str = "/var/lib/virtfleet/images",
        hypervisor_type: str = "QEMU",
        cpu_model: str = "x86_64",
        mhz: int = 2600,
        cells: int = 1,
        threads: int = 1,
        bridge_source: Callable[[], tuple[str, ...]] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """A host of ``cpus`` CPUs (``cells`` NUMA cells, ``threads`` per core), ``memory_mib`` of RAM,
        one directory pool ``pool`` of ``disk_gib`` at ``pool_path``, active NAT ``networks`` and the
        Linux ``bridges`` (or, with ``bridge_source``, whatever bridges that returns: a link driver's).

        ``hypervisor_type`` "QEMU" accepts domain types qemu and (with ``hw_virt``) kvm; "TEST"
        accepts every type, like libvirt's test driver.
        """
        self.lock = threading.RLock()
        self.storage = FakeStorage(self.lock)
        self.host = host
        self.hypervisor_type = hypervisor_type
        self._hw_virt = hw_virt
        self._pool_name = pool
        self._from = VIR_FROM_TEST if hypervisor_type.upper() == "TEST" else VIR_FROM_QEMU
        cells = max(1, cells)
        threads = max(1, threads)
        self.cpu = CpuTopology(
            cpus=cpus,
            sockets=cells,
            cores=max(1, cpus // (cells * threads)),
            threads=threads,
            numa_cells=cells,
            mhz=mhz,
            model=cpu_model,
        )
        self.memory_mib = memory_mib
        self._static_bridges = tuple(sorted(set(bridges)))
        self._bridge_source = bridge_source
        self._clock = clock
        self._domains: dict[str, _Domain] = {}
        self._pools: dict[str, _Pool] = {}
        self._networks: dict[str, LibvirtNetworkInfo] = {}
        self._failures: dict[str, deque[VirtfleetError]] = {}
        self._ids = itertools.count(1)
        self._macs = itertools.count(1)
        #: The changing port calls so far, by method name.
        self.calls: list[str] = []
        #: lifecycle-event callbacks (see :meth:`watch_lifecycle`)
        self._watchers: list[Callable[[str], None]] = []
        #: connection callbacks (see :meth:`watch_connection`)
        self._link_watchers: list[Callable[[str | None], None]] = []
        #: why libvirt is unreachable (:meth:`lose_libvirt`); None while connected
        self._lost: str | None = None
        #: True: ACPI shutdown does nothing (the guest has no ACPI button handling).
        self.ignore_acpi = False
        #: False: a live detach returns but the device stays until :meth:`release_devices` or a stop.
        self.guest_acks_unplug = True
        self.add_pool(pool, pool_path, disk_gib * GIB)
        for i, name in enumerate(networks):
            self.put_network(
                LibvirtNetworkInfo(
                    name=name,
                    active=True,
                    autostart=True,
                    forward_mode="nat",
                    bridge=f"virbr{i}",
                    address=f"192.168.{122 + i}.1/24",
                    uuid=str(uuid_mod.uuid5(uuid_mod.NAMESPACE_URL, f"{host}/network/{name}")),
                )
            )

    # -- construction from a libvirt test-driver node file ---------------------------------------
    @classmethod
    def from_node_xml(
        cls,
        node_xml: str | Path,
        *,
        host: str = "fake",
        hw_virt: bool = True,
        pool: str = "default",
        hypervisor_type: str = "TEST",
        bridge_source: Callable[[], tuple[str, ...]] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> FakeHypervisor:
        """A host shaped like a libvirt test-driver node file (``tests/fixtures/nodes/*.xml``): its CPUs,
        memory, networks, bridges (``<interface type='bridge'>``), directory pools with their
        ``<capacity>`` (100 GiB when absent, like the test driver) and domains (running unless
        ``<test:runstate>5</test:runstate>``)."""
        text = node_xml.read_text(encoding="utf-8") if isinstance(node_xml, Path) else node_xml
        root = _parse_xml(text, "node XML")
        cpu = root.find("cpu")

        def num(tag: str, default: int) -> int:
            value = (cpu.findtext(tag) if cpu is not None else None) or ""
            return int(value.strip()) if value.strip() else default

        nodes, sockets, cores, threads = (
            num("nodes", 1),
            num("sockets", 1),
            num("cores", 2),
            num("threads", 1),
        )
        cpus = num("active", nodes * sockets * cores * threads)
        memory_kib = int((root.findtext("memory") or str(16 * MIB)).strip())
        bridges = sorted(
            str(i.get("name"))
            for i in root.findall("interface")
            if i.get("type") == "bridge" and i.get("name")
        )
        hv = cls(
            host,
            cpus=cpus,
            memory_mib=memory_kib // KIB,
            networks=(),
            bridges=bridges,
            hw_virt=hw_virt,
            pool=pool,
            hypervisor_type=hypervisor_type,
            cpu_model=(cpu.findtext("model") if cpu is not None else None) or "x86_64",
            mhz=num("mhz", 2600),
            cells=nodes,
            threads=threads,
            bridge_source=bridge_source,
            clock=clock,
        )
        # Exactly the file's shape: the node's numbers, not the derived ones of the simple constructor.
        hv.cpu = CpuTopology(
            cpus=cpus,
            sockets=max(1, nodes) * sockets,
            cores=cores,
            threads=threads,
            numa_cells=max(1, nodes),
            mhz=num("mhz", 2600),
            model=hv.cpu.model,
        )
        hv._pools.clear()
        for elem in root.findall("pool"):
            capacity = elem.find("capacity")
            amount = (capacity.text or "").strip() if capacity is not None else ""
            size = 100 * GIB
            if capacity is not None and amount:
                factor = {
                    "bytes": 1,
                    "b": 1,
                    "KiB": KIB,
                    "K": KIB,
                    "MiB": MIB,
                    "M": MIB,
                    "GiB": GIB,
                    "G": GIB,
                }
                size = int(amount) * factor.get(capacity.get("unit", "bytes"), 1)
            hv.add_pool(
                (elem.findtext("name") or "").strip(), (elem.findtext("target/path") or "").strip(), size
            )
        for elem in root.findall("network"):
            bridge = elem.find("bridge")
            forward = elem.find("forward")
            ip = elem.find("ip")
            address = None
            if ip is not None and ip.get("address"):
                mask = ip.get("netmask")
                prefix = ip.get("prefix") or (
                    str(sum(bin(int(part)).count("1") for part in mask.split("."))) if mask else "24"
                )
                address = f"{ip.get('address')}/{prefix}"
            name = (elem.findtext("name") or "").strip()
            hv.put_network(
                LibvirtNetworkInfo(
                    name=name,
                    active=True,
                    forward_mode="isolated" if forward is None else forward.get("mode", "nat"),
                    bridge=bridge.get("name") if bridge is not None else None,
                    address=address,
                    uuid=(elem.findtext("uuid") or "").strip()
                    or str(uuid_mod.uuid5(uuid_mod.NAMESPACE_URL, f"{host}/network/{name}")),
                )
            )
        for elem in root.findall("domain"):
            runstate = elem.find(f"{{{_TEST_NS}}}runstate")
            if runstate is not None:
                elem.remove(runstate)
            uuid = hv.define(_render(elem))
            if runstate is None or (runstate.text or "").strip() != "5":
                # Running as the file says, like the test driver: no checks of images or bridges.
                hv._boot(hv._domains[uuid], f"cannot start VM {uuid}", check=False)
        hv.calls.clear()  # the file's domains are the host's starting point, not calls under test
        return hv

    # -- hooks -------------------------------------------------------------------------------------
    def fail_next(self, method: str, error: VirtfleetError) -> None:
        """Make the next call of port method ``method`` raise ``error`` (before it changes anything)."""
        if not callable(getattr(Hypervisor, method, None)):
            raise InvalidRequest(f"{method} is not a method of agent.ports.Hypervisor")
        with self.lock:
            self._failures.setdefault(method, deque()).append(error)

    def count(self, method: str) -> int:
        """How often the changing port method ``method`` was called."""
        with self.lock:
            return self.calls.count(method)

    def lose_libvirt(self, reason: str = "libvirtd closed the connection") -> None:
        """Act as a libvirtd that stopped: every port method raises HypervisorUnavailable, and
        lifecycle events are not delivered, until :meth:`restore_libvirt`. Domains keep their
        state (QEMU keeps running while libvirtd is away)."""
        with self.lock:
            self._lost = reason
            listeners = tuple(self._link_watchers)
        for changed in listeners:
            changed(reason)

    def restore_libvirt(self) -> None:
        """libvirtd is back: calls work again and :meth:`watch_connection` listeners hear None."""
        with self.lock:
            self._lost = None
            listeners = tuple(self._link_watchers)
        for changed in listeners:
            changed(None)

    def watch_connection(self, changed: Callable[[str | None], None]) -> Callable[[], None]:
        """``changed(reason)`` on :meth:`lose_libvirt`, ``changed(None)`` on :meth:`restore_libvirt`
        (called without the lock, like the link's thread calls it)."""
        with self.lock:
            self._link_watchers.append(changed)

        def unwatch() -> None:
            with self.lock:
                if changed in self._link_watchers:
                    self._link_watchers.remove(changed)

        return unwatch

    def _enter(self, method: str) -> None:
        """Record the call and raise an injected failure (or HypervisorUnavailable while libvirt
        is lost). Called with the lock held."""
        if self._lost is not None:
            raise HypervisorUnavailable(
                f"{method}: libvirt unreachable ({self._lost}); the agent is reconnecting",
                details={"reason": self._lost},
            )
        if method in MUTATING:
            self.calls.append(method)
        queue = self._failures.get(method)
        if queue:
            raise queue.popleft()

    def add_file(self, path: str, fmt: DiskFormat = DiskFormat.QCOW2, size_gib: int = 1) -> str:
        """Put an image file on the host outside any pool (an operator's image, an ISO)."""
        self.storage.add_file(path, fmt.value, size_gib * GIB)
        return path

    def add_pool(self, name: str, path: str, capacity_bytes: int) -> None:
        """Define and start a directory storage pool (it lists the files already in its directory)."""
        with self.lock:
            self.storage.add_dir(path)
            self._pools[name] = _Pool(name, path, capacity_bytes, dict(self.storage.in_dir(path)))

    def volumes(self) -> dict[tuple[str, str], str]:
        """(pool, volume name) -> path of every pool volume, for assertions."""
        with self.lock:
            return {(p.name, name): path for p in self._pools.values() for name, path in p.volumes.items()}

    def images(self) -> FakeImages:
        """qemu-img on this host's files, refusing to write to images a running VM holds."""
        return FakeImages(self.storage, self._path_in_use)

    def guest_powered_off(self, uuid: str) -> None:
        """The guest powered itself off (QEMU exited), not through libvirt: works while libvirt
        is lost, and its lifecycle event is then missed, as libvirtd's would be."""
        with self.lock:
            dom = self._get(uuid, f"VM {uuid}")
            self._stopped(dom)
            self._emit(dom.uuid)

    def release_devices(self, uuid: str) -> None:
        """The guest acknowledges the unplugs it was asked for (with :attr:`guest_acks_unplug` False)."""
        with self.lock:
            dom = self._get(uuid, f"VM {uuid}")
            if dom.live is not None:
                devices = _devices(dom.live)
                for elem in dom.pending_release:
                    if elem in list(devices):
                        devices.remove(elem)
            dom.pending_release.clear()

    # -- libvirt networks (used by agent.network.fake.FakeNetworks) ----------------------------------
    def network(self, name: str) -> LibvirtNetworkInfo | None:
        with self.lock:
            return self._networks.get(name)

    def network_infos(self) -> tuple[LibvirtNetworkInfo, ...]:
        with self.lock:
            return tuple(sorted(self._networks.values(), key=lambda n: n.name))

    def put_network(self, info: LibvirtNetworkInfo) -> None:
        with self.lock:
            self._networks[info.name] = info

    def drop_network(self, name: str) -> bool:
        with self.lock:
            return self._networks.pop(name, None) is not None

    def network_not_found(self, name: str) -> VirtfleetError:
        """What libvirt_errors(f"network {name}") makes of networkLookupByName's failure."""
        return libvirt_error(
            f"network {name}",
            VIR_ERR_NO_NETWORK,
            f"Network not found: no network with matching name '{name}'",
            domain=self._from,
        )

    # -- host --------------------------------------------------------------------------------------
    @property
    def default_pool(self) -> str:
        return self._pool_name

    def hw_virt(self) -> bool:
        with self.lock:
            self._enter("hw_virt")
            return self._hw_virt

    def _bridges(self) -> tuple[str, ...]:
        if self._bridge_source is not None:
            return tuple(sorted(self._bridge_source()))
        return self._static_bridges

    def _pool_info(self, pool: _Pool) -> StoragePoolInfo:
        allocation = sum(
            f.actual_size for p in pool.volumes.values() if (f := self.storage.get(p)) is not None
        )
        return StoragePoolInfo(
            name=pool.name,
            path=pool.path,
            capacity_gib=pool.capacity // GIB,
            allocation_gib=allocation // GIB,
            available_gib=max(0, pool.capacity - allocation) // GIB,
        )

    def node_facts(self) -> NodeFacts:
        with self.lock:
            self._enter("node_facts")
            pool = self._pools.get(self._pool_name)
            return NodeFacts(
                hostname=self.host,
                hypervisor_type=self.hypervisor_type,
                hypervisor_version="0.0.2" if self._from == VIR_FROM_TEST else "7.2.0",
                libvirt_version="9.0.0",
                cpu=self.cpu,
                memory_mib=self.memory_mib,
                free_memory_mib=0,
                storage=self._pool_info(pool) if pool is not None else None,
                networks=tuple(sorted(self._networks)),
                bridges=self._bridges(),
                hw_virt=self._hw_virt,
            )

    # -- storage -----------------------------------------------------------------------------------
    def _named(self, found: _T | None, kind: str, name: str, action: str, code: int) -> _T:
        """``found``, else libvirt's error ``code`` for no ``kind`` (storage pool, ...) named ``name``."""
        if found is None:
            text = f"{kind.capitalize()} not found: no {kind} with matching name '{name}'"
            raise libvirt_error(action, code, text, domain=self._from)
        return found

    def _pool(self, name: str) -> _Pool:
        return self._named(
            self._pools.get(name), "storage pool", name, f"storage pool {name}", VIR_ERR_NO_STORAGE_POOL
        )

    def volume_path(self, pool: str, name: str) -> str | None:
        with self.lock:
            self._enter("volume_path")
            return self._pool(pool).volumes.get(name)

    def create_volume(self, pool: str, name: str, fmt: DiskFormat, size_gib: int) -> str:
        with self.lock:
            self._enter("create_volume")
            p = self._pool(pool)
            existing = p.volumes.get(name)
            if existing is not None:
                return existing  # LibvirtHypervisor reuses a volume of that name, whatever its size
            action = f"cannot create volume {pool}/{name}"
            if "/" in name:
                raise libvirt_error(
                    action, VIR_ERR_INVALID_ARG, f"invalid argument: volume name '{name}' cannot contain '/'"
                )
            path = str(PurePosixPath(p.path) / name)
            if self.storage.exists(path):
                raise libvirt_error(action, VIR_ERR_SYSTEM_ERROR, f"cannot create path '{path}': File exists")
            # Allocation 0, as LibvirtHypervisor asks for it (and the test driver reports it).
            self.storage.add_file(path, fmt.value, size_gib * GIB, 0)
            p.volumes[name] = path
            return path

    def delete_volume(self, pool: str, name: str) -> bool:
        with self.lock:
            self._enter("delete_volume")
            p = self._pool(pool)
            path = p.volumes.pop(name, None)
            if path is None:
                return False
            self.storage.remove(path)
            return True

    def _volume_by_path(self, path: str) -> tuple[_Pool, str] | None:
        wanted = self.storage.norm(path)
        for p in self._pools.values():
            for name, vpath in p.volumes.items():
                if self.storage.norm(vpath) == wanted:
                    return p, name
        return None

    def delete_volume_path(self, path: str) -> bool:
        with self.lock:
            self._enter("delete_volume_path")
            found = self._volume_by_path(path)
            if found is None:
                return False
            p, name = found
            self.storage.remove(p.volumes.pop(name))
            return True

    def path_exists(self, path: str) -> bool:
        with self.lock:
            self._enter("path_exists")
            return self._volume_by_path(path) is not None or self.storage.exists(path)

    # -- domains -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _domain(self, method: str, uuid: str) -> Iterator[_Domain]:
        """The domain ``uuid``, under the lock, for the port method ``method`` (see :meth:`_enter`);
        a lifecycle event afterwards when its state changed or it went away (even on a failure)."""
        with self.lock:
            self._enter(method)
            dom = self._get(uuid, f"VM {uuid}")
            before = dom.state
            try:
                yield dom
            finally:
                if dom.state is not before or self._domains.get(dom.uuid) is not dom:
                    self._emit(dom.uuid)

    # -- lifecycle events (libvirt's VIR_DOMAIN_EVENT_ID_LIFECYCLE) ---------------------------------
    def watch_lifecycle(self, changed: Callable[[str], None]) -> Callable[[], None]:
        """Like libvirt's lifecycle events: ``changed(uuid)`` after a domain is defined, undefined,
        started, stopped, paused or resumed through any caller (the agent, or a test acting as
        someone at the host's console). Called synchronously, with :attr:`lock` held."""
        with self.lock:
            self._watchers.append(changed)

        def unwatch() -> None:
            with self.lock:
                if changed in self._watchers:
                    self._watchers.remove(changed)

        return unwatch

    def _emit(self, uuid: str) -> None:
        if self._lost is not None:
            return  # no connection, no events: the full report after the reconnect carries it
        for changed in tuple(self._watchers):
            changed(uuid)

    def _get(self, uuid: str, action: str) -> _Domain:
        try:
            key = str(uuid_mod.UUID(uuid))
        except ValueError:
            key = uuid
        dom = self._domains.get(key)
        if dom is None:
            raise libvirt_error(action, VIR_ERR_NO_DOMAIN, "Domain not found", domain=self._from)
        return dom

    def _by_name(self, name: str) -> _Domain | None:
        return next((d for d in self._domains.values() if d.name == name), None)

    def find(self, uuid: str) -> VmStatus | None:
        with self.lock:
            self._enter("find")
            try:
                return self._status(self._get(uuid, f"VM {uuid}"))
            except NotFound:
                return None

    def uuid_for_name(self, name: str) -> str | None:
        with self.lock:
            self._enter("uuid_for_name")
            dom = self._by_name(name)
            return dom.uuid if dom is not None else None

    def _accepts(self, domain_type: str) -> bool:
        if self._from == VIR_FROM_TEST:
            return True
        return domain_type == "qemu" or (domain_type == "kvm" and self._hw_virt)

    def define(self, xml: str) -> str:
        action = "cannot define the domain"
        with self.lock:
            self._enter("define")
            try:
                root = _parse_xml(xml, "domain XML")
            except ET.ParseError as exc:
                raise libvirt_error(action, VIR_ERR_XML_DETAIL, f"(domain_definition): {exc}") from None
            if root.tag != "domain":
                raise libvirt_error(
                    action,
                    VIR_ERR_XML_ERROR,
                    f"XML error: unexpected root element <{root.tag}>, expecting <domain>",
                )
            domain_type = root.get("type")
            if not domain_type:
                raise libvirt_error(
                    action, VIR_ERR_INTERNAL_ERROR, "internal error: missing domain type attribute"
                )
            arch = root.find("os/type")
            if not self._accepts(domain_type):
                raise libvirt_error(
                    action,
                    VIR_ERR_INVALID_ARG,
                    "invalid argument: could not find capabilities for "
                    f"arch={arch.get('arch', 'x86_64') if arch is not None else 'x86_64'} domaintype={domain_type}",
                )
            self._normalise(root)
            try:
                parsed = _parsed(root)
            except DomainXmlError as exc:
                raise libvirt_error(action, VIR_ERR_XML_ERROR, f"XML error: {exc}") from None
            other = self._by_name(parsed.name)
            if other is not None and other.uuid != parsed.uuid:
                raise libvirt_error(
                    action,
                    VIR_ERR_OPERATION_FAILED,
                    f"operation failed: domain '{parsed.name}' already exists with uuid {other.uuid}",
                )
            dom = self._domains.get(parsed.uuid)
            if dom is not None and dom.name != parsed.name:
                raise libvirt_error(
                    action,
                    VIR_ERR_OPERATION_FAILED,
                    f"operation failed: domain '{dom.name}' is already defined with uuid {parsed.uuid}",
                )
            if dom is None:
                self._domains[parsed.uuid] = _Domain(parsed.uuid, root)
            else:
                dom.persistent = root  # a running domain keeps its live definition until it stops
            self._emit(parsed.uuid)  # VIR_DOMAIN_EVENT_DEFINED (added or updated)
            return parsed.uuid

    def _normalise(self, root: ET.Element) -> None:
        """What libvirt does to a definition it parses: make up a uuid and missing MACs, and drop what
        only a running domain has (its id, tap names, automatic VNC ports), e.g. in a dumpxml."""
        root.attrib.pop("id", None)
        if root.find("uuid") is None:
            uuid_elem = ET.Element("uuid")
            uuid_elem.text = str(uuid_mod.uuid4())
            root.insert(1, uuid_elem)
        for vcpus in root.findall("vcpus"):
            root.remove(vcpus)
        devices = root.find("devices")
        if devices is None:
            return
        for nic in devices.findall("interface"):
            if _nic_mac(nic) is None:
                nic.insert(0, ET.Element("mac", {"address": self._new_mac()}))
            target = nic.find("target")
            if target is not None and (target.get("dev") or "").startswith("vnet"):
                nic.remove(target)
        for graphics in devices.findall("graphics"):
            if graphics.get("autoport") == "yes":
                graphics.set("port", "-1")

    def _new_mac(self) -> str:
        n = next(self._macs)
        return f"52:54:00:fa:{n >> 8 & 0xFF:02x}:{n & 0xFF:02x}"

    def _persistent(self, dom: _Domain, action: str) -> ET.Element:
        if dom.persistent is None:
            raise libvirt_error(action, VIR_ERR_OPERATION_INVALID, _TRANSIENT, domain=self._from)
        return dom.persistent

    def _set_metadata(self, root: ET.Element, namespace: str, elem: ET.Element) -> None:
        metadata = _child(root, "metadata", after=("uuid", "name", "title", "description"))
        for child in list(metadata):
            if _local(child.tag)[0] == namespace:
                metadata.remove(child)
        metadata.append(elem)

    def set_owned_volumes(self, uuid: str, paths: tuple[str, ...]) -> None:
        with self._domain("set_owned_volumes", uuid) as dom:
            root = self._persistent(dom, f"VM {uuid}: cannot record its volumes")
            volumes = ET.Element(f"{{{OWNED_VOLUMES_NS}}}volumes")
            for path in paths:
                ET.SubElement(volumes, f"{{{OWNED_VOLUMES_NS}}}volume", {"path": path})
            self._set_metadata(root, OWNED_VOLUMES_NS, volumes)

    def owned_volumes(self, uuid: str) -> tuple[str, ...]:
        with self._domain("owned_volumes", uuid) as dom:
            root = self._persistent(dom, f"VM {uuid}: cannot read its volumes")
            volumes = root.find(f"metadata/{{{OWNED_VOLUMES_NS}}}volumes")
            if volumes is None:
                return ()
            return tuple(p for v in volumes if (p := v.get("path")))

    def _path_in_use(self, path: str, exclude: str | None = None) -> bool:
        """A running domain (other than ``exclude``) writes to ``path``: QEMU holds its write lock."""
        with self.lock:
            wanted = self.storage.norm(path)
            for dom in self._domains.values():
                if dom.live is None or dom.uuid == exclude:
                    continue
                for disk in _devices(dom.live).findall("disk"):
                    source = _disk_source(disk)
                    if (
                        source is not None
                        and self.storage.norm(source) == wanted
                        and disk.get("device", "disk") == "disk"
                        and disk.find("readonly") is None
                        and disk.find("shareable") is None
                    ):
                        return True
            return False

    def _check_disk(self, disk: ET.Element, uuid: str, action: str) -> None:
        """QEMU must open the image: it must exist and no other running VM may write to it."""
        source = _disk_source(disk)
        if source is None or disk.get("type", "file") not in {"file", "block"}:
            return
        if not self.storage.exists(source) and self._volume_by_path(source) is None:
            raise libvirt_error(
                action,
                VIR_ERR_SYSTEM_ERROR,
                f"Cannot access storage file '{source}': No such file or directory",
                domain=self._from,
            )
        writes = disk.get("device", "disk") == "disk" and disk.find("readonly") is None
        if writes and disk.find("shareable") is None and self._path_in_use(source, exclude=uuid):
            raise libvirt_error(
                action,
                VIR_ERR_INTERNAL_ERROR,
                "internal error: process exited while connecting to monitor: "
                f'Failed to get "write" lock. Is another process using the image [{source}]?',
                domain=self._from,
            )

    def _check_nic(self, nic: ET.Element, action: str) -> None:
        """The NIC's network must be defined and active, its bridge must exist on the host."""
        kind, source = _nic_source(nic)
        if kind == "network" and source is not None:
            net = self._networks.get(source)
            if net is None:
                raise libvirt_error(
                    action, VIR_ERR_NO_NETWORK, f"Network not found: no network with matching name '{source}'"
                )
            if not net.active:
                raise libvirt_error(
                    action,
                    VIR_ERR_OPERATION_INVALID,
                    f"Requested operation is not valid: network '{source}' is not active",
                )
        active_bridges = {
            n.bridge for n in self._networks.values() if n.active and n.forward_mode != "bridge"
        }
        if kind == "bridge" and source is not None and source not in {*self._bridges(), *active_bridges}:
            raise libvirt_error(
                action, VIR_ERR_SYSTEM_ERROR, f"Cannot get interface MTU on '{source}': No such device"
            )

    def _tap(self, *booting: ET.Element) -> str:
        """A free tap name; ``booting`` are live definitions being built (their taps count too)."""
        live = [d.live for d in self._domains.values() if d.live is not None]
        used = {
            t.get("dev") for root in (*live, *booting) for t in _devices(root).findall("interface/target")
        }
        return next(f"vnet{i}" for i in itertools.count() if f"vnet{i}" not in used)

    def _vnc_port(self) -> int:
        used = {
            g.get("port")
            for d in self._domains.values()
            if d.live is not None
            for g in _devices(d.live).findall("graphics")
        }
        return next(p for p in itertools.count(5900) if str(p) not in used)

    def _boot(self, dom: _Domain, action: str, *, check: bool = True) -> None:
        """Make the live definition from the persistent one, as QEMU starts (checks first)."""
        root = self._persistent(dom, action)
        devices = _devices(root)
        if check:
            for disk in devices.findall("disk"):
                self._check_disk(disk, dom.uuid, action)
            for nic in devices.findall("interface"):
                self._check_nic(nic, action)
        live = copy.deepcopy(root)
        dom.domid = next(self._ids)
        live.set("id", str(dom.domid))
        live_devices = _devices(live)
        for nic in live_devices.findall("interface"):
            ET.SubElement(nic, "target", {"dev": self._tap(live)})
        for graphics in live_devices.findall("graphics"):
            if graphics.get("autoport") == "yes" or graphics.get("port") in (None, "-1"):
                graphics.set("port", str(self._vnc_port()))
        dom.live = live
        dom.boot_vcpus = _parsed(live).vcpus
        dom.state = PowerState.RUNNING

    def _stopped(self, dom: _Domain) -> None:
        """After power-off: a transient domain is gone; a persistent one is SHUTOFF."""
        dom.live = None
        dom.domid = None
        dom.pending_release.clear()
        dom.state = PowerState.SHUTOFF
        if dom.persistent is None:
            del self._domains[dom.uuid]

    def start(self, uuid: str) -> None:
        action = f"cannot start VM {uuid}"
        with self._domain("start", uuid) as dom:
            if dom.state not in _STARTABLE:
                raise libvirt_error(
                    action, VIR_ERR_INTERNAL_ERROR, f"internal error: Domain '{dom.name}' is already running"
                )
            self._boot(dom, action)

    def shutdown(self, uuid: str, timeout_s: float, force: bool) -> None:
        with self._domain("shutdown", uuid) as dom:
            if dom.state is PowerState.SHUTOFF:
                return
            _refuse_unless_active(dom, f"cannot shut down VM {uuid}")
            if not self.ignore_acpi:
                self._stopped(dom)
                return
            # The guest ignores ACPI: what LibvirtHypervisor does once timeout_s has passed (no waiting here).
            if force:
                self._stopped(dom)
                return
            raise shutdown_timed_out(uuid, timeout_s)

    def destroy(self, uuid: str) -> None:
        with self._domain("destroy", uuid) as dom:
            _refuse_unless_active(dom, f"cannot power off VM {uuid}")
            self._stopped(dom)

    def reboot(self, uuid: str) -> None:
        with self._domain("reboot", uuid) as dom:
            _refuse_unless_active(dom, f"cannot reboot VM {uuid}")
            dom.state = PowerState.RUNNING  # the test driver resumes a paused domain on reboot

    def reset(self, uuid: str) -> None:
        with self._domain("reset", uuid) as dom:
            _refuse_unless_active(dom, f"cannot reset VM {uuid}")
            # like QEMU's system_reset (and the test driver): the state is kept, a paused VM stays paused

    def suspend(self, uuid: str) -> None:
        self._pause_or_resume("suspend", uuid, PowerState.RUNNING, "running", PowerState.PAUSED)

    def resume(self, uuid: str) -> None:
        self._pause_or_resume("resume", uuid, PowerState.PAUSED, "paused", PowerState.RUNNING)

    def _pause_or_resume(
        self, method: str, uuid: str, was: PowerState, was_word: str, becomes: PowerState
    ) -> None:
        """``suspend`` / ``resume``: a domain in state ``was`` goes to ``becomes``; libvirt refuses any other."""
        with self._domain(method, uuid) as dom:
            if dom.state is not was:
                raise libvirt_error(
                    f"cannot {method} VM {uuid}",
                    VIR_ERR_INTERNAL_ERROR,
                    f"internal error: domain '{dom.name}' not {was_word}",
                )
            dom.state = becomes

    def undefine(self, uuid: str) -> None:
        with self.lock:
            self._enter("undefine")
            try:
                dom = self._get(uuid, f"VM {uuid}")
            except NotFound:
                return  # like LibvirtHypervisor: a transient domain vanished when it was powered off
            if dom.persistent is None:
                return
            # LibvirtHypervisor passes UNDEFINE_SNAPSHOTS_METADATA (and NVRAM, managed save): only
            # libvirt's records go; the internal snapshots stay inside the qcow2 files.
            dom.snapshots.clear()
            dom.current_snapshot = None
            dom.persistent = None  # the test driver keeps the autostart flag of the now transient domain
            if dom.live is None:
                del self._domains[dom.uuid]
            self._emit(dom.uuid)  # VIR_DOMAIN_EVENT_UNDEFINED

    def set_autostart(self, uuid: str, enabled: bool) -> None:
        with self._domain("set_autostart", uuid) as dom:
            dom.autostart = enabled

    def _status(self, dom: _Domain) -> VmStatus:
        try:
            parsed = _parsed(dom.current)
        except DomainXmlError as exc:  # pragma: no cover - define() refuses what cannot be parsed
            raise InternalError(f"fake domain {dom.uuid} has unreadable XML: {exc}") from exc
        return VmStatus(
            uuid=dom.uuid,
            name=parsed.name,
            state=dom.state,
            vcpus=parsed.vcpus,
            max_vcpus=max(parsed.max_vcpus, parsed.vcpus),
            memory_mib=parsed.memory_mib,
            max_memory_mib=parsed.max_memory_mib,
            cpu_time_ns=0,
            autostart=dom.autostart,
            persistent=dom.persistent is not None,
            managed=parsed.managed,
        )

    def status(self, uuid: str) -> VmStatus:
        with self._domain("status", uuid) as dom:
            return self._status(dom)

    def power(self, uuid: str) -> tuple[PowerState, bool]:
        with self._domain("power", uuid) as dom:
            return dom.state, dom.autostart

    def list_statuses(self) -> tuple[VmStatus, ...]:
        with self.lock:
            self._enter("list_statuses")
            return tuple(
                sorted((self._status(d) for d in self._domains.values()), key=lambda s: (s.name, s.uuid))
            )

    # -- whole definitions -------------------------------------------------------------------------
    def _live_view(self, dom: _Domain) -> ET.Element:
        """The live definition as libvirt + QEMU print it: with ``<vcpus>`` hot-plug state."""
        assert dom.live is not None
        view = copy.deepcopy(dom.live)
        parsed = _parsed(view)
        if parsed.max_vcpus > 1:
            vcpus = ET.Element("vcpus")
            for i in range(parsed.max_vcpus):
                attrs = {"id": str(i), "enabled": "yes" if i < parsed.vcpus else "no"}
                attrs["hotpluggable"] = "no" if i < dom.boot_vcpus else "yes"
                ET.SubElement(vcpus, "vcpu", attrs)
            index = list(view).index(_child(view, "vcpu", after=("currentMemory", "memory"))) + 1
            view.insert(index, vcpus)
        return view

    def _xml(self, dom: _Domain, *, live: bool, secure: bool) -> str:
        if live and dom.live is not None:
            return _render(self._live_view(dom), secure=secure)
        return _render(dom.persistent if dom.persistent is not None else dom.current, secure=secure)

    def domain_xml(self, uuid: str, *, live: bool, secure: bool = False) -> str:
        with self._domain("domain_xml", uuid) as dom:
            return self._xml(dom, live=live, secure=secure)

    def domain_xmls(self) -> tuple[tuple[str, str, tuple[str, ...]], ...]:
        with self.lock:
            self._enter("domain_xmls")
            out = []
            for dom in self._domains.values():
                xmls = [self._xml(dom, live=True, secure=False)]
                if dom.live is not None and dom.persistent is not None:
                    xmls.append(self._xml(dom, live=False, secure=False))
                out.append((dom.uuid, dom.name, tuple(xmls)))
            return tuple(out)

    def mark_managed(self, uuid: str) -> None:
        with self._domain("mark_managed", uuid) as dom:
            # Like setMetadata(AFFECT_CONFIG): the persistent definition only, not a running domain's.
            root = self._persistent(dom, f"VM {uuid}: cannot mark it as managed by virtfleet")
            instance = ET.Element(f"{{{VF_NAMESPACE}}}instance")
            ET.SubElement(instance, f"{{{VF_NAMESPACE}}}managed").text = "true"
            self._set_metadata(root, VF_NAMESPACE, instance)

    # -- live changes ------------------------------------------------------------------------------
    def _scopes(self, dom: _Domain, action: str, live: bool, config: bool) -> list[ET.Element]:
        """The definitions a LIVE/CONFIG change applies to (neither: the current one, like AFFECT_CURRENT)."""
        if not live and not config:
            live, config = dom.live is not None, dom.live is None
        trees = []
        if live:
            if dom.live is None:
                raise libvirt_error(action, VIR_ERR_OPERATION_INVALID, _NOT_RUNNING, domain=self._from)
            trees.append(dom.live)
        if config:
            trees.append(self._persistent(dom, action))
        return trees

    def set_vcpus(self, uuid: str, vcpus: int, *, live: bool, config: bool) -> None:
        action = f"cannot set the vCPUs of VM {uuid} to {vcpus}"
        with self._domain("set_vcpus", uuid) as dom:
            if vcpus == 0:
                raise libvirt_error(
                    action, VIR_ERR_INVALID_ARG, "nvcpus in virDomainSetVcpusFlags must not be zero"
                )
            # One scope at a time, in LibvirtHypervisor's order: a failed CONFIG leaves the LIVE change made.
            for scope_live in ([True] if live else []) + ([False] if config else []):
                (tree,) = self._scopes(dom, action, scope_live, not scope_live)
                parsed = _parsed(tree)
                if vcpus > parsed.max_vcpus:
                    raise libvirt_error(
                        action,
                        VIR_ERR_INVALID_ARG,
                        f"invalid argument: requested cpu amount exceeds maximum ({vcpus} > {parsed.max_vcpus})",
                    )
                if scope_live and vcpus < parsed.vcpus:
                    # QEMU asks the guest and gives up after 5 s (host-facts section 5); the test driver
                    # would allow it, but no real guest here ever acknowledges the unplug.
                    raise libvirt_error(
                        action,
                        VIR_ERR_OPERATION_TIMEOUT,
                        "Timed out during operation: vcpu unplug request timed out. Unplug result must be "
                        "manually inspected in the domain",
                        domain=VIR_FROM_QEMU,
                    )
                _set_current_vcpus(tree, vcpus)

    def set_memory(self, uuid: str, memory_mib: int, *, live: bool, config: bool) -> None:
        action = f"cannot set the memory of VM {uuid} to {memory_mib} MiB"
        with self._domain("set_memory", uuid) as dom:
            if memory_mib <= 0:
                raise libvirt_error(
                    action, VIR_ERR_INVALID_ARG, "memory in virDomainSetMemoryFlags must not be zero"
                )
            for scope_live in ([True] if live else []) + ([False] if config else []):
                (tree,) = self._scopes(dom, action, scope_live, not scope_live)
                if memory_mib > _parsed(tree).max_memory_mib:
                    raise libvirt_error(
                        action,
                        VIR_ERR_INVALID_ARG,
                        "invalid argument: cannot set memory higher than max memory",
                    )
                _set_current_memory(tree, memory_mib)

    def memory_stats(self, uuid: str) -> dict[str, int]:
        with self._domain("memory_stats", uuid) as dom:
            if dom.live is None:
                raise libvirt_error(
                    f"cannot read the memory statistics of VM {uuid}", VIR_ERR_OPERATION_INVALID, _NOT_RUNNING
                )
            kib = _parsed(dom.live).memory_mib * KIB
            # The keys and proportions the test driver reports; the balloon is at its target at once.
            return {
                "actual": kib,
                "swap_in": 0,
                "swap_out": 0,
                "major_fault": 0,
                "minor_fault": 0,
                "unused": kib // 2,
                "available": kib,
                "usable": kib // 2,
                "last_update": int(self._clock()),
                "disk_caches": kib // 8,
                "hugetlb_pgalloc": 0,
                "hugetlb_pgfail": 0,
                "rss": kib // 2,
            }

    # -- snapshots ---------------------------------------------------------------------------------
    def _snapshot_xml(self, snap: _Snapshot) -> str:
        root = ET.Element("domainsnapshot")
        ET.SubElement(root, "name").text = snap.name
        if snap.description:
            ET.SubElement(root, "description").text = snap.description
        ET.SubElement(root, "state").text = snap.state
        if snap.parent is not None:
            ET.SubElement(ET.SubElement(root, "parent"), "name").text = snap.parent
        ET.SubElement(root, "creationTime").text = str(snap.created)
        ET.SubElement(root, "memory", {"snapshot": "internal" if snap.memory else "no"})
        root.append(copy.deepcopy(snap.domain))
        return _render(root, secure=False)

    def _qcow2_disks(self, tree: ET.Element) -> list[FakeFile]:
        files = []
        for disk in _devices(tree).findall("disk"):
            source = _disk_source(disk)
            f = self.storage.get(source) if source is not None else None
            if f is not None and f.format == "qcow2" and disk.find("readonly") is None:
                files.append(f)
        return files

    def create_snapshot(self, uuid: str, xml: str) -> None:
        action = f"cannot snapshot VM {uuid}"
        with self._domain("create_snapshot", uuid) as dom:
            try:
                root = _parse_xml(xml, "snapshot XML")
            except ET.ParseError as exc:
                raise libvirt_error(action, VIR_ERR_XML_DETAIL, f"(domain_snapshot): {exc}") from None
            created = int(self._clock())
            name = (root.findtext("name") or "").strip() or str(created)
            if name in dom.snapshots:
                raise libvirt_error(
                    action, VIR_ERR_OPERATION_FAILED, f"operation failed: domain moment {name} already exists"
                )
            for disk in _devices(dom.current).findall("disk"):
                source = _disk_source(disk)
                f = self.storage.get(source) if source is not None else None
                if disk.find("readonly") is None and f is not None and f.format != "qcow2":
                    raise libvirt_error(
                        action,
                        VIR_ERR_OPERATION_UNSUPPORTED,
                        f"Operation not supported: internal snapshot for disk {_disk_target(disk)} unsupported "
                        f"for storage type {f.format}",
                        domain=VIR_FROM_QEMU,
                    )
            running = dom.live is not None
            snap = _Snapshot(
                name=name,
                description=root.findtext("description") or "",
                state=dom.state.value if running else PowerState.SHUTOFF.value,
                created=created,
                parent=dom.current_snapshot,
                memory=running,
                domain=copy.deepcopy(self._live_view(dom) if running else dom.current),
                config=copy.deepcopy(dom.persistent) if dom.persistent is not None else None,
                hotplugged=_parsed(self._live_view(dom)).hotplugged_vcpus if running else 0,
            )
            for f in self._qcow2_disks(dom.current):
                f.snapshots.append(name)
            dom.snapshots[name] = snap
            dom.current_snapshot = name

    def list_snapshots(self, uuid: str) -> tuple[tuple[str, bool], ...]:
        with self._domain("list_snapshots", uuid) as dom:
            return tuple(
                (self._snapshot_xml(s), s.name == dom.current_snapshot) for s in dom.snapshots.values()
            )

    def _snapshot(self, dom: _Domain, uuid: str, name: str) -> _Snapshot:
        action = f"VM {uuid}: snapshot {name}"
        return self._named(
            dom.snapshots.get(name), "domain snapshot", name, action, VIR_ERR_NO_DOMAIN_SNAPSHOT
        )

    def revert_snapshot(self, uuid: str, name: str) -> None:
        action = f"cannot revert VM {uuid} to snapshot {name}"
        with self._domain("revert_snapshot", uuid) as dom:
            snap = self._snapshot(dom, uuid, name)
            dom.live, dom.domid = None, None
            dom.pending_release.clear()
            dom.state = PowerState.SHUTOFF
            config = snap.config if snap.config is not None else snap.domain
            if dom.persistent is not None:
                dom.persistent = copy.deepcopy(config)
            dom.current_snapshot = name
            if not snap.memory:
                if dom.persistent is None:  # a transient domain cannot exist switched off
                    self._stopped(dom)
                return
            if snap.hotplugged:
                # QEMU 7.2 cannot load a state saved with hot-added vCPUs (host-facts section 5).
                self._stopped(dom)
                raise libvirt_error(
                    action,
                    VIR_ERR_INTERNAL_ERROR,
                    "internal error: unable to execute QEMU command 'loadvm': Unknown savevm section or "
                    "instance 'cpu_common' 1. Error -22 while loading VM state",
                    domain=VIR_FROM_QEMU,
                )
            live = copy.deepcopy(snap.domain)
            vcpus = live.find("vcpus")
            if vcpus is not None:
                live.remove(vcpus)
            dom.live = live
            dom.domid = next(self._ids)
            live.set("id", str(dom.domid))
            dom.boot_vcpus = _parsed(live).vcpus
            dom.state = PowerState.PAUSED if snap.state == PowerState.PAUSED.value else PowerState.RUNNING

    def delete_snapshot(self, uuid: str, name: str) -> None:
        with self._domain("delete_snapshot", uuid) as dom:
            snap = self._snapshot(dom, uuid, name)
            del dom.snapshots[name]
            for other in dom.snapshots.values():
                if other.parent == name:
                    other.parent = snap.parent
            if dom.current_snapshot == name:
                dom.current_snapshot = snap.parent  # libvirt makes the parent current
            for f in self._qcow2_disks(snap.domain):
                if name in f.snapshots:
                    f.snapshots.remove(name)

    # -- devices -----------------------------------------------------------------------------------
    def _device(self, xml: str, action: str) -> ET.Element:
        try:
            elem = _parse_xml(xml, "device XML")
        except ET.ParseError as exc:
            raise libvirt_error(action, VIR_ERR_XML_DETAIL, f"(device_definition): {exc}") from None
        if elem.tag not in {"disk", "interface"}:
            raise libvirt_error(
                action,
                VIR_ERR_OPERATION_UNSUPPORTED,
                f"Operation not supported: the fake hypervisor attaches disks and interfaces, not <{elem.tag}>",
            )
        if elem.tag == "disk" and not _disk_target(elem):
            raise libvirt_error(action, VIR_ERR_XML_ERROR, "XML error: missing disk target")
        return elem

    def attach_device(self, uuid: str, xml: str, *, live: bool, config: bool) -> None:
        action = f"cannot attach a device to VM {uuid}"
        with self._domain("attach_device", uuid) as dom:
            device = self._device(xml, action)
            if device.tag == "interface" and _nic_mac(device) is None:
                device.insert(0, ET.Element("mac", {"address": self._new_mac()}))
            trees = self._scopes(dom, action, live, config)
            # Check every scope before changing any, so a refusal changes nothing.
            for tree in trees:
                self._check_attach(dom, tree, device, action, live=tree is dom.live)
            for tree in trees:
                elem = copy.deepcopy(device)
                if tree is dom.live and elem.tag == "interface":
                    ET.SubElement(elem, "target", {"dev": self._tap()})
                _insert_device(_devices(tree), elem)

    def _check_attach(
        self, dom: _Domain, tree: ET.Element, device: ET.Element, action: str, *, live: bool
    ) -> None:
        if self._matching(_devices(tree), device) is not None:
            clash = (
                f"target {_disk_target(device)} already exists"
                if device.tag == "disk"
                else f"MAC address {_nic_mac(device)} is already in use by another interface"
            )
            raise libvirt_error(
                action, VIR_ERR_OPERATION_INVALID, f"Requested operation is not valid: {clash}"
            )
        if not live:
            return  # libvirt checks sources when QEMU opens them, not in the definition
        if tree.find("features/acpi") is None:
            raise libvirt_error(
                action,
                VIR_ERR_INTERNAL_ERROR,
                "internal error: unable to execute QEMU command 'device_add': Bus 'pci.0' does not support hotplugging",
                domain=VIR_FROM_QEMU,
            )
        if device.tag == "disk":
            target = _disk_target(device) or ""
            target_elem = device.find("target")
            bus = (target_elem.get("bus") if target_elem is not None else None) or _default_bus(target)
            if bus in {"ide", "sata", "fdc"}:
                raise libvirt_error(
                    action,
                    VIR_ERR_OPERATION_UNSUPPORTED,
                    f"Operation not supported: disk bus '{bus}' cannot be hotplugged.",
                    domain=VIR_FROM_QEMU,
                )
            self._check_disk(device, dom.uuid, action)
        else:
            self._check_nic(device, action)

    def detach_device(self, uuid: str, xml: str, *, live: bool, config: bool) -> None:
        action = f"cannot detach a device from VM {uuid}"
        with self._domain("detach_device", uuid) as dom:
            device = self._device(xml, action)
            trees = self._scopes(dom, action, live, config)
            found = []
            for tree in trees:
                elem = self._matching(_devices(tree), device)
                if elem is None:
                    if device.tag == "disk":
                        text = f"device not found: disk {_disk_target(device)} not found"
                    else:
                        text = f"device not found: no device matching MAC address {_nic_mac(device)} found"
                    raise libvirt_error(action, VIR_ERR_DEVICE_MISSING, text)
                found.append((tree, elem))
            for tree, elem in found:
                if tree is dom.live and not self.guest_acks_unplug:
                    dom.pending_release.append(elem)  # QEMU returns; the device goes when the guest says so
                    continue
                _devices(tree).remove(elem)

    @staticmethod
    def _matching(devices: ET.Element, device: ET.Element) -> ET.Element | None:
        if device.tag == "disk":
            target = _disk_target(device)
            return next((d for d in devices.findall("disk") if _disk_target(d) == target), None)
        mac = _nic_mac(device)
        kind, source = _nic_source(device)
        for nic in devices.findall("interface"):
            if mac is not None and _nic_mac(nic) == mac:
                return nic
            if mac is None and _nic_source(nic) == (kind, source):
                return nic
        return None

    def _disk_file(self, dom: _Domain, target: str, action: str) -> tuple[str, FakeFile]:
        for disk in _devices(dom.current).findall("disk"):
            source = _disk_source(disk)
            if _disk_target(disk) == target or (source is not None and source == target):
                f = self.storage.get(source) if source is not None else None
                if source is None or f is None:
                    raise libvirt_error(
                        action,
                        VIR_ERR_SYSTEM_ERROR,
                        f"cannot stat file '{source}': No such file or directory",
                    )
                return source, f
        raise libvirt_error(
            action, VIR_ERR_INVALID_ARG, f"invalid argument: invalid path {target} not assigned to domain"
        )

    def block_size(self, uuid: str, target: str) -> int:
        with self._domain("block_size", uuid) as dom:
            _path, f = self._disk_file(dom, target, f"VM {uuid}: disk {target}")
            return f.virtual_size

    def block_resize(self, uuid: str, target: str, size_bytes: int) -> None:
        action = f"cannot resize disk {target} of VM {uuid}"
        with self._domain("block_resize", uuid) as dom:
            if dom.live is None:
                raise libvirt_error(action, VIR_ERR_OPERATION_INVALID, _NOT_RUNNING, domain=self._from)
            _path, f = self._disk_file(dom, target, action)
            if size_bytes < f.virtual_size:
                raise libvirt_error(
                    action,
                    VIR_ERR_INVALID_ARG,
                    f"invalid argument: the fake hypervisor does not shrink disks ({size_bytes} < {f.virtual_size} bytes)",
                )
            if f.snapshots:
                raise libvirt_error(
                    action,
                    VIR_ERR_INTERNAL_ERROR,
                    "internal error: unable to execute QEMU command 'block_resize': "
                    "Can't resize an image which has snapshots",
                    domain=VIR_FROM_QEMU,
                )
            f.virtual_size = size_bytes

    # -- storage, networks -------------------------------------------------------------------------
    def pool_path(self, pool: str) -> str:
        with self.lock:
            self._enter("pool_path")
            path = self._pool(pool).path
            if not path:
                raise NotFound(f"storage pool {pool} has no target directory")
            return path

    def files(self) -> PathLookup:
        return self.storage

    def refresh_pool(self, pool: str) -> None:
        with self.lock:
            self._enter("refresh_pool")
            p = self._pool(pool)
            p.volumes = dict(self.storage.in_dir(p.path))

    def is_pool_volume(self, path: str) -> bool:
        with self.lock:
            self._enter("is_pool_volume")
            return self._volume_by_path(path) is not None

    def network_exists(self, name: str) -> bool:
        with self.lock:
            self._enter("network_exists")
            return name in self._networks

    def bridge_exists(self, name: str) -> bool:
        with self.lock:
            self._enter("bridge_exists")
            return name in self._bridges()

    # -- pinning (used by agent.tuning.fake.FakePinning) ---------------------------------------------
    def domain_name(self, uuid: str) -> str:
        with self.lock:
            return self._get(uuid, f"VM {uuid}").name

    def state_of(self, uuid: str) -> PowerState:
        with self.lock:
            return self._get(uuid, f"VM {uuid}").state

    def _cputune_view(self, uuid: str) -> tuple[ET.Element, int]:
        """The definition in effect and its current vCPU count (vcpuPinInfo has one map per vCPU)."""
        dom = self._get(uuid, f"VM {uuid}")
        return dom.current, _parsed(dom.current).vcpus

    def _default_pin(self, tree: ET.Element) -> str:
        vcpu = tree.find("vcpu")
        cpuset = vcpu.get("cpuset") if vcpu is not None else None
        return cpuset or format_cpuset(range(self.cpu.cpus))

    def vcpu_pins(self, uuid: str) -> tuple[tuple[int, str], ...]:
        """(vCPU, CPU list) for every vCPU, in effect now (like ``virsh vcpupin``)."""
        with self.lock:
            tree, vcpus = self._cputune_view(uuid)
            pins = {int(p.get("vcpu", "-1")): p.get("cpuset", "") for p in tree.findall("cputune/vcpupin")}
            default = self._default_pin(tree)
            return tuple((i, pins.get(i, default)) for i in range(vcpus))

    def emulator_cpuset(self, uuid: str) -> str:
        with self.lock:
            tree, _max = self._cputune_view(uuid)
            pin = tree.find("cputune/emulatorpin")
            return pin.get("cpuset", "") if pin is not None else self._default_pin(tree)

    def _pin_trees(self, uuid: str) -> list[ET.Element]:
        """Live (when running) and persistent (when defined): LibvirtPinning's LIVE|CONFIG."""
        dom = self._get(uuid, f"VM {uuid}")
        return [t for t in (dom.live, dom.persistent) if t is not None]

    def pin_vcpu(self, uuid: str, vcpu: int, cpuset: str) -> None:
        """``virsh vcpupin --live --config``."""
        with self.lock:
            for tree in self._pin_trees(uuid):
                cputune = _child(tree, "cputune", after=("vcpu", "iothreads"))
                for old in cputune.findall("vcpupin"):
                    if old.get("vcpu") == str(vcpu):
                        cputune.remove(old)
                pins = cputune.findall("vcpupin")
                index = sum(1 for p in pins if int(p.get("vcpu", "0")) < vcpu)
                cputune.insert(index, ET.Element("vcpupin", {"vcpu": str(vcpu), "cpuset": cpuset}))

    def pin_emulator(self, uuid: str, cpuset: str) -> None:
        """``virsh emulatorpin --live --config``."""
        with self.lock:
            for tree in self._pin_trees(uuid):
                cputune = _child(tree, "cputune", after=("vcpu", "iothreads"))
                pin = cputune.find("emulatorpin")
                if pin is None:
                    pin = ET.SubElement(cputune, "emulatorpin")
                pin.set("cpuset", cpuset)

    @property
    def cpu_count(self) -> int:
        return self.cpu.cpus


def _typecheck(hv: FakeHypervisor, images: FakeImages) -> tuple[Hypervisor, Images]:
    """Never called: mypy fails here when a port grows (or changes) and the fakes do not follow."""
    return hv, images
