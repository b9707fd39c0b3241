"""Pure placement of VMs on hypervisors: filters, weighers, N+1 and explanations.

No I/O, no database, no clock: the caller builds a :class:`FleetSnapshot` (with ``now``)
and gets back a :class:`Placement` or a :class:`Refusal` that names every host and every
rule that excluded it.
"""

from controller.scheduler.cpus import pick_pcpus
from controller.scheduler.model import (
    Candidate,
    FleetSnapshot,
    FrozenMap,
    GroupPolicy,
    HostRejection,
    HostState,
    Inventory,
    Placement,
    PlacementPolicy,
    PlacementRequest,
    Refusal,
    ResourceClass,
    Rule,
    ServerGroup,
    Strategy,
    UnknownServerGroupError,
)
from controller.scheduler.place import apply_claim, apply_placement, explain, place

__all__ = [
    "Candidate",
    "FleetSnapshot",
    "FrozenMap",
    "GroupPolicy",
    "HostRejection",
    "HostState",
    "Inventory",
    "Placement",
    "PlacementPolicy",
    "PlacementRequest",
    "Refusal",
    "ResourceClass",
    "Rule",
    "ServerGroup",
    "Strategy",
    "UnknownServerGroupError",
    "apply_claim",
    "apply_placement",
    "explain",
    "pick_pcpus",
    "place",
]
