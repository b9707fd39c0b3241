"""Every message kind virtfleet sends: its body type, its result type and its timeout class.

One declarative table (like Ganeti's rpc_defs) so that senders, receivers and
docs/protocol.md agree. Agent commands go to ``virtfleet.agent.<host_id>``; API calls to
``virtfleet.api``; reports (no reply) to the ``virtfleet.reports`` exchange.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from common.errors import InvalidRequest
from common.messages import api, host, vm


class Timeout(StrEnum):
    """Timeout classes: a command's seconds come from its class, not from each call site."""

    FAST = "fast"  # lookups and state flips: 30 s
    NORMAL = "normal"  # domain define/start, disk create: 120 s
    SLOW = "slow"  # shutdown with a guest-side timeout, image conversion: 600 s


TIMEOUT_SECONDS: dict[Timeout, float] = {Timeout.FAST: 30.0, Timeout.NORMAL: 120.0, Timeout.SLOW: 600.0}


class Route(StrEnum):
    AGENT = "agent"  # controller -> agent, reply expected
    API = "api"  # client -> controller, reply expected
    REPORT = "report"  # agent -> controller, no reply


@dataclass(frozen=True, slots=True)
class Kind:
    name: str
    route: Route
    body: type[Any]
    result: type[Any] | None
    timeout: Timeout
    doc: str


def _k(
    name: str, route: Route, body: type[Any], result: type[Any] | None, timeout: Timeout, doc: str
) -> Kind:
    return Kind(name, route, body, result, timeout, doc)


A, C, R = Route.AGENT, Route.API, Route.REPORT
F, N, S = Timeout.FAST, Timeout.NORMAL, Timeout.SLOW

KINDS: tuple[Kind, ...] = (
    # controller -> agent
    _k("vm.create", A, vm.CreateVm, vm.VmResult, N, "create disks, define the domain, start it"),
    _k("vm.start", A, vm.VmAction, vm.VmResult, N, "virsh start"),
    _k("vm.shutdown", A, vm.ShutdownVm, vm.VmResult, S, "virsh shutdown (ACPI), optional forced off"),
    _k("vm.destroy", A, vm.VmAction, vm.VmResult, N, "virsh destroy (power off)"),
    _k("vm.reboot", A, vm.VmAction, vm.VmResult, N, "virsh reboot"),
    _k("vm.suspend", A, vm.VmAction, vm.VmResult, F, "virsh suspend"),
    _k("vm.resume", A, vm.VmAction, vm.VmResult, F, "virsh resume"),
    _k("vm.delete", A, vm.DeleteVm, vm.VmResult, N, "virsh destroy + undefine (+ delete disks)"),
    _k("vm.autostart", A, vm.SetAutostart, vm.VmResult, F, "virsh autostart [--disable]"),
    _k("host.report_now", A, host.ReportRequest, host.ReportAck, F, "send a full report now"),
    # agent -> controller
    _k("host.report", R, host.HostReport, None, F, "capacity, topology and VM states"),
    _k("host.heartbeat", R, host.Heartbeat, None, F, "liveness"),
    # client -> controller
    _k("api.ping", C, api.Empty, api.Empty, F, "is a controller there"),
    _k("api.host.list", C, api.Empty, api.HostList, F, "virtfleet host list"),
    _k("api.host.show", C, api.HostRef, api.HostView, F, "virtfleet host show"),
    _k("api.vm.create", C, api.VmCreate, api.VmCreated, S, "virtfleet vm create"),
    _k("api.vm.list", C, api.VmListRequest, api.VmList, F, "virtfleet vm list"),
    _k("api.vm.show", C, api.VmRefRequest, api.VmView, F, "virtfleet vm show"),
    _k("api.vm.start", C, api.VmRefRequest, api.VmActionDone, N, "virtfleet vm start"),
    _k("api.vm.shutdown", C, api.VmShutdownRequest, api.VmActionDone, S, "virtfleet vm shutdown"),
    _k("api.vm.destroy", C, api.VmRefRequest, api.VmActionDone, N, "virtfleet vm destroy"),
    _k("api.vm.delete", C, api.VmDeleteRequest, api.VmActionDone, N, "virtfleet vm delete"),
)

CATALOGUE: dict[str, Kind] = {k.name: k for k in KINDS}


def lookup(name: str) -> Kind:
    """The catalogue entry for a kind; InvalidRequest for an unknown one."""
    try:
        return CATALOGUE[name]
    except KeyError:
        raise InvalidRequest(f"unknown message kind {name!r}") from None


def timeout_for(name: str) -> float:
    """Seconds a caller waits for the reply to ``name``."""
    return TIMEOUT_SECONDS[lookup(name).timeout]
