"""Host and VM networking use cases.

Most ``api.net.*`` kinds are forwarded to the agent of ``body.host`` as the ``net.*`` kind of
the same name (the bodies are shared; the agent ignores ``host``). Host changes get a
``change_id`` here when the client sent none, so a redelivered command is recognised by the
agent. ``api.net.list`` and ``api.net.host.show`` answer from the hosts' last reports (the
``network`` facts in the database) unless ``live`` asks the agent.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from common.errors import NotFound
from common.messages.catalogue import CATALOGUE
from common.messages.network import (
    CHANGE_KINDS,
    FleetNetworkList,
    HostNetShow,
    HostNetworkEntry,
    HostNetworkReport,
    NetworkList,
    NetworkListRequest,
)
from common.schema import from_plain
from common.transport.rpc import HandlerFn
from controller.db import repository as repo
from controller.service import ControllerService

#: api kinds forwarded as they are (api.X -> X on the host's agent)
_FORWARDED = (
    "net.define",
    "net.start",
    "net.stop",
    "net.autostart",
    "net.undefine",
    "net.ip_forward",
    "net.bridge.create",
    "net.bridge.stp",
    "net.bridge.remove",
    "net.bond.create",
    "net.bond.enslave",
    "net.bond.remove",
    "net.host.confirm",
    "net.host.revert",
)


def _require_host(service: ControllerService, host: str) -> None:
    if not host:
        raise NotFound("no host given")
    with service.tx() as s:
        repo.get_host(s, host)  # NotFound for an unknown host


def reported_network(data: Any) -> HostNetworkReport | None:
    """The HostNetworkReport of a host record's ``network`` plain data (None before the first)."""
    if not data:
        return None
    return from_plain(HostNetworkReport, data, "network")


def _forward(service: ControllerService, agent_kind: str) -> HandlerFn:
    result_type = CATALOGUE[agent_kind].result
    assert result_type is not None

    def handle(body: Any) -> Any:
        _require_host(service, body.host)
        if agent_kind in CHANGE_KINDS and not body.change_id:
            body = replace(body, change_id=uuid.uuid4().hex)
        return service.agents.call(body.host, agent_kind, body, result_type)

    return handle


def list_networks(service: ControllerService, body: NetworkListRequest) -> FleetNetworkList:
    if body.live:
        _require_host(service, body.host)
        live = service.agents.call(body.host, "net.list", body, NetworkList)
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
        return service.agents.call(body.host, "net.host.facts", body, HostNetworkReport)
    with service.tx() as s:
        record = repo.get_host(s, body.host)
    report = reported_network(record.network)
    if report is None:
        return HostNetworkReport(errors=("this host has not reported network facts yet",))
    return report


def api_handlers(service: ControllerService) -> dict[str, HandlerFn]:
    """The API kinds of this feature area, bound to the service."""
    handlers: dict[str, Callable[[Any], Any]] = {f"api.{k}": _forward(service, k) for k in _FORWARDED}
    handlers["api.net.list"] = lambda body: list_networks(service, body)
    handlers["api.net.host.show"] = lambda body: show_host_network(service, body)
    return handlers
