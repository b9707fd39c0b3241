"""The libvirt implementation of :class:`agent.ports.Hypervisor`.

Every ``libvirt.libvirtError`` is translated here, once: unknown domains, volumes, pools and
networks become :class:`~common.errors.NotFound`, a lost connection to libvirtd
:class:`~common.errors.HypervisorUnavailable` (retryable), anything else
:class:`~common.errors.HypervisorError`; all keep libvirt's error code in ``details["code"]``.

One connection is shared by all threads (libvirt connections are thread-safe). That matters for
the test driver: every ``open()`` of ``test:///path/node.xml`` gets private state, so a second
connection would not see the agent's domains. On a real host it is a
:class:`~agent.drivers.libvirt_link.LibvirtLink`, which reopens it after libvirtd restarted; the
driver re-registers its domain event callbacks on the new connection.

Domain XML is never built here (:mod:`common.domain_xml` does that); only the small storage and
metadata documents below are.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import libvirt

from agent.disks import OWNED_VOLUMES_NS as OWNED_VOLUMES_NS  # noqa: PLC0414 - re-exported
from agent.drivers import host_facts
from agent.drivers.libvirt_link import LibvirtLink, is_connection_error
from agent.host_files import OsPathLookup
from agent.ports import GIB, NodeFacts, shutdown_timed_out
from agent.storage_pools import FileKind, PathLookup
from common.domain_xml import OWNED_VOLUMES_PREFIX as OWNED_VOLUMES_PREFIX  # noqa: PLC0414 - re-exported
from common.domain_xml import VF_NAMESPACE, DomainXmlError, parse_domain_xml
from common.errors import HypervisorError, HypervisorUnavailable, NotFound, Unsupported, VirtfleetError
from common.messages.host import CpuTopology, StoragePoolInfo
from common.messages.vm import DiskFormat, PowerState, VmStatus

log = logging.getLogger(__name__)

MIB = 1024**2


#: libvirt domain state -> virtfleet power state, spelled out for every VIR_DOMAIN_* state.
STATE_MAP: Mapping[int, PowerState] = {
    libvirt.VIR_DOMAIN_NOSTATE: PowerState.NOSTATE,
    libvirt.VIR_DOMAIN_RUNNING: PowerState.RUNNING,
    libvirt.VIR_DOMAIN_BLOCKED: PowerState.BLOCKED,
    libvirt.VIR_DOMAIN_PAUSED: PowerState.PAUSED,
    libvirt.VIR_DOMAIN_SHUTDOWN: PowerState.SHUTDOWN,
    libvirt.VIR_DOMAIN_SHUTOFF: PowerState.SHUTOFF,
    libvirt.VIR_DOMAIN_CRASHED: PowerState.CRASHED,
    libvirt.VIR_DOMAIN_PMSUSPENDED: PowerState.PMSUSPENDED,
}

_NOT_FOUND_CODES = frozenset(
    {
        libvirt.VIR_ERR_NO_DOMAIN,
        libvirt.VIR_ERR_NO_STORAGE_POOL,
        libvirt.VIR_ERR_NO_STORAGE_VOL,
        libvirt.VIR_ERR_NO_NETWORK,
        libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT,
    }
)
#: "this function is not supported by the connection driver" and friends: the hypervisor cannot do it.
_UNSUPPORTED_CODES = frozenset({libvirt.VIR_ERR_NO_SUPPORT, libvirt.VIR_ERR_OPERATION_UNSUPPORTED})


def power_state(code: int) -> PowerState:
    """The PowerState of a VIR_DOMAIN_* state code (NOSTATE for codes newer than this map)."""
    return STATE_MAP.get(code, PowerState.NOSTATE)


# ------------------------------------------------------------------------------ error translation


def translate_error(exc: libvirt.libvirtError, action: str) -> VirtfleetError:
    """A virtfleet error for a libvirt one, keeping libvirt's code, domain and message."""
    code = exc.get_error_code()
    text = exc.get_error_message() or str(exc)
    details = {"code": code, "domain": exc.get_error_domain(), "libvirt_message": text}
    if code in _NOT_FOUND_CODES:
        return NotFound(f"{action}: {text}", details=details)
    if is_connection_error(code, exc.get_error_domain()):
        return HypervisorUnavailable(f"{action}: libvirt unreachable: {text}", details=details)
    if code in _UNSUPPORTED_CODES:
        return Unsupported(f"{action}: {text}", details=details)
    return HypervisorError(f"{action}: {text}", details=details)


@contextlib.contextmanager
def libvirt_errors(action: str) -> Iterator[None]:
    """Translate libvirtError raised inside the block (see :func:`translate_error`)."""
    try:
        yield
    except libvirt.libvirtError as exc:
        raise translate_error(exc, action) from exc


def _code(exc: libvirt.libvirtError) -> int:
    code = exc.get_error_code()
    return int(code) if code is not None else -1


_event_loop_lock = threading.Lock()
_event_loop_started = False


def start_event_loop() -> None:
    """libvirt's default event loop on a daemon thread, once per process (idempotent).

    Domain events need it, and a connection only delivers them when the loop was registered
    before it was opened (remote drivers watch their socket from it): :func:`open_connection`
    calls this first. One thread serves every connection of the process (the multi-host agent's).
    """
    global _event_loop_started  # noqa: PLW0603 - one loop per process, by libvirt's design
    with _event_loop_lock:
        if _event_loop_started:
            return
        libvirt.virEventRegisterDefaultImpl()
        threading.Thread(target=_run_event_loop, name="libvirt-events", daemon=True).start()
        _event_loop_started = True


def _run_event_loop() -> None:
    while True:
        try:
            libvirt.virEventRunDefaultImpl()
        except libvirt.libvirtError as exc:  # pragma: no cover - libvirt reports a broken loop this way
            log.warning("libvirt event loop: %s", exc)
            time.sleep(1.0)


def open_connection(uri: str) -> Any:
    """Open the one libvirt connection of this process (after starting libvirt's event loop, so
    that it delivers domain events); HypervisorError when that fails."""
    start_event_loop()
    with libvirt_errors(f"cannot open libvirt connection {uri}"):
        conn = libvirt.open(uri)
    if conn is None:  # older bindings returned None instead of raising
        raise HypervisorError(f"cannot open libvirt connection {uri}")
    return conn


def open_link(uri: str) -> LibvirtLink:
    """A :class:`~agent.drivers.libvirt_link.LibvirtLink` to ``uri`` (after starting libvirt's
    event loop, which its close callback, keepalive and domain events need), connected now;
    HypervisorError when libvirtd cannot be reached at start."""
    start_event_loop()
    link = LibvirtLink(uri)
    with libvirt_errors(f"cannot open libvirt connection {uri}"):
        link.open()
    return link


# ------------------------------------------------------------------------------ small documents (pure)


def _tostring(elem: ET.Element) -> str:
    ET.indent(elem, space="  ")
    return ET.tostring(elem, encoding="unicode")


def volume_xml(name: str, fmt: DiskFormat, size_gib: int) -> str:
    """A sparse storage volume of ``size_gib`` GiB in format ``fmt``."""
    vol = ET.Element("volume")
    ET.SubElement(vol, "name").text = name
    ET.SubElement(vol, "capacity", {"unit": "GiB"}).text = str(size_gib)
    ET.SubElement(vol, "allocation", {"unit": "bytes"}).text = "0"
    target = ET.SubElement(vol, "target")
    ET.SubElement(target, "format", {"type": fmt.value})
    return _tostring(vol)


def dir_pool_xml(name: str, path: Path) -> str:
    """A directory storage pool."""
    pool = ET.Element("pool", {"type": "dir"})
    ET.SubElement(pool, "name").text = name
    target = ET.SubElement(pool, "target")
    ET.SubElement(target, "path").text = str(path)
    return _tostring(pool)


def owned_volumes_xml(paths: tuple[str, ...]) -> str:
    """The agent's metadata element listing the volumes it created for a domain."""
    root = ET.Element("volumes")
    for path in paths:
        ET.SubElement(root, "volume", {"path": path})
    return _tostring(root)


def parse_owned_volumes(xml: str) -> tuple[str, ...]:
    """Paths listed by :func:`owned_volumes_xml` (libvirt hands the element back without namespace)."""
    try:
        root = ET.fromstring(xml)  # noqa: S314 - libvirt's own output of our own element
    except ET.ParseError:
        return ()
    return tuple(
        path for elem in root.iter() if elem.tag.rpartition("}")[2] == "volume" and (path := elem.get("path"))
    )


def pool_target_path(pool_xml: str) -> str:
    """``<pool><target><path>`` ("" when absent)."""
    try:
        root = ET.fromstring(pool_xml)  # noqa: S314 - libvirt's own output
    except ET.ParseError:
        return ""
    return (root.findtext("target/path") or "").strip()


def managed_marker_xml() -> str:
    """The body of virtfleet's ``<vf:instance>`` metadata (libvirt adds the namespace prefix)."""
    root = ET.Element("instance")
    ET.SubElement(root, "managed").text = "true"
    return _tostring(root)


def domain_has_nvram(domain_xml: str) -> bool:
    """True when the domain has UEFI variables (``<os><nvram>``) that undefine must remove."""
    try:
        root = ET.fromstring(domain_xml)  # noqa: S314 - libvirt's own output
    except ET.ParseError:
        return False
    return root.find("os/nvram") is not None


# ------------------------------------------------------------------------------ the driver


class _VolumeAwareLookup(OsPathLookup):
    """:class:`~agent.host_files.OsPathLookup`, plus libvirt's volumes as files."""

    def __init__(self, hv: LibvirtHypervisor) -> None:
        self._hv = hv

    def kind(self, path: str) -> FileKind:
        found = super().kind(path)
        if found is FileKind.MISSING and self._hv.is_pool_volume(path):
            return FileKind.FILE
        return found


class LibvirtHypervisor:
    """:class:`agent.ports.Hypervisor` over one shared libvirt connection (a raw one, or a
    :class:`~agent.drivers.libvirt_link.LibvirtLink` that survives libvirtd restarts)."""

    def __init__(
        self,
        conn: Any,
        pool_name: str,
        *,
        hw_virt: bool | None = None,
        simulated: bool | None = None,
        pool_capacity_bytes: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        poll_interval: float = 0.5,
        sys_class_net: Path = host_facts.SYS_CLASS_NET,
    ) -> None:
        """``simulated`` (default: the connection is the test driver) turns off /dev/kvm and sysfs probing;
        ``hw_virt`` None means detect it (always True when simulated); ``pool_capacity_bytes`` overrides the
        pool capacity that the test driver hard-codes at 100 GiB."""
        self._link: LibvirtLink | None = conn if isinstance(conn, LibvirtLink) else None
        self._raw_conn: Any = None if self._link is not None else conn
        #: lifecycle watchers: callback -> its libvirt callback id on the current connection
        self._watch_lock = threading.Lock()
        self._lifecycle: dict[Callable[[str], None], int | None] = {}
        if self._link is not None:
            self._link.watch(self._on_link)
        self._pool_name = pool_name
        if simulated is None:
            with libvirt_errors("cannot query the hypervisor type"):
                simulated = str(conn.getType()).upper() == "TEST"
        self.simulated = simulated
        self._hw_virt = (
            hw_virt if hw_virt is not None else (True if simulated else host_facts.detect_hw_virt())
        )
        self._pool_capacity_bytes = pool_capacity_bytes
        self._clock = clock
        self._sleep = sleep
        self._poll_interval = poll_interval
        self._sys_class_net = sys_class_net
        self._cpu_model: str | None = None
        #: uuid -> (the domain XML :meth:`status` parsed last, what it gave: (max vCPUs, managed),
        #: None when unparsable). A status of an unchanged definition (the reporter's, right after
        #: a command's own) does not parse it again: the parse is most of a status's CPU.
        self._parsed: dict[str, tuple[str, tuple[int, bool] | None]] = {}
        self._parsed_lock = threading.Lock()

    @property
    def conn(self) -> Any:
        """The live connection; HypervisorUnavailable while libvirtd is away (see LibvirtLink)."""
        if self._link is not None:
            return self._link.current()
        return self._raw_conn

    # -- host -------------------------------------------------------------------------
    @property
    def default_pool(self) -> str:
        return self._pool_name

    def hw_virt(self) -> bool:
        return self._hw_virt

    def watch_lifecycle(self, changed: Callable[[str], None]) -> Callable[[], None] | None:
        """``changed(uuid)`` on every VIR_DOMAIN_EVENT_ID_LIFECYCLE event of this connection
        (defined, undefined, started, suspended, resumed, stopped, shut down, crashed...), from
        libvirt's event-loop thread; None (and a log line) when the connection cannot deliver them.
        After a reconnect the callback is registered again on the new connection."""
        start_event_loop()
        callback_id = self._register_lifecycle(changed)
        if callback_id is None and self._link is None:
            return None
        with self._watch_lock:
            self._lifecycle[changed] = callback_id

        def unwatch() -> None:
            with self._watch_lock:
                old = self._lifecycle.pop(changed, None)
            if old is not None:
                with contextlib.suppress(libvirt.libvirtError, HypervisorUnavailable):
                    self.conn.domainEventDeregisterAny(old)

        return unwatch

    def _register_lifecycle(self, changed: Callable[[str], None]) -> int | None:
        """Register ``changed`` for lifecycle events on the current connection; its id, or None."""

        def on_event(_conn: Any, dom: Any, _event: int, _detail: int, _opaque: object) -> None:
            try:
                changed(str(dom.UUIDString()))
            except Exception:  # an exception must not reach libvirt's C event loop
                log.exception("lifecycle event callback failed")

        try:
            return int(
                self.conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, on_event, None)
            )
        except (libvirt.libvirtError, HypervisorUnavailable) as exc:
            log.warning("no domain lifecycle events (%s); outside changes wait for the next full report", exc)
            return None

    def watch_connection(self, changed: Callable[[str | None], None]) -> Callable[[], None] | None:
        """``changed(reason)`` when the libvirt connection is lost, ``changed(None)`` once it is
        back (and the lifecycle callbacks are registered again); None without a LibvirtLink."""
        if self._link is None:
            return None
        return self._link.watch(changed)

    def _on_link(self, reason: str | None) -> None:
        """The link's news: once reconnected, re-register every lifecycle watcher (the dead
        connection took its callbacks with it)."""
        if reason is not None:
            return
        with self._watch_lock:
            watchers = list(self._lifecycle)
        for changed in watchers:
            callback_id = self._register_lifecycle(changed)
            with self._watch_lock:
                if changed in self._lifecycle:
                    self._lifecycle[changed] = callback_id

    def ensure_pool(self, images_dir: Path) -> None:
        """Make sure the default pool exists and is active; on a real host create a dir pool if missing."""
        name = self._pool_name
        try:
            pool = self.conn.storagePoolLookupByName(name)
        except libvirt.libvirtError as exc:
            if _code(exc) != libvirt.VIR_ERR_NO_STORAGE_POOL:
                raise translate_error(exc, f"storage pool {name}") from exc
            if self.simulated:
                raise NotFound(
                    f"storage pool {name!r} is not defined in the test driver's node file"
                ) from None
            log.info("creating directory storage pool %s at %s", name, images_dir)
            with libvirt_errors(f"cannot create storage pool {name} at {images_dir}"):
                pool = self.conn.storagePoolDefineXML(dir_pool_xml(name, images_dir), 0)
                pool.build(0)
                pool.setAutostart(1)
        with libvirt_errors(f"cannot start storage pool {name}"):
            if not pool.isActive():
                pool.create(0)

    def pool_info(self, name: str) -> StoragePoolInfo:
        pool = self._pool(name)
        with libvirt_errors(f"storage pool {name}"):
            _state, capacity, allocation, available = pool.info()
            path = pool_target_path(pool.XMLDesc(0))
        if self._pool_capacity_bytes is not None and name == self._pool_name:
            capacity = self._pool_capacity_bytes
            available = max(0, capacity - allocation)
        return StoragePoolInfo(
            name=name,
            path=path,
            capacity_gib=capacity // GIB,
            allocation_gib=allocation // GIB,
            available_gib=available // GIB,
        )

    def node_facts(self) -> NodeFacts:
        conn = self.conn
        with libvirt_errors("cannot read node facts"):
            model, memory_mib, cpus, mhz, nodes, sockets, cores, threads = conn.getInfo()
            hostname = conn.getHostname()
            hv_type = conn.getType()
            hv_version = conn.getVersion()
            lib_version = conn.getLibVersion()
            networks = tuple(sorted(net.name() for net in conn.listAllNetworks(0)))
            if self._cpu_model is None:
                self._cpu_model = host_facts.cpu_model_from_capabilities(conn.getCapabilities()) or str(model)
        try:
            free_mib = int(conn.getFreeMemory()) // MIB
        except libvirt.libvirtError:
            free_mib = 0
        try:
            storage: StoragePoolInfo | None = self.pool_info(self._pool_name)
        except NotFound:
            storage = None
        return NodeFacts(
            hostname=str(hostname),
            hypervisor_type=str(hv_type),
            hypervisor_version=host_facts.version_string(int(hv_version)),
            libvirt_version=host_facts.version_string(int(lib_version)),
            cpu=CpuTopology(
                cpus=int(cpus),
                sockets=max(1, int(nodes)) * int(sockets),
                cores=int(cores),
                threads=int(threads),
                numa_cells=max(1, int(nodes)),
                mhz=int(mhz),
                model=self._cpu_model,
            ),
            memory_mib=int(memory_mib),
            free_memory_mib=free_mib,
            storage=storage,
            networks=networks,
            bridges=self._bridges(),
            hw_virt=self._hw_virt,
        )

    # -- storage ----------------------------------------------------------------------
    def _pool(self, name: str) -> Any:
        with libvirt_errors(f"storage pool {name}"):
            return self.conn.storagePoolLookupByName(name)

    def _volume(self, pool: Any, pool_name: str, name: str) -> Any | None:
        try:
            return pool.storageVolLookupByName(name)
        except libvirt.libvirtError as exc:
            if _code(exc) == libvirt.VIR_ERR_NO_STORAGE_VOL:
                return None
            raise translate_error(exc, f"volume {pool_name}/{name}") from exc

    def volume_path(self, pool: str, name: str) -> str | None:
        vol = self._volume(self._pool(pool), pool, name)
        if vol is None:
            return None
        with libvirt_errors(f"volume {pool}/{name}"):
            return str(vol.path())

    def create_volume(self, pool: str, name: str, fmt: DiskFormat, size_gib: int) -> str:
        pool_obj = self._pool(pool)
        vol = self._volume(pool_obj, pool, name)
        if vol is None:
            try:
                vol = pool_obj.createXML(volume_xml(name, fmt, size_gib), 0)
            except libvirt.libvirtError as exc:
                # Lost a race with a concurrent create of the same volume: reuse it.
                vol = self._volume(pool_obj, pool, name)
                if vol is None:
                    raise translate_error(exc, f"cannot create volume {pool}/{name}") from exc
            log.info("created volume %s/%s (%s, %d GiB)", pool, name, fmt.value, size_gib)
        with libvirt_errors(f"volume {pool}/{name}"):
            return str(vol.path())

    def delete_volume(self, pool: str, name: str) -> bool:
        vol = self._volume(self._pool(pool), pool, name)
        if vol is None:
            return False
        with libvirt_errors(f"cannot delete volume {pool}/{name}"):
            vol.delete(0)
        return True

    def _volume_by_path(self, path: str) -> Any | None:
        try:
            return self.conn.storageVolLookupByPath(path)
        except libvirt.libvirtError as exc:
            if _code(exc) == libvirt.VIR_ERR_NO_STORAGE_VOL:
                return None
            raise translate_error(exc, f"volume {path}") from exc

    def delete_volume_path(self, path: str) -> bool:
        vol = self._volume_by_path(path)
        if vol is None:
            return False
        with libvirt_errors(f"cannot delete volume {path}"):
            vol.delete(0)
        log.info("deleted volume %s", path)
        return True

    def path_exists(self, path: str) -> bool:
        return self._volume_by_path(path) is not None or os.path.exists(path)  # noqa: PTH110 - str API

    # -- domains ----------------------------------------------------------------------
    def _dom(self, uuid: str) -> Any:
        with libvirt_errors(f"VM {uuid}"):
            return self.conn.lookupByUUIDString(uuid)

    @contextlib.contextmanager
    def _domain(self, uuid: str, action: str) -> Iterator[Any]:
        """The domain ``uuid``; a libvirt error inside the block is a refusal of ``action``."""
        dom = self._dom(uuid)
        with libvirt_errors(action):
            yield dom

    def find(self, uuid: str) -> VmStatus | None:
        try:
            return self.status(uuid)
        except NotFound:
            return None

    def uuid_for_name(self, name: str) -> str | None:
        try:
            dom = self.conn.lookupByName(name)
        except libvirt.libvirtError as exc:
            if _code(exc) == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise translate_error(exc, f"VM {name}") from exc
        with libvirt_errors(f"VM {name}"):
            return str(dom.UUIDString())

    def define(self, xml: str) -> str:
        with libvirt_errors("cannot define the domain"):
            dom = self.conn.defineXML(xml)
            return str(dom.UUIDString())

    def set_owned_volumes(self, uuid: str, paths: tuple[str, ...]) -> None:
        with self._domain(uuid, f"VM {uuid}: cannot record its volumes") as dom:
            dom.setMetadata(
                libvirt.VIR_DOMAIN_METADATA_ELEMENT,
                owned_volumes_xml(paths),
                OWNED_VOLUMES_PREFIX,
                OWNED_VOLUMES_NS,
                libvirt.VIR_DOMAIN_AFFECT_CONFIG,
            )

    def owned_volumes(self, uuid: str) -> tuple[str, ...]:
        dom = self._dom(uuid)
        try:
            xml = dom.metadata(
                libvirt.VIR_DOMAIN_METADATA_ELEMENT, OWNED_VOLUMES_NS, libvirt.VIR_DOMAIN_AFFECT_CONFIG
            )
        except libvirt.libvirtError as exc:
            if _code(exc) == libvirt.VIR_ERR_NO_DOMAIN_METADATA:
                return ()
            raise translate_error(exc, f"VM {uuid}: cannot read its volumes") from exc
        return parse_owned_volumes(str(xml))

    def start(self, uuid: str) -> None:
        with self._domain(uuid, f"cannot start VM {uuid}") as dom:
            dom.create()

    def _state(self, dom: Any, uuid: str) -> PowerState:
        with libvirt_errors(f"VM {uuid}"):
            state, _reason = dom.state(0)
        return power_state(state)

    def shutdown(self, uuid: str, timeout_s: float, force: bool) -> None:
        dom = self._dom(uuid)
        if self._state(dom, uuid) is PowerState.SHUTOFF:
            return
        with libvirt_errors(f"cannot shut down VM {uuid}"):
            dom.shutdown()
        deadline = self._clock() + timeout_s
        while True:
            try:
                if self._state(dom, uuid) is PowerState.SHUTOFF:
                    return
            except NotFound:  # a transient domain is gone once it is off
                return
            remaining = deadline - self._clock()
            if remaining <= 0:
                break
            self._sleep(min(self._poll_interval, remaining))
        if force:
            log.info("VM %s did not shut down within %s s; powering it off", uuid, timeout_s)
            self.destroy(uuid)
            return
        raise shutdown_timed_out(uuid, timeout_s)

    def destroy(self, uuid: str) -> None:
        with self._domain(uuid, f"cannot power off VM {uuid}") as dom:
            dom.destroy()

    def reboot(self, uuid: str) -> None:
        with self._domain(uuid, f"cannot reboot VM {uuid}") as dom:
            dom.reboot(0)

    def reset(self, uuid: str) -> None:
        with self._domain(uuid, f"cannot reset VM {uuid}") as dom:
            dom.reset(0)

    def suspend(self, uuid: str) -> None:
        with self._domain(uuid, f"cannot suspend VM {uuid}") as dom:
            dom.suspend()

    def resume(self, uuid: str) -> None:
        with self._domain(uuid, f"cannot resume VM {uuid}") as dom:
            dom.resume()

    def undefine(self, uuid: str) -> None:
        try:
            dom = self._dom(uuid)
        except NotFound:
            self._forget_parsed(uuid)
            return  # a transient domain vanished when it was powered off
        with libvirt_errors(f"cannot undefine VM {uuid}"):
            if not dom.isPersistent():
                return
            flags = 0
            if dom.hasManagedSaveImage(0):
                flags |= libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
            if dom.snapshotNum(0) > 0:
                flags |= libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
            if domain_has_nvram(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)):
                flags |= libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
            dom.undefineFlags(flags)
        self._forget_parsed(uuid)

    def set_autostart(self, uuid: str, enabled: bool) -> None:
        with self._domain(uuid, f"cannot set autostart of VM {uuid}") as dom:
            dom.setAutostart(1 if enabled else 0)

    def status(self, uuid: str) -> VmStatus:
        try:
            return self._status(self._dom(uuid))
        except NotFound:
            self._forget_parsed(uuid)
            raise

    def power(self, uuid: str) -> tuple[PowerState, bool]:
        dom = self._dom(uuid)
        with libvirt_errors("cannot read VM status"):
            state = dom.info()[0]  # as status() reads it
            autostart = bool(dom.autostart())
        return power_state(int(state)), autostart

    def _status(self, dom: Any) -> VmStatus:
        with libvirt_errors("cannot read VM status"):
            uuid = str(dom.UUIDString())
            name = str(dom.name())
            state, max_mem_kib, mem_kib, vcpus, cpu_time = dom.info()
            xml = str(dom.XMLDesc(0))
            autostart = bool(dom.autostart())
            persistent = bool(dom.isPersistent())
        facts = self._definition_facts(uuid, name, xml)
        max_vcpus, managed = facts if facts is not None else (int(vcpus), False)
        return VmStatus(
            uuid=uuid,
            name=name,
            state=power_state(int(state)),
            vcpus=int(vcpus),
            max_vcpus=max(int(max_vcpus), int(vcpus)),
            memory_mib=int(mem_kib) // 1024,
            max_memory_mib=int(max_mem_kib) // 1024,
            cpu_time_ns=int(cpu_time),
            autostart=autostart,
            persistent=persistent,
            managed=managed,
        )

    def _definition_facts(self, uuid: str, name: str, xml: str) -> tuple[int, bool] | None:
        """(max vCPUs, managed) from a domain's XML, None when it cannot be parsed; parsed again
        only when the XML differs from the last one of that domain."""
        with self._parsed_lock:
            known = self._parsed.get(uuid)
        if known is not None and known[0] == xml:
            return known[1]
        facts: tuple[int, bool] | None
        try:
            parsed = parse_domain_xml(xml)
            facts = (parsed.max_vcpus, parsed.managed)
        except DomainXmlError as exc:
            log.debug("VM %s: unparsable domain XML (%s); reporting it as unmanaged", name, exc)
            facts = None
        with self._parsed_lock:
            self._parsed[uuid] = (xml, facts)
        return facts

    def _forget_parsed(self, uuid: str) -> None:
        with self._parsed_lock:
            self._parsed.pop(uuid.lower(), None)

    def list_statuses(self) -> tuple[VmStatus, ...]:
        with libvirt_errors("cannot list domains"):
            domains = self.conn.listAllDomains(0)
        statuses = []
        for dom in domains:
            try:
                statuses.append(self._status(dom))
            except NotFound:
                continue  # undefined between the listing and the lookup
        listed = {s.uuid for s in statuses}
        with self._parsed_lock:  # domains undefined by others: their XML need not be kept
            for uuid in [u for u in self._parsed if u not in listed]:
                del self._parsed[uuid]
        return tuple(sorted(statuses, key=lambda s: (s.name, s.uuid)))

    # -- whole definitions (vm import / export) ------------------------------------------
    def domain_xml(self, uuid: str, *, live: bool, secure: bool = False) -> str:
        dom = self._dom(uuid)
        flags = 0 if live else libvirt.VIR_DOMAIN_XML_INACTIVE
        if secure:
            flags |= libvirt.VIR_DOMAIN_XML_SECURE
        with libvirt_errors(f"cannot read the definition of VM {uuid}"):
            return str(dom.XMLDesc(flags))

    def domain_xmls(self) -> tuple[tuple[str, str, tuple[str, ...]], ...]:
        with libvirt_errors("cannot list domains"):
            domains = self.conn.listAllDomains(0)
        out = []
        for dom in domains:
            try:
                with libvirt_errors("cannot read a domain definition"):
                    xmls = [str(dom.XMLDesc(0))]
                    if dom.isActive() and dom.isPersistent():
                        xmls.append(str(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)))
                    out.append((str(dom.UUIDString()), str(dom.name()), tuple(xmls)))
            except NotFound:
                continue  # undefined meanwhile
        return tuple(out)

    def mark_managed(self, uuid: str) -> None:
        with self._domain(uuid, f"VM {uuid}: cannot mark it as managed by virtfleet") as dom:
            dom.setMetadata(
                libvirt.VIR_DOMAIN_METADATA_ELEMENT,
                managed_marker_xml(),
                "vf",
                VF_NAMESPACE,
                libvirt.VIR_DOMAIN_AFFECT_CONFIG,
            )

    # -- live changes ----------------------------------------------------------------------
    def set_vcpus(self, uuid: str, vcpus: int, *, live: bool, config: bool) -> None:
        with self._domain(uuid, f"cannot set the vCPUs of VM {uuid} to {vcpus}") as dom:
            # One call per scope: some drivers (the test driver) refuse LIVE|CONFIG together.
            if live:
                dom.setVcpusFlags(vcpus, libvirt.VIR_DOMAIN_AFFECT_LIVE)
            if config:
                dom.setVcpusFlags(vcpus, libvirt.VIR_DOMAIN_AFFECT_CONFIG)

    def set_memory(self, uuid: str, memory_mib: int, *, live: bool, config: bool) -> None:
        with self._domain(uuid, f"cannot set the memory of VM {uuid} to {memory_mib} MiB") as dom:
            if live:
                dom.setMemoryFlags(memory_mib * 1024, libvirt.VIR_DOMAIN_AFFECT_LIVE)
            if config:
                dom.setMemoryFlags(memory_mib * 1024, libvirt.VIR_DOMAIN_AFFECT_CONFIG)

    def memory_stats(self, uuid: str) -> dict[str, int]:
        with self._domain(uuid, f"cannot read the memory statistics of VM {uuid}") as dom:
            stats = dom.memoryStats()
        return {str(k): int(v) for k, v in dict(stats).items()}

    # -- snapshots ---------------------------------------------------------------------
    def create_snapshot(self, uuid: str, xml: str) -> None:
        with self._domain(uuid, f"cannot snapshot VM {uuid}") as dom:
            dom.snapshotCreateXML(xml, 0)

    def list_snapshots(self, uuid: str) -> tuple[tuple[str, bool], ...]:
        """(snapshot XML, is current) for each snapshot."""
        with self._domain(uuid, f"cannot list the snapshots of VM {uuid}") as dom:
            return tuple((str(s.getXMLDesc(0)), bool(s.isCurrent(0))) for s in dom.listAllSnapshots(0))

    def _snapshot(self, uuid: str, name: str) -> Any:
        with self._domain(uuid, f"VM {uuid}: snapshot {name}") as dom:
            return dom.snapshotLookupByName(name, 0)

    def revert_snapshot(self, uuid: str, name: str) -> None:
        snap = self._snapshot(uuid, name)
        with self._domain(uuid, f"cannot revert VM {uuid} to snapshot {name}") as dom:
            dom.revertToSnapshot(snap, 0)

    def delete_snapshot(self, uuid: str, name: str) -> None:
        snap = self._snapshot(uuid, name)
        with libvirt_errors(f"cannot delete snapshot {name} of VM {uuid}"):
            snap.delete(0)

    # -- devices ---------------------------------------------------------------------
    @staticmethod
    def _scope(live: bool, config: bool) -> int:
        flags = 0
        if live:
            flags |= libvirt.VIR_DOMAIN_AFFECT_LIVE
        if config:
            flags |= libvirt.VIR_DOMAIN_AFFECT_CONFIG
        return flags

    def attach_device(self, uuid: str, xml: str, *, live: bool, config: bool) -> None:
        with self._domain(uuid, f"cannot attach a device to VM {uuid}") as dom:
            dom.attachDeviceFlags(xml, self._scope(live, config))

    def detach_device(self, uuid: str, xml: str, *, live: bool, config: bool) -> None:
        with self._domain(uuid, f"cannot detach a device from VM {uuid}") as dom:
            dom.detachDeviceFlags(xml, self._scope(live, config))

    def block_size(self, uuid: str, target: str) -> int:
        """Virtual size in bytes of the running domain's disk ``target``."""
        with self._domain(uuid, f"VM {uuid}: disk {target}") as dom:
            return int(dom.blockInfo(target, 0)[0])

    def block_resize(self, uuid: str, target: str, size_bytes: int) -> None:
        with self._domain(uuid, f"cannot resize disk {target} of VM {uuid}") as dom:
            dom.blockResize(target, size_bytes, libvirt.VIR_DOMAIN_BLOCK_RESIZE_BYTES)

    # -- storage, networks -----------------------------------------------------------
    def pool_path(self, pool: str) -> str:
        pool_obj = self._pool(pool)
        with libvirt_errors(f"storage pool {pool}"):
            path = pool_target_path(pool_obj.XMLDesc(0))
        if not path:
            raise NotFound(f"storage pool {pool} has no target directory")
        return path

    def files(self) -> PathLookup:
        """The real file system, where a pool volume counts as a file even when libvirt keeps it
        elsewhere (the test driver's volumes exist only in libvirt)."""
        return _VolumeAwareLookup(self)

    def refresh_pool(self, pool: str) -> None:
        pool_obj = self._pool(pool)
        with libvirt_errors(f"cannot refresh storage pool {pool}"):
            pool_obj.refresh(0)

    def is_pool_volume(self, path: str) -> bool:
        return self._volume_by_path(path) is not None

    def network_exists(self, name: str) -> bool:
        try:
            self.conn.networkLookupByName(name)
        except libvirt.libvirtError as exc:
            if _code(exc) == libvirt.VIR_ERR_NO_NETWORK:
                return False
            raise translate_error(exc, f"network {name}") from exc
        return True

    def _bridges(self) -> tuple[str, ...]:
        """The host's Linux bridges; on a simulated host, the bridges its node file declares
        (``<interface type='bridge' name='br0'>``, read through libvirt's interface API)."""
        if not self.simulated:
            return host_facts.list_bridges(self._sys_class_net)
        with libvirt_errors("cannot list the simulated host's interfaces"):
            docs = [str(i.XMLDesc(0)) for i in self.conn.listAllInterfaces(0)]
        return host_facts.bridges_in_interface_xml(docs)

    def bridge_exists(self, name: str) -> bool:
        return name in self._bridges()
