"""Host and VM networking: libvirt networks, host bridges and bonds, safe changes."""

from __future__ import annotations

from dataclasses import dataclass

from common.messages.kinds import Kind

FAMILY_VERSION = "1.0"


@dataclass(frozen=True, slots=True)
class HostNetworkReport:
    """Network facts an agent adds to its host report (interfaces, bridges, bonds, routes)."""


#: The message kinds of this family (merged into common.messages.catalogue).
KINDS: tuple[Kind, ...] = ()
