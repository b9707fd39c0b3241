"""Performance tuning: CPU sets and pinning, hugepages, THP, IO schedulers."""

from __future__ import annotations

from dataclasses import dataclass

from common.messages.kinds import Kind

FAMILY_VERSION = "1.0"


@dataclass(frozen=True, slots=True)
class HostTuningReport:
    """Tuning facts an agent adds to its host report (CPU sets, topology, hugepages, IO)."""


#: The message kinds of this family (merged into common.messages.catalogue).
KINDS: tuple[Kind, ...] = ()
