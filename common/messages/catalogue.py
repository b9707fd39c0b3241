"""Every message kind virtfleet sends: its body type, its result type and its timeout class.

One declarative table (like Ganeti's rpc_defs) so that senders, receivers and
docs/protocol.md agree. Agent commands go to ``virtfleet.agent.<host_id>``; API calls to
``virtfleet.api``; reports (no reply) to the ``virtfleet.reports`` exchange.
"""

from __future__ import annotations

from common.errors import InvalidRequest
from common.messages import api, host, network, placement, tuning, vm, vmops
from common.messages.kinds import TIMEOUT_SECONDS, Kind, Route, Timeout, kind

A, C, R = Route.AGENT, Route.API, Route.REPORT
F, N, S = Timeout.FAST, Timeout.NORMAL, Timeout.SLOW

KINDS: tuple[Kind, ...] = (
    # controller -> agent
    kind("vm.create", A, vm.CreateVm, vm.VmResult, N, "create disks, define the domain, start it"),
    kind("vm.start", A, vm.VmAction, vm.VmResult, N, "virsh start"),
    kind("vm.shutdown", A, vm.ShutdownVm, vm.VmResult, S, "virsh shutdown (ACPI), optional forced off"),
    kind("vm.destroy", A, vm.VmAction, vm.VmResult, N, "virsh destroy (power off)"),
    kind("vm.reboot", A, vm.VmAction, vm.VmResult, N, "virsh reboot"),
    kind("vm.suspend", A, vm.VmAction, vm.VmResult, F, "virsh suspend"),
    kind("vm.resume", A, vm.VmAction, vm.VmResult, F, "virsh resume"),
    kind("vm.delete", A, vm.DeleteVm, vm.VmResult, N, "virsh destroy + undefine (+ delete disks)"),
    kind("vm.autostart", A, vm.SetAutostart, vm.VmResult, F, "virsh autostart [--disable]"),
    kind("host.report_now", A, host.ReportRequest, host.ReportAck, F, "send a full report now"),
    # agent -> controller
    kind("host.report", R, host.HostReport, None, F, "capacity, topology and VM states"),
    kind("host.heartbeat", R, host.Heartbeat, None, F, "liveness"),
    # client -> controller
    kind("api.ping", C, api.Empty, api.Empty, F, "is a controller there"),
    kind("api.host.list", C, api.Empty, api.HostList, F, "virtfleet host list"),
    kind("api.host.show", C, api.HostRef, api.HostView, F, "virtfleet host show"),
    kind("api.vm.create", C, api.VmCreate, api.VmCreated, S, "virtfleet vm create"),
    kind("api.vm.list", C, api.VmListRequest, api.VmList, F, "virtfleet vm list"),
    kind("api.vm.show", C, api.VmRefRequest, api.VmView, F, "virtfleet vm show"),
    kind("api.vm.start", C, api.VmRefRequest, api.VmActionDone, N, "virtfleet vm start"),
    kind("api.vm.shutdown", C, api.VmShutdownRequest, api.VmActionDone, S, "virtfleet vm shutdown"),
    kind("api.vm.destroy", C, api.VmRefRequest, api.VmActionDone, N, "virtfleet vm destroy"),
    kind("api.vm.delete", C, api.VmDeleteRequest, api.VmActionDone, N, "virtfleet vm delete"),
)

# Feature families declare their own kinds next to their message types.
KINDS = KINDS + placement.KINDS + vmops.KINDS + network.KINDS + tuning.KINDS

CATALOGUE: dict[str, Kind] = {k.name: k for k in KINDS}
if len(CATALOGUE) != len(KINDS):
    raise RuntimeError("a message kind is declared twice")


def lookup(name: str) -> Kind:
    """The catalogue entry for a kind; InvalidRequest for an unknown one."""
    try:
        return CATALOGUE[name]
    except KeyError:
        raise InvalidRequest(f"unknown message kind {name!r}") from None


def timeout_for(name: str) -> float:
    """Seconds a caller waits for the reply to ``name``."""
    return TIMEOUT_SECONDS[lookup(name).timeout]


__all__ = ["CATALOGUE", "KINDS", "TIMEOUT_SECONDS", "Kind", "Route", "Timeout", "lookup", "timeout_for"]
