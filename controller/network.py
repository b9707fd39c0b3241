"""Host and VM networking use cases.

Most ``api.net.*`` calls are forwarded unchanged to the agent of ``body.host`` (declared with
``host_twin`` in :mod:`common.messages.network`, served by
:meth:`controller.service.ControllerService.forward_to_host`). ``api.net.list`` and
``api.net.host.show`` answer from the hosts' last reports (the ``network`` facts in the
database) unless ``live`` asks the agent.
"""

from __future__ import annotations

from typing import Any

from common.codec import from_wire
from common.errors import NotFound
from common.messages import network as msgs
from common.messages.network import (
    FleetNetworkList,
    HostNetShow,
    HostNetworkEntry,
    HostNetworkReport,
    NetworkListRequest,
)
from common.transport.rpc import HandlerTable
from controller.db import repository as repo
from controller.service import ControllerService


def _require_host(service: ControllerService, host: str) -> None:
    if not host:
        raise NotFound("no host given")
    with service.tx() as s:
        repo.get_host(s, host)  # NotFound for an unknown host


def reported_network(data: Any) -> HostNetworkReport | None:
    """The HostNetworkReport of a host record's ``network`` plain data (None before the first)."""
    if not data:
        return None
    return from_wire(HostNetworkReport, data, "network")


def list_networks(service: ControllerService, body: NetworkListRequest) -> FleetNetworkList:
    if body.live:
        _require_host(service, body.host)
        live = service.agents.call(body.host, msgs.NET_LIST, body)
        return FleetNetworkList(tuple(HostNetworkEntry(body.host, n) for n in live.networks))
    with service.tx() as s:
        records = [repo.get_host(s, body.host)] if body.host else repo.list_hosts(s)
    entries = []
    for record in records:
        report = reported_network(record.network)
        if report is not None:
            entries += [HostNetworkEntry(record.id, n) for n in report.networks]
    return FleetNetworkList(tuple(entries))


def show_host_network(service: ControllerService, body: HostNetShow) -> HostNetworkReport:
    _require_host(service, body.host)
    if body.live:
        return service.agents.call(body.host, msgs.NET_HOST_FACTS, body)
    with service.tx() as s:
        record = repo.get_host(s, body.host)
    report = reported_network(record.network)
    if report is None:
        return HostNetworkReport(errors=("this host has not reported network facts yet",))
    return report


def register(table: HandlerTable, service: ControllerService) -> None:
    """Serve the network API calls that read reported facts (the changes are forwarded generically)."""
    table.register(msgs.API_NET_LIST, lambda body: list_networks(service, body))
    table.register(msgs.API_NET_HOST_SHOW, lambda body: show_host_network(service, body))
