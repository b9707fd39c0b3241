"""The controller's API endpoint and report consumer: message kinds -> service methods."""

from __future__ import annotations

from common.messages import api
from common.messages.host import Heartbeat, HostReport
from common.transport.rpc import Dispatcher, HandlerFn
from controller import network, placement_ops, tuning, vmops
from controller.service import ControllerService


def api_handlers(service: ControllerService) -> dict[str, HandlerFn]:
    """What the CLI may call (``virtfleet.api`` queue)."""

    def ping(_body: api.Empty) -> api.Empty:
        return api.Empty()

    def host_show(body: api.HostRef) -> api.HostView:
        return service.show_host(body.host)

    def host_list(_body: api.Empty) -> api.HostList:
        return service.list_hosts()

    def vm_show(body: api.VmRefRequest) -> api.VmView:
        return service.show_vm(body.name)

    def vm_start(body: api.VmRefRequest) -> api.VmActionDone:
        return service.start_vm(body.name)

    def vm_destroy(body: api.VmRefRequest) -> api.VmActionDone:
        return service.destroy_vm(body.name)

    core: dict[str, HandlerFn] = {
        "api.ping": ping,
        "api.host.list": host_list,
        "api.host.show": host_show,
        "api.vm.create": service.create_vm,
        "api.vm.list": service.list_vms,
        "api.vm.show": vm_show,
        "api.vm.start": vm_start,
        "api.vm.shutdown": service.shutdown_vm,
        "api.vm.destroy": vm_destroy,
        "api.vm.delete": service.delete_vm,
    }
    # Feature areas add their API kinds in their own modules (one line each here).
    for extra in (
        placement_ops.api_handlers(service),
        vmops.api_handlers(service),
        network.api_handlers(service),
        tuning.api_handlers(service),
    ):
        clash = set(extra) & set(core)
        if clash:
            raise ValueError(f"API kinds handled twice: {sorted(clash)}")
        core.update(extra)
    return core


def report_handlers(service: ControllerService) -> dict[str, HandlerFn]:
    """What agents publish (``virtfleet.controller.reports`` queue)."""

    def report(body: HostReport) -> None:
        service.record_report(body)

    def heartbeat(body: Heartbeat) -> None:
        service.record_heartbeat(body)

    return {"host.report": report, "host.heartbeat": heartbeat}


def api_dispatcher(service: ControllerService, sender: str) -> Dispatcher:
    return Dispatcher(sender, api_handlers(service))


def report_dispatcher(service: ControllerService, sender: str) -> Dispatcher:
    return Dispatcher(sender, report_handlers(service))
