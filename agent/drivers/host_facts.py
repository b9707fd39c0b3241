"""Host facts outside libvirt: hardware virtualisation, bridges, simulated-host hints.

Pure parsers (unit-tested on captured text) plus thin readers of /proc, /sys and /dev.
"""

from __future__ import annotations

import contextlib
import os
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import unquote, urlsplit

PROC_CPUINFO = Path("/proc/cpuinfo")
DEV_KVM = Path("/dev/kvm")
SYS_CLASS_NET = Path("/sys/class/net")

_VIRT_FLAGS = frozenset({"vmx", "svm"})
_BYTES_PER_UNIT = {
    "b": 1,
    "bytes": 1,
    "k": 1024,
    "kib": 1024,
    "kb": 1000,
    "m": 1024**2,
    "mib": 1024**2,
    "mb": 1000**2,
    "g": 1024**3,
    "gib": 1024**3,
    "gb": 1000**3,
    "t": 1024**4,
    "tib": 1024**4,
    "tb": 1000**4,
}


# ----------------------------------------------------------------------------------------- pure


def cpu_has_virt_flags(cpuinfo_text: str) -> bool:
    """True when a ``flags`` line of /proc/cpuinfo lists vmx (Intel VT-x) or svm (AMD-V)."""
    for line in cpuinfo_text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags" and _VIRT_FLAGS & set(value.split()):
            return True
    return False


def is_test_uri(uri: str) -> bool:
    """True for libvirt's in-process test driver (``test:///default``, ``test:///path/node.xml``)."""
    return uri.startswith("test:")


def simulated_node_file(uri: str) -> Path | None:
    """The node file of a ``test:///abs/path.xml`` URI; None for ``test:///default`` or other drivers."""
    if not is_test_uri(uri):
        return None
    path = unquote(urlsplit(uri).path)
    if not path or path == "/default":
        return None
    return Path(path)


def version_string(number: int) -> str:
    """libvirt's packed version (major * 1,000,000 + minor * 1,000 + release) as ``major.minor.release``."""
    return f"{number // 1_000_000}.{number // 1_000 % 1_000}.{number % 1_000}"


def _size_bytes(elem: ET.Element) -> int | None:
    try:
        value = int((elem.text or "").strip())
    except ValueError:
        return None
    factor = _BYTES_PER_UNIT.get(elem.get("unit", "bytes").strip().lower())
    return None if factor is None else value * factor


def pool_capacity_from_node_xml(node_xml: str, pool_name: str) -> int | None:
    """Capacity in bytes of ``<pool><name>pool_name</name><capacity>`` in a test-driver node file.

    libvirt's test driver ignores that element and reports every pool as 100 GiB, so the agent
    takes the simulated pool size from the file itself. None when the pool or capacity is absent.
    """
    try:
        root = ET.fromstring(node_xml)  # noqa: S314 - our own fixture/operator file, no entities used
    except ET.ParseError:
        return None
    for pool in root.iter("pool"):
        if (pool.findtext("name") or "").strip() == pool_name:
            capacity = pool.find("capacity")
            return None if capacity is None else _size_bytes(capacity)
    return None


def cpu_model_from_capabilities(caps_xml: str) -> str | None:
    """``<capabilities><host><cpu><model>`` (e.g. EPYC-Rome), or None when libvirt does not say."""
    try:
        root = ET.fromstring(caps_xml)  # noqa: S314 - libvirt's own output
    except ET.ParseError:
        return None
    model = (root.findtext("host/cpu/model") or "").strip()
    return model or None


# ----------------------------------------------------------------------------------------- readers


def kvm_device_usable(path: Path = DEV_KVM) -> bool:
    """True when ``path`` exists and this process can open it read-write."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def detect_hw_virt(kvm_path: Path = DEV_KVM, cpuinfo_path: Path = PROC_CPUINFO) -> bool:
    """Hardware virtualisation usable: /dev/kvm opens read-write *and* the CPU has vmx or svm."""
    if not kvm_device_usable(kvm_path):
        return False
    try:
        return cpu_has_virt_flags(cpuinfo_path.read_text(encoding="utf-8", errors="replace"))
    except OSError:
        return False


def list_bridges(sys_class_net: Path = SYS_CLASS_NET) -> tuple[str, ...]:
    """Linux bridges on the host: interfaces that have a ``bridge/`` directory in sysfs."""
    with contextlib.suppress(OSError):
        return tuple(sorted(p.name for p in sys_class_net.iterdir() if (p / "bridge").is_dir()))
    return ()


def bridges_in_interface_xml(docs: Iterable[str]) -> tuple[str, ...]:
    """Names of the bridges among libvirt interface XML documents (``<interface type='bridge'>``).

    A simulated host (libvirt's test driver) has no sysfs of its own: the bridges it
    offers are the ``<interface type='bridge'>`` elements of its node file.
    """
    names = set()
    for doc in docs:
        try:
            root = ET.fromstring(doc)  # noqa: S314 - libvirt's own XML for its own host
        except ET.ParseError:
            continue
        if root.tag == "interface" and root.get("type") == "bridge" and root.get("name"):
            names.add(str(root.get("name")))
    return tuple(sorted(names))


def read_node_file_pool_capacity(uri: str, pool_name: str) -> int | None:
    """The simulated pool capacity (bytes) from a test:/// node file; None when not applicable."""
    node_file = simulated_node_file(uri)
    if node_file is None:
        return None
    try:
        return pool_capacity_from_node_xml(node_file.read_text(encoding="utf-8"), pool_name)
    except OSError:
        return None
