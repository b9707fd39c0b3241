"""libvirt domain XML: build it from a :class:`VmSpec`, parse it back. Pure (ElementTree only, no I/O).

Building
    :func:`build_domain_xml` turns a *resolved* spec (every disk has a ``path``) into deterministic,
    pretty-printed domain XML. :func:`build_disk_xml` and :func:`build_interface_xml` produce the device
    XML for hot-plug (``attachDeviceFlags``); they use the same element builders as the domain, so the two
    can never drift apart. Every domain carries ``<metadata><vf:instance>`` in :data:`VF_NAMESPACE`, so the
    agent can tell its own domains from hand-made ones.

Parsing
    :func:`parse_domain_xml` reads our XML and what libvirt emits (``virsh dumpxml``: aliases, PCI addresses,
    ``<target dev='vnet0'/>``, live VNC ports, any memory unit). It keeps foreign values as plain strings;
    :func:`spec_from_parsed` is the strict step that turns them into a :class:`VmSpec` (``vm import``) and
    raises :class:`DomainXmlError` for what virtfleet cannot represent. :func:`domiflist` gives the rows
    of ``virsh domiflist``.

Conventions worth knowing
    * ``VmSpec.hugepage_size_kib``: ``None`` = no hugepages, ``0`` = hugepages of the host's default size
      (``<hugepages/>``), ``N`` = pages of N KiB.
    * ``max_vcpus`` / ``max_memory_mib`` come back as ``0`` from :func:`spec_from_parsed` when they equal
      the current value (the spec's "same as current" convention).
    * A VNC password is only in the XML when it was dumped with ``VIR_DOMAIN_XML_SECURE``
      (``virsh dumpxml --security-info``); otherwise ``ParsedGraphics.password_set`` is False.
"""

from __future__ import annotations

import re
import uuid as uuid_mod
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import NamedTuple, TypeVar

from common.errors import InvalidRequest
from common.messages.vm import (
    CacheMode,
    CpuTune,
    DiskBus,
    DiskDevice,
    DiskFormat,
    DiskSpec,
    DomainType,
    GraphicsSpec,
    IoMode,
    KernelBoot,
    NicKind,
    NicModel,
    NicSpec,
    VcpuPin,
    VmSpec,
)

__all__ = [
    "VF_NAMESPACE",
    "DomIfRow",
    "DomainXmlError",
    "ParsedDisk",
    "ParsedDomain",
    "ParsedGraphics",
    "ParsedNic",
    "SnapshotXml",
    "build_disk_xml",
    "build_domain_xml",
    "build_interface_xml",
    "build_snapshot_xml",
    "detach_disk_xml",
    "detach_interface_xml",
    "domiflist",
    "parse_domain_xml",
    "parse_snapshot_xml",
    "shared_disk_paths",
    "spec_from_parsed",
    "spec_from_xml",
    "unsafe_elements",
    "writable_disk_paths",
]

#: Namespace of virtfleet's ``<metadata>`` element; its presence marks a domain as managed by virtfleet.
VF_NAMESPACE = "https://virtfleet.dev/xmlns/domain/1"
_VF_PREFIX = "vf"
#: Namespace and prefix of the agent's own ``<metadata>`` element: the volumes it created for a domain.
OWNED_VOLUMES_NS = "https://virtfleet.dev/xmlns/agent-volumes/1"
OWNED_VOLUMES_PREFIX = "vfa"

# Characters XML 1.0 cannot carry at all (ElementTree would write them and produce unparsable XML).
_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")

# libvirt's memory units (virScaleInteger): b/bytes, k/KiB = 1024, KB = 1000, and so on up to E.
_UNIT_POWERS = {"k": 1, "m": 2, "g": 3, "t": 4, "p": 5, "e": 6}
_BINARY_FACTORS = {prefix: 1 << (10 * power) for prefix, power in _UNIT_POWERS.items()}
_DECIMAL_FACTORS = {prefix: int(f"1{'000' * power}") for prefix, power in _UNIT_POWERS.items()}

# Cache modes with which QEMU accepts aio=native (it needs O_DIRECT, i.e. cache.direct=on).
_NATIVE_IO_CACHES = frozenset({CacheMode.NONE, CacheMode.DIRECTSYNC})


_E = TypeVar("_E", bound=StrEnum)


class DomainXmlError(ValueError):
    """Domain XML that is malformed, lacks what virtfleet needs, or cannot be represented as a VmSpec."""


# ------------------------------------------------------------------------------------------------ parsed


@dataclass(frozen=True, slots=True)
class ParsedDisk:
    """One ``<disk>``. Values are libvirt's strings; ``None`` where the XML leaves them out."""

    target: str
    device: str  # disk, cdrom, floppy, lun
    source_type: str  # file, block, network, volume, ...
    path: str | None  # <source file=> or <source dev=>; None for an empty CD-ROM tray
    format: str | None  # <driver type=>
    bus: str | None
    cache: str | None
    io: str | None
    readonly: bool
    shareable: bool = False  # <shareable/>: meant to be used by several domains at once


@dataclass(frozen=True, slots=True)
class ParsedNic:
    """One ``<interface>``; ``target`` is the host tap (``vnet0``), present while the domain runs."""

    kind: str  # network, bridge, direct, user, ...
    source: str | None  # network name, bridge name or direct device
    model: str | None
    mac: str | None
    target: str | None


@dataclass(frozen=True, slots=True)
class ParsedGraphics:
    """A ``<graphics>`` console. ``port`` is None when libvirt picks it and the domain is not running."""

    type: str
    listen: str | None
    port: int | None
    autoport: bool
    password_set: bool
    password: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class ParsedDomain:
    """What virtfleet reads from domain XML (autostart is not part of the XML)."""

    uuid: str  # canonical lower-case form with dashes
    name: str
    domain_type: str
    vcpus: int  # current
    max_vcpus: int
    memory_mib: int  # currentMemory
    max_memory_mib: int  # memory
    managed: bool  # virtfleet's metadata is present
    arch: str | None = None
    machine: str | None = None
    description: str = ""
    cpuset: str | None = None
    cputune: CpuTune | None = None
    hugepage_size_kib: int | None = None  # 0 = hugepages of the host's default size
    kernel_boot: KernelBoot | None = None
    disks: tuple[ParsedDisk, ...] = ()
    nics: tuple[ParsedNic, ...] = ()
    graphics: ParsedGraphics | None = None  # the first VNC console, else the first console of any type
    serial_log: str | None = None  # <serial type='file'> source path
    #: vCPUs hot-added to the running domain (live XML ``<vcpus><vcpu enabled='yes' hotpluggable='yes'>``)
    hotplugged_vcpus: int = 0


class DomIfRow(NamedTuple):
    """One row of ``virsh domiflist``; ``-`` where libvirt prints it."""

    interface: str
    type: str
    source: str
    model: str
    mac: str


# ------------------------------------------------------------------------------------------------ building


def _checked(value: str, what: str) -> str:
    if _XML_INVALID.search(value):
        raise ValueError(f"{what} contains a character that XML cannot carry: {value!r}")
    return value


def _sub(
    parent: ET.Element,
    tag: str,
    attrs: Mapping[str, str | None] | None = None,
    text: str | None = None,
) -> ET.Element:
    """Append ``<tag>`` with the non-None attributes in the given order, and optional text."""
    child = ET.SubElement(parent, tag)
    for key, value in (attrs or {}).items():
        if value is not None:
            child.set(key, _checked(value, f"<{tag} {key}=>"))
    if text is not None:
        child.text = _checked(text, f"<{tag}>")
    return child


def _disk_element(disk: DiskSpec) -> ET.Element:
    if disk.path is None:
        hint = " (an empty CD-ROM tray is not supported)" if disk.device is DiskDevice.CDROM else ""
        raise ValueError(f"disk {disk.target}: no path; the agent must resolve the volume first{hint}")
    if disk.device is DiskDevice.CDROM and disk.bus is DiskBus.VIRTIO:
        raise ValueError(f"disk {disk.target}: a CD-ROM cannot be on the virtio bus (use ide, sata or scsi)")
    if disk.readonly and disk.device is DiskDevice.DISK and disk.bus in {DiskBus.IDE, DiskBus.SATA}:
        raise ValueError(
            f"disk {disk.target}: QEMU has no read-only {disk.bus.value} disks (use virtio or scsi)"
        )
    if disk.io is IoMode.NATIVE and disk.cache not in _NATIVE_IO_CACHES:
        raise ValueError(
            f"disk {disk.target}: io='native' needs cache 'none' or 'directsync', not {disk.cache.value!r}"
        )
    elem = ET.Element("disk", {"type": "file", "device": disk.device.value})
    _sub(
        elem,
        "driver",
        {
            "name": "qemu",
            "type": disk.format.value,
            "cache": disk.cache.value,
            "io": disk.io.value if disk.io is not None else None,
        },
    )
    _sub(elem, "source", {"file": disk.path})
    _sub(elem, "target", {"dev": disk.target, "bus": disk.bus.value})
    if disk.readonly or disk.device is DiskDevice.CDROM:
        _sub(elem, "readonly")
    return elem


def _interface_element(nic: NicSpec) -> ET.Element:
    elem = ET.Element("interface", {"type": nic.kind.value})
    if nic.mac is not None:
        _sub(elem, "mac", {"address": nic.mac.lower()})
    _sub(elem, "source", {nic.kind.value: nic.source})
    _sub(elem, "model", {"type": nic.model.value})
    return elem


def _graphics_element(graphics: GraphicsSpec) -> ET.Element:
    elem = ET.Element("graphics", {"type": "vnc"})
    if graphics.port is None:
        elem.set("port", "-1")
        elem.set("autoport", "yes")
    else:
        elem.set("port", str(graphics.port))
        elem.set("autoport", "no")
    elem.set("listen", _checked(graphics.listen, "VNC listen address"))
    if graphics.password is not None:
        elem.set("passwd", _checked(graphics.password, "VNC password"))
    _sub(elem, "listen", {"type": "address", "address": graphics.listen})
    return elem


def _serial_elements(devices: ET.Element, serial_log: str | None) -> None:
    kind = "pty" if serial_log is None else "file"
    for tag, target in (("serial", {"port": "0"}), ("console", {"type": "serial", "port": "0"})):
        elem = _sub(devices, tag, {"type": kind})
        if serial_log is not None:
            _sub(elem, "source", {"path": serial_log})
        _sub(elem, "target", target)


def _metadata_element(parent: ET.Element, owned_volumes: Sequence[str]) -> None:
    # The prefix is spelled out (no ET.register_namespace: that is process-global state) and declared on the
    # element itself, which is where libvirt expects the namespace of a metadata element.
    metadata = _sub(parent, "metadata")
    instance = _sub(metadata, f"{_VF_PREFIX}:instance", {f"xmlns:{_VF_PREFIX}": VF_NAMESPACE})
    _sub(instance, f"{_VF_PREFIX}:managed", text="true")
    if owned_volumes:
        volumes = _sub(
            metadata, f"{OWNED_VOLUMES_PREFIX}:volumes", {f"xmlns:{OWNED_VOLUMES_PREFIX}": OWNED_VOLUMES_NS}
        )
        for path in owned_volumes:
            _sub(volumes, f"{OWNED_VOLUMES_PREFIX}:volume", {"path": path})


def _os_element(parent: ET.Element, spec: VmSpec) -> None:
    os_elem = _sub(parent, "os")
    _sub(os_elem, "type", {"arch": spec.arch, "machine": spec.machine}, text="hvm")
    if spec.kernel_boot is not None:
        _sub(os_elem, "kernel", text=spec.kernel_boot.kernel)
        if spec.kernel_boot.initrd is not None:
            _sub(os_elem, "initrd", text=spec.kernel_boot.initrd)
        if spec.kernel_boot.cmdline:
            _sub(os_elem, "cmdline", text=spec.kernel_boot.cmdline)
        return
    if any(disk.device is DiskDevice.CDROM for disk in spec.disks):
        _sub(os_elem, "boot", {"dev": "cdrom"})
    _sub(os_elem, "boot", {"dev": "hd"})


def _tostring(elem: ET.Element) -> str:
    ET.indent(elem, space="  ")
    return ET.tostring(elem, encoding="unicode") + "\n"


def build_domain_xml(spec: VmSpec, owned_volumes: Sequence[str] = ()) -> str:
    """The libvirt domain XML for a resolved spec; raises ValueError for a disk without a path.

    ``owned_volumes``: the volumes the agent created for this VM, recorded in the agent's own
    metadata element (:data:`OWNED_VOLUMES_NS`) by the define itself, so that no later call is
    needed and no crash can leave the domain defined without them."""
    try:
        uuid_mod.UUID(spec.uuid)
    except ValueError:
        raise ValueError(f"VM {spec.name}: invalid uuid {spec.uuid!r}") from None
    root = ET.Element("domain", {"type": spec.domain_type.value})
    _sub(root, "name", text=spec.name)
    _sub(root, "uuid", text=spec.uuid)
    if spec.description:
        _sub(root, "description", text=spec.description)
    _metadata_element(root, owned_volumes)
    _sub(root, "memory", {"unit": "KiB"}, text=str(spec.effective_max_memory_mib * 1024))
    _sub(root, "currentMemory", {"unit": "KiB"}, text=str(spec.memory_mib * 1024))
    if spec.hugepage_size_kib is not None:
        hugepages = _sub(_sub(root, "memoryBacking"), "hugepages")
        if spec.hugepage_size_kib:
            _sub(hugepages, "page", {"size": str(spec.hugepage_size_kib), "unit": "KiB"})
    max_vcpus = spec.effective_max_vcpus
    _sub(
        root,
        "vcpu",
        {
            "placement": "static",
            "current": str(spec.vcpus) if spec.vcpus < max_vcpus else None,
            "cpuset": spec.cpuset,
        },
        text=str(max_vcpus),
    )
    if spec.cputune is not None and (spec.cputune.vcpu_pins or spec.cputune.emulator_cpuset is not None):
        cputune = _sub(root, "cputune")
        for pin in spec.cputune.vcpu_pins:
            if not 0 <= pin.vcpu < max_vcpus:
                raise ValueError(f"VM {spec.name}: vcpupin for vCPU {pin.vcpu}, but it has {max_vcpus} vCPUs")
            _sub(cputune, "vcpupin", {"vcpu": str(pin.vcpu), "cpuset": pin.cpuset})
        if spec.cputune.emulator_cpuset is not None:
            _sub(cputune, "emulatorpin", {"cpuset": spec.cputune.emulator_cpuset})
    _os_element(root, spec)
    features = _sub(root, "features")
    _sub(features, "acpi")  # without it QEMU's pci.0 refuses hot-plug
    _sub(features, "apic")
    _sub(root, "clock", {"offset": "utc"})
    _sub(root, "on_poweroff", text="destroy")
    _sub(root, "on_reboot", text="restart")
    _sub(root, "on_crash", text="destroy")

    devices = _sub(root, "devices")
    for disk in spec.disks:
        devices.append(_disk_element(disk))
    for nic in spec.nics:
        devices.append(_interface_element(nic))
    _serial_elements(devices, spec.serial_log)
    if spec.graphics is not None:
        _sub(devices, "input", {"type": "tablet", "bus": "usb"})
        devices.append(_graphics_element(spec.graphics))
    _sub(devices, "memballoon", {"model": "virtio"})
    return _tostring(root)


def build_disk_xml(disk: DiskSpec) -> str:
    """``<disk>`` device XML for ``attachDeviceFlags``, identical to the domain's element."""
    return _tostring(_disk_element(disk))


def build_interface_xml(nic: NicSpec) -> str:
    """``<interface>`` device XML for ``attachDeviceFlags``, identical to the domain's element."""
    return _tostring(_interface_element(nic))


# ------------------------------------------------------------------------------------------------ parsing


def _parse_root(xml: str) -> ET.Element:
    # libvirt never emits a DTD; refusing entity declarations rules out entity-expansion tricks in
    # operator-supplied files (ElementTree does not fetch external entities anyway).
    if "<!ENTITY" in xml or "<!DOCTYPE" in xml:
        raise DomainXmlError("domain XML must not contain a DOCTYPE or entity declarations")
    try:
        root = ET.fromstring(xml)  # noqa: S314 - see above
    except ET.ParseError as exc:
        raise DomainXmlError(f"malformed domain XML: {exc}") from None
    if root.tag != "domain":
        raise DomainXmlError(f"expected a <domain> root element, got <{root.tag}>")
    return root


def _required_text(root: ET.Element, tag: str) -> str:
    text = (root.findtext(tag) or "").strip()
    if not text:
        raise DomainXmlError(f"domain XML has no <{tag}>")
    return text


def _int(value: str | None, what: str) -> int:
    try:
        return int((value or "").strip())
    except ValueError:
        raise DomainXmlError(f"{what} is not an integer: {value!r}") from None


def _unit_factor(unit: str, what: str) -> int:
    lowered = unit.strip().lower()
    if lowered in {"b", "bytes"}:
        return 1
    prefix, rest = lowered[:1], lowered[1:]
    if prefix in _UNIT_POWERS:
        if rest in {"", "ib"}:
            return _BINARY_FACTORS[prefix]
        if rest == "b":
            return _DECIMAL_FACTORS[prefix]
    raise DomainXmlError(f"{what}: unknown unit {unit!r}")


def _size_kib(elem: ET.Element, what: str, default_unit: str = "KiB") -> int:
    value = _int(elem.text, what)
    return value * _unit_factor(elem.get("unit", default_unit), what) // 1024


def _memory_mib(root: ET.Element, tag: str) -> int | None:
    elem = root.find(tag)
    return None if elem is None else _size_kib(elem, f"<{tag}>") // 1024


def _parse_cputune(root: ET.Element) -> CpuTune | None:
    cputune = root.find("cputune")
    if cputune is None:
        return None
    pins = tuple(
        VcpuPin(vcpu=_int(pin.get("vcpu"), "<vcpupin vcpu=>"), cpuset=pin.get("cpuset", ""))
        for pin in cputune.findall("vcpupin")
    )
    emulator = cputune.find("emulatorpin")
    emulator_cpuset = emulator.get("cpuset") if emulator is not None else None
    if not pins and emulator_cpuset is None:
        return None
    return CpuTune(vcpu_pins=pins, emulator_cpuset=emulator_cpuset)


def _parse_hugepages(root: ET.Element) -> int | None:
    hugepages = root.find("memoryBacking/hugepages")
    if hugepages is None:
        return None
    page = hugepages.find("page")
    if page is None:
        return 0
    size = _int(page.get("size"), "<hugepages><page size=>")
    return size * _unit_factor(page.get("unit", "KiB"), "<hugepages><page unit=>") // 1024


def _parse_kernel_boot(os_elem: ET.Element | None) -> KernelBoot | None:
    if os_elem is None:
        return None
    kernel = (os_elem.findtext("kernel") or "").strip()
    if not kernel:
        return None
    initrd = (os_elem.findtext("initrd") or "").strip() or None
    return KernelBoot(kernel=kernel, initrd=initrd, cmdline=os_elem.findtext("cmdline") or "")


def _parse_disk(elem: ET.Element) -> ParsedDisk:
    target = elem.find("target")
    dev = target.get("dev") if target is not None else None
    if not dev:
        raise DomainXmlError("a <disk> has no <target dev=>")
    source = elem.find("source")
    path = None
    if source is not None:
        path = source.get("file") or source.get("dev") or source.get("name") or source.get("volume")
    driver = elem.find("driver")
    return ParsedDisk(
        target=dev,
        device=elem.get("device", "disk"),
        source_type=elem.get("type", "file"),
        path=path,
        format=driver.get("type") if driver is not None else None,
        bus=target.get("bus") if target is not None else None,
        cache=driver.get("cache") if driver is not None else None,
        io=driver.get("io") if driver is not None else None,
        readonly=elem.find("readonly") is not None,
        shareable=elem.find("shareable") is not None,
    )


def _lower_or_none(value: str | None) -> str | None:
    return value.strip().lower() or None if value else None


def _parse_nic(elem: ET.Element) -> ParsedNic:
    kind = elem.get("type", "")
    source = elem.find("source")
    source_name = None
    if source is not None:
        source_name = source.get(kind) or source.get("network") or source.get("bridge") or source.get("dev")
    mac = elem.find("mac")
    model = elem.find("model")
    target = elem.find("target")
    return ParsedNic(
        kind=kind,
        source=source_name,
        model=model.get("type") if model is not None else None,
        mac=_lower_or_none(mac.get("address")) if mac is not None else None,
        target=target.get("dev") if target is not None else None,
    )


def _parse_graphics(devices: ET.Element) -> ParsedGraphics | None:
    all_graphics = devices.findall("graphics")
    if not all_graphics:
        return None
    elem = next((g for g in all_graphics if g.get("type") == "vnc"), all_graphics[0])
    autoport = elem.get("autoport") == "yes"
    port_text = elem.get("port")
    port = _int(port_text, "<graphics port=>") if port_text is not None else None
    if port is not None and port < 0:
        port = None
    listen = elem.get("listen")
    if listen is None:
        listen_elem = elem.find("listen[@type='address']")
        listen = listen_elem.get("address") if listen_elem is not None else None
    password = elem.get("passwd")
    return ParsedGraphics(
        type=elem.get("type", ""),
        listen=listen,
        port=port,
        autoport=autoport if port_text is not None else True,
        password_set=password is not None,
        password=password,
    )


def parse_domain_xml(xml: str) -> ParsedDomain:
    """Parse our own or libvirt-generated domain XML; raises DomainXmlError when it is unusable."""
    root = _parse_root(xml)
    name = _required_text(root, "name")
    uuid_text = _required_text(root, "uuid")
    try:
        uuid = str(uuid_mod.UUID(uuid_text))
    except ValueError:
        raise DomainXmlError(f"domain {name}: invalid <uuid> {uuid_text!r}") from None

    max_memory = _memory_mib(root, "memory")
    if max_memory is None:
        raise DomainXmlError(f"domain {name}: no <memory>")
    current_memory = _memory_mib(root, "currentMemory")

    vcpu_elem = root.find("vcpu")
    max_vcpus = _int(vcpu_elem.text, "<vcpu>") if vcpu_elem is not None else 1
    current_attr = vcpu_elem.get("current") if vcpu_elem is not None else None
    vcpus = _int(current_attr, "<vcpu current=>") if current_attr is not None else max_vcpus

    os_elem = root.find("os")
    type_elem = os_elem.find("type") if os_elem is not None else None
    devices = root.find("devices")
    if devices is None:
        devices = ET.Element("devices")
    serial_source = devices.find("serial[@type='file']/source")
    managed_text = root.findtext(f"metadata/{{{VF_NAMESPACE}}}instance/{{{VF_NAMESPACE}}}managed") or ""
    managed = managed_text.strip() == "true"

    return ParsedDomain(
        uuid=uuid,
        name=name,
        domain_type=root.get("type", ""),
        vcpus=vcpus,
        max_vcpus=max_vcpus,
        memory_mib=current_memory if current_memory is not None else max_memory,
        max_memory_mib=max_memory,
        managed=managed,
        arch=type_elem.get("arch") if type_elem is not None else None,
        machine=type_elem.get("machine") if type_elem is not None else None,
        description=root.findtext("description") or "",
        cpuset=vcpu_elem.get("cpuset") if vcpu_elem is not None else None,
        cputune=_parse_cputune(root),
        hugepage_size_kib=_parse_hugepages(root),
        kernel_boot=_parse_kernel_boot(os_elem),
        disks=tuple(_parse_disk(d) for d in devices.findall("disk")),
        nics=tuple(_parse_nic(n) for n in devices.findall("interface")),
        graphics=_parse_graphics(devices),
        serial_log=serial_source.get("path") if serial_source is not None else None,
        hotplugged_vcpus=sum(
            1
            for v in root.findall("vcpus/vcpu")
            if v.get("enabled") == "yes" and v.get("hotpluggable") == "yes"
        ),
    )


def domiflist(parsed: ParsedDomain) -> tuple[DomIfRow, ...]:
    """The rows ``virsh domiflist`` prints: interface (tap), type, source, model, MAC."""
    return tuple(
        DomIfRow(
            interface=nic.target or "-",
            type=nic.kind or "-",
            source=nic.source or "-",
            model=nic.model or "-",
            mac=nic.mac or "-",
        )
        for nic in parsed.nics
    )


# ------------------------------------------------------------------------------------------------ import


def _enum(cls: type[_E], value: str, what: str) -> _E:
    try:
        return cls(value)
    except ValueError:
        allowed = ", ".join(member.value for member in cls)
        raise DomainXmlError(f"{what} {value!r} is not supported (virtfleet knows {allowed})") from None


def _default_bus(target: str) -> DiskBus:
    if target.startswith("vd"):
        return DiskBus.VIRTIO
    if target.startswith("hd"):
        return DiskBus.IDE
    return DiskBus.SCSI  # libvirt's choice for sdX without a bus


def _disk_spec(disk: ParsedDisk) -> DiskSpec:
    what = f"disk {disk.target}"
    if disk.source_type != "file":
        raise DomainXmlError(f"{what}: only file-backed disks can be imported, not type {disk.source_type!r}")
    device = _enum(DiskDevice, disk.device, f"{what}: device")
    return DiskSpec(
        target=disk.target,
        source="existing",
        # libvirt's default format for a file is raw; QEMU's default cache is writeback.
        format=_enum(DiskFormat, disk.format or "raw", f"{what}: format"),
        path=disk.path,
        bus=_enum(DiskBus, disk.bus, f"{what}: bus") if disk.bus else _default_bus(disk.target),
        device=device,
        cache=_enum(CacheMode, disk.cache or "writeback", f"{what}: cache"),
        io=_enum(IoMode, disk.io, f"{what}: io") if disk.io else None,
        # the builder marks every CD-ROM read-only by itself
        readonly=disk.readonly and device is not DiskDevice.CDROM,
    )


def _nic_spec(nic: ParsedNic, index: int) -> NicSpec:
    what = f"interface {index} ({nic.target or nic.mac or nic.kind})"
    kind = _enum(NicKind, nic.kind, f"{what}: type")
    if not nic.source:
        raise DomainXmlError(f"{what}: no source {kind.value}")
    # Without <model>, QEMU's pc machines use e1000.
    model = _enum(NicModel, nic.model or "e1000", f"{what}: model")
    return NicSpec(kind=kind, source=nic.source, model=model, mac=nic.mac)


def _graphics_spec(graphics: ParsedGraphics | None) -> GraphicsSpec | None:
    if graphics is None:
        return None
    if graphics.type != "vnc":
        raise DomainXmlError(f"graphics type {graphics.type!r} is not supported (virtfleet manages VNC only)")
    return GraphicsSpec(
        listen=graphics.listen or "127.0.0.1",  # GraphicsSpec's (and qemu.conf's) default
        port=None if graphics.autoport else graphics.port,
        password=graphics.password,
    )


#: libvirt's namespace for raw QEMU arguments and overrides (``qemu:commandline``, ``qemu:arg``...).
QEMU_NAMESPACE = "http://libvirt.org/schemas/domain/qemu/1.0"

#: Elements that give a guest (or QEMU) the host itself, refused on import: where each one is
#: looked for and why it is dangerous.
_UNSAFE_ELEMENTS: tuple[tuple[str, str], ...] = (
    ("devices/filesystem", "passes a host directory through to the guest"),
    ("devices/hostdev", "passes a host device through to the guest"),
    ("devices/redirdev", "redirects a host USB device"),
    ("devices/smartcard", "passes a host smartcard through"),
    ("devices/shmem", "shares host memory"),
    ("os/loader", "names a firmware file on the host"),
    ("os/nvram", "names a firmware variables file on the host"),
    ("os/dtb", "names a device tree file on the host"),
)

#: QEMU binaries libvirt picks by itself; an ``<emulator>`` naming another program is refused.
_DEFAULT_EMULATORS = re.compile(r"/usr/(bin/qemu-system-[a-z0-9_]+|bin/kvm|libexec/qemu-kvm)")


def unsafe_elements(xml: str) -> list[str]:
    """What in domain ``xml`` would reach beyond the VM's own images: one line per element
    (``<filesystem>: passes a host directory ...``). Empty when the XML is safe to import."""
    root = _parse_root(xml)
    found = [
        f"<{path.rsplit('/', 1)[-1]}> ({path}): {why}"
        for path, why in _UNSAFE_ELEMENTS
        if root.find(path) is not None
    ]
    for elem in root.iter():
        if isinstance(elem.tag, str) and elem.tag.startswith(f"{{{QEMU_NAMESPACE}}}"):
            tag = elem.tag.split("}", 1)[1]
            found.append(f"<qemu:{tag}>: passes raw arguments or overrides to QEMU")
            break
    for label in root.iter("seclabel"):
        if label.get("type") in ("none", "static") or label.get("relabel") == "no":
            found.append("<seclabel>: turns off or fixes the VM's security (sVirt) confinement")
            break
    emulator = (root.findtext("devices/emulator") or "").strip()
    if emulator and not _DEFAULT_EMULATORS.fullmatch(emulator):
        found.append(f"<emulator>{emulator}</emulator>: runs a program other than the host's QEMU")
    return found


def spec_from_xml(xml: str) -> VmSpec:
    """``vm import``: the validated spec of domain ``xml``; the domain defined is rebuilt from it
    (:func:`build_domain_xml`), never the XML as given. InvalidRequest names every element that
    cannot be expressed safely; DomainXmlError when the XML is not a usable domain."""
    unsafe = unsafe_elements(xml)
    if unsafe:
        raise InvalidRequest(
            "cannot import: the domain XML has element(s) virtfleet refuses: " + "; ".join(unsafe),
            details={"elements": unsafe},
        )
    return spec_from_parsed(parse_domain_xml(xml))


def spec_from_parsed(parsed: ParsedDomain) -> VmSpec:
    """The VmSpec for a parsed domain (``vm import``): disks become ``source='existing'`` images.

    Empty CD-ROM trays are left out (a DiskSpec cannot describe them); anything else virtfleet cannot
    represent (block or network disks, direct/user NICs, SPICE, foreign domain types) raises DomainXmlError.
    """
    try:
        disks = tuple(_disk_spec(d) for d in parsed.disks if not (d.device == "cdrom" and d.path is None))
        return VmSpec(
            uuid=parsed.uuid,
            name=parsed.name,
            vcpus=parsed.vcpus,
            memory_mib=parsed.memory_mib,
            max_vcpus=parsed.max_vcpus if parsed.max_vcpus != parsed.vcpus else 0,
            max_memory_mib=parsed.max_memory_mib if parsed.max_memory_mib != parsed.memory_mib else 0,
            domain_type=_enum(DomainType, parsed.domain_type, "domain type"),
            arch=parsed.arch or "x86_64",
            machine=parsed.machine,
            cpuset=parsed.cpuset,
            disks=disks,
            nics=tuple(_nic_spec(nic, i) for i, nic in enumerate(parsed.nics)),
            graphics=_graphics_spec(parsed.graphics),
            kernel_boot=parsed.kernel_boot,
            cputune=parsed.cputune,
            hugepage_size_kib=parsed.hugepage_size_kib,
            serial_log=parsed.serial_log,
            description=parsed.description,
        )
    except InvalidRequest as exc:
        raise DomainXmlError(f"domain {parsed.name} cannot be imported: {exc.message}") from exc


# ------------------------------------------------------------------------------------------------ devices


def writable_disk_paths(parsed: ParsedDomain) -> tuple[str, ...]:
    """Images the domain writes to: its disks, without CD-ROMs, read-only and shareable disks.

    These are the paths virt-install's ``path_in_use`` check protects: two guests writing one image
    corrupt it; sharing an ISO or a read-only image is normal.
    """
    return tuple(
        d.path
        for d in parsed.disks
        if d.path is not None and d.device == "disk" and not d.readonly and not d.shareable
    )


def shared_disk_paths(parsed: ParsedDomain) -> tuple[str, ...]:
    """Every image path of the domain (any device), for "who uses this file" questions."""
    return tuple(d.path for d in parsed.disks if d.path is not None)


def detach_disk_xml(disk: ParsedDisk) -> str:
    """Minimal ``<disk>`` XML that names ``disk`` for ``detachDeviceFlags`` (libvirt matches the target)."""
    elem = ET.Element("disk", {"type": disk.source_type, "device": disk.device})
    if disk.path is not None and disk.source_type in {"file", "block"}:
        _sub(elem, "source", {"file" if disk.source_type == "file" else "dev": disk.path})
    _sub(elem, "target", {"dev": disk.target, "bus": disk.bus})
    return _tostring(elem)


def detach_interface_xml(nic: ParsedNic) -> str:
    """Minimal ``<interface>`` XML that names ``nic`` for ``detachDeviceFlags`` (libvirt matches the MAC)."""
    if nic.mac is None:
        raise ValueError("an interface without a MAC address cannot be named for detaching")
    elem = ET.Element("interface", {"type": nic.kind})
    _sub(elem, "mac", {"address": nic.mac})
    if nic.source is not None and nic.kind in {"network", "bridge"}:
        _sub(elem, "source", {nic.kind: nic.source})
    return _tostring(elem)


# ------------------------------------------------------------------------------------------------ snapshots


@dataclass(frozen=True, slots=True)
class SnapshotXml:
    """What ``virsh snapshot-list`` / ``snapshot-info`` show of one snapshot."""

    name: str
    description: str
    state: str  # the domain's state when it was taken: running, shutoff, paused, disk-snapshot, ...
    created_at: float
    parent: str | None
    memory: bool  # the guest's RAM was saved too (a running snapshot)


def build_snapshot_xml(name: str, description: str = "") -> str:
    """``<domainsnapshot>`` for ``snapshotCreateXML``: an internal snapshot (libvirt's default for qcow2)."""
    root = ET.Element("domainsnapshot")
    _sub(root, "name", text=name)
    if description:
        _sub(root, "description", text=description)
    return _tostring(root)


def parse_snapshot_xml(xml: str) -> SnapshotXml:
    """Parse libvirt's ``<domainsnapshot>`` (``virDomainSnapshotGetXMLDesc``)."""
    if "<!ENTITY" in xml or "<!DOCTYPE" in xml:
        raise DomainXmlError("snapshot XML must not contain a DOCTYPE or entity declarations")
    try:
        root = ET.fromstring(xml)  # noqa: S314 - libvirt's own output; entities refused above
    except ET.ParseError as exc:
        raise DomainXmlError(f"malformed snapshot XML: {exc}") from None
    if root.tag != "domainsnapshot":
        raise DomainXmlError(f"expected a <domainsnapshot> root element, got <{root.tag}>")
    name = _required_text(root, "name")
    created = (root.findtext("creationTime") or "0").strip()
    memory = root.find("memory")
    return SnapshotXml(
        name=name,
        description=root.findtext("description") or "",
        state=(root.findtext("state") or "").strip(),
        created_at=float(_int(created, "<creationTime>")),
        parent=(root.findtext("parent/name") or "").strip() or None,
        memory=memory is not None and memory.get("snapshot") not in (None, "no"),
    )
