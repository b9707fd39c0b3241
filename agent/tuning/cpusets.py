"""The agent's CPU sets (pure): which host CPUs go to dedicated VMs, to shared VMs and emulator
threads, and to the host alone.

Configured as cpuset strings (``dedicated_cpus``, ``shared_cpus``, ``reserved_cpus``) and
resolved against the online CPUs when the agent starts. Defaults: nothing dedicated, nothing
reserved, every other online CPU shared. The three sets must be disjoint, online, and the
shared set must not be empty (emulator threads of every VM run there).
"""

from __future__ import annotations

from dataclasses import dataclass

from common.cpuset import CpuSetSyntaxError, format_cpuset, parse_cpuset
from common.errors import InvalidRequest

SET_NAMES = ("dedicated_cpus", "shared_cpus", "reserved_cpus")


def parse_setting(name: str, value: str | None) -> frozenset[int] | None:
    """One configured set: None when not configured, ``""`` (or blanks) is the empty set."""
    if value is None:
        return None
    if not value.strip():
        return frozenset()
    try:
        return parse_cpuset(value)
    except CpuSetSyntaxError as exc:
        raise InvalidRequest(f"config {name}: {exc}") from None


def check_disjoint(sets: dict[str, frozenset[int] | None]) -> None:
    """InvalidRequest naming the CPUs two configured sets share."""
    names = [n for n in SET_NAMES if sets.get(n) is not None]
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            common = (sets[first] or frozenset()) & (sets[second] or frozenset())
            if common:
                raise InvalidRequest(
                    f"config {first} and {second} overlap on CPU(s) {format_cpuset(common)}: "
                    "a CPU belongs to one set only"
                )


@dataclass(frozen=True, slots=True)
class CpuSets:
    online: frozenset[int]
    dedicated: frozenset[int]
    shared: frozenset[int]
    reserved: frozenset[int]

    def allowed(self) -> frozenset[int]:
        """CPUs a VM thread may ever be pinned to (everything but the host's reserved CPUs)."""
        return self.dedicated | self.shared


def resolve(
    online: frozenset[int],
    dedicated: str | None = None,
    shared: str | None = None,
    reserved: str | None = None,
) -> CpuSets:
    """Resolve the configured sets against the online CPUs; InvalidRequest when they do not fit."""
    if not online:
        raise InvalidRequest("the host reports no online CPU")
    given = {
        "dedicated_cpus": parse_setting("dedicated_cpus", dedicated),
        "shared_cpus": parse_setting("shared_cpus", shared),
        "reserved_cpus": parse_setting("reserved_cpus", reserved),
    }
    check_disjoint(given)
    for name, cpus in given.items():
        offline = (cpus or frozenset()) - online
        if offline:
            raise InvalidRequest(
                f"config {name}: CPU(s) {format_cpuset(offline)} are not online "
                f"(online: {format_cpuset(online)})"
            )
    ded = given["dedicated_cpus"] or frozenset()
    res = given["reserved_cpus"] or frozenset()
    sha = given["shared_cpus"]
    if sha is None:
        sha = online - ded - res
    if not sha:
        raise InvalidRequest(
            "config shared_cpus: no CPU is left for shared VMs and emulator threads "
            f"(online {format_cpuset(online)}, dedicated {format_cpuset(ded) or 'none'}, "
            f"reserved {format_cpuset(res) or 'none'})"
        )
    return CpuSets(online=online, dedicated=ded, shared=sha, reserved=res)
