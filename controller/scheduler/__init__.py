"""Pure placement of VMs on hypervisors: filters, weighers, N+1 and explanations.

No I/O, no database, no clock: the caller builds a :class:`FleetSnapshot` (with ``now``)
and gets back a :class:`Placement` or a :class:`Refusal` that names every host and every
rule that excluded it. A long-lived caller keeps a :class:`HostIndex` instead, upserts
host states as they change and calls :func:`place_indexed`, which decides the same
without walking the fleet. The package offers the model's public names (its
``__all__``) and the functions below.
"""

from controller.scheduler import model
from controller.scheduler.cpus import pick_pcpus
from controller.scheduler.index import HostIndex
from controller.scheduler.indexed import place_indexed
from controller.scheduler.model import *  # noqa: F403 - exactly model.__all__, offered again below
from controller.scheduler.place import apply_claim, apply_placement, explain, place

__all__ = ["HostIndex", "apply_claim", "apply_placement", "explain", "pick_pcpus", "place", "place_indexed"]
__all__ += model.__all__
