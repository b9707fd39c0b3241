"""Disk helpers shared by the agent's handlers: volume names and "who uses this image" (virt-install's
``path_in_use`` check)."""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path

from agent.ports import Hypervisor
from common.domain_xml import OWNED_VOLUMES_NS as OWNED_VOLUMES_NS  # noqa: PLC0414 - re-exported
from common.domain_xml import DomainXmlError, parse_domain_xml, writable_disk_paths
from common.errors import InvalidRequest
from common.messages.vm import DiskFormat

_VOLUME_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def volume_name(vm_name: str, target: str, fmt: DiskFormat, explicit: str | None = None) -> str:
    """The pool volume of a new disk: ``explicit`` when given, else ``<vmname>-<target>.<fmt>``."""
    name = explicit or f"{vm_name}-{target}.{fmt.value}"
    if not _VOLUME_NAME_RE.fullmatch(name) or name in {".", ".."}:
        raise InvalidRequest(f"disk {target}: invalid volume name {name!r}")
    return name


def same_image(a: str, b: str) -> bool:
    """The same image file: equal normalised paths, or the same inode (symlinks, bind mounts)."""
    if os.path.normpath(a) == os.path.normpath(b):
        return True
    try:
        return Path(a).samefile(b)
    except OSError:
        return False


def disk_users(hv: Hypervisor, path: str, *, exclude_uuid: str | None = None) -> list[str]:
    """Names of the domains on this host (virtfleet's or hand-made) that write to image ``path``."""
    users = []
    for uuid, name, xmls in hv.domain_xmls():
        if exclude_uuid is not None and uuid.lower() == exclude_uuid.lower():
            continue
        for xml in xmls:
            try:
                paths = writable_disk_paths(parse_domain_xml(xml))
            except DomainXmlError:
                continue  # a domain we cannot read cannot be checked; libvirt will complain if it matters
            if any(same_image(p, path) for p in paths):
                users.append(name)
                break
    return sorted(users)


def in_use_message(path: str, users: list[str]) -> str:
    return (
        f"disk {path} is already in use by other guests {users!r}; two guests writing one image corrupt it "
        "(override with --allow-shared-disk if that is really intended)"
    )


def claimed_volumes(xml: str) -> tuple[str, ...]:
    """The volumes a domain XML says the agent created for it (``<metadata><vfa:volumes>``): what an
    exported VM brings back on import. Only a claim: the caller keeps those it can vouch for."""
    try:
        root = ET.fromstring(xml)  # noqa: S314 - parsed before by spec_from_xml, which refuses entities
    except ET.ParseError:
        return ()
    volumes = root.find(f"metadata/{{{OWNED_VOLUMES_NS}}}volumes")
    if volumes is None:
        return ()
    return tuple(p for v in volumes if (p := v.get("path")))
