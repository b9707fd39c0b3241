"""The controller's API endpoint and report consumer: operation descriptors -> service methods.

Simple VM operations (:class:`~common.messages.VmForward`) and calls forwarded to a host's
agent (:class:`~common.messages.descriptor.ToHostAgent`) are served generically: every such
descriptor in the catalogue is registered here without a line of its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from common.messages import api, host
from common.messages.catalogue import CATALOGUE
from common.messages.descriptor import ApiCall, Side, ToHostAgent
from common.messages.vm import VmForward
from common.transport.rpc import Admission, Dispatcher, HandlerTable, RequestJournal
from controller import network, placement_ops, tuning, vmops
from controller.service import ControllerService


def api_handlers(service: ControllerService) -> HandlerTable:
    """What clients may call (the ``virtfleet.api`` queue)."""
    table = HandlerTable(Side.CONTROLLER)
    table.register(api.API_PING, lambda _body: api.Empty())
    table.register(api.API_HOST_LIST, lambda _body: service.list_hosts())
    table.register(api.API_HOST_SHOW, lambda body: service.show_host(body.host))
    table.register(api.API_VM_CREATE, service.create_vm)
    table.register(api.API_VM_LIST, service.list_vms)
    table.register(api.API_VM_SHOW, lambda body: service.show_vm(body.name))
    table.register(api.API_VM_SHUTDOWN, service.shutdown_vm)
    table.register(api.API_VM_DELETE, service.delete_vm)
    for op in CATALOGUE.values():
        if not isinstance(op, ApiCall):
            continue
        generic: ApiCall[Any, Any] = op
        if isinstance(op.forward, VmForward):
            table.register(generic, service.vm_action(generic))
        elif isinstance(op.forward, ToHostAgent):
            table.register(generic, service.forward_to_host(generic))
    # Feature areas register their own calls (one line each here).
    for register in (placement_ops.register, vmops.register, network.register, tuning.register):
        register(table, service)
    return table


def report_handlers(service: ControllerService) -> HandlerTable:
    """What agents publish (the reports and heartbeats queues)."""
    table = HandlerTable(Side.CONTROLLER)
    table.register(host.HOST_REPORT, service.record_report)
    table.register(host.HOST_HEARTBEAT, service.record_heartbeat)
    table.register(host.HOST_VM_CHANGES, service.record_vm_changes)
    return table


def api_dispatcher(
    service: ControllerService,
    sender: str,
    *,
    admit: Sequence[Admission] = (),
    extra: HandlerTable | None = None,
    journal: RequestJournal | None = None,
) -> Dispatcher:
    """The API's Dispatcher; ``admit``: admission checks (the role check), ``extra``: handlers that
    need more than the service (the audit log's), ``journal``: the request journal that answers
    redeliveries and retries (controller.request_journal)."""
    table = api_handlers(service)
    if extra is not None:
        table.update(extra)
    return Dispatcher(sender, table, admit=admit, journal=journal)


def report_dispatcher(service: ControllerService, sender: str, admit: Sequence[Admission] = ()) -> Dispatcher:
    """The reports and heartbeats consumer; ``admit``: the signature check of a signed fleet."""
    return Dispatcher(sender, report_handlers(service), admit=admit)
