"""VM operations beyond the basic lifecycle (issue: every VM operation of the ops notes):
snapshots, live vCPU/memory changes, disks and images, export/import, NICs."""

from __future__ import annotations

from common.messages.kinds import Kind

FAMILY_VERSION = "1.0"


#: The message kinds of this family (merged into common.messages.catalogue).
KINDS: tuple[Kind, ...] = ()
