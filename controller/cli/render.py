"""Rendering of API answers: rich tables for people, one JSON document for scripts."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from common.errors import VirtfleetError
from common.messages import api
from common.messages.vm import VmActionDone, VmView


def emit_json(console: Console, data: Any) -> None:
    """One JSON document on stdout (stable field names: docs/cli.md)."""
    # The codec (and msgpack with it) only once there is an answer: the command modules import
    # this module, and their --help must not load it (docs/performance.md, "CLI start-up").
    from common.codec import to_wire  # noqa: PLC0415

    console.print_json(json.dumps(to_wire(data), sort_keys=True), highlight=False)


def _ago(ts: float | None) -> str:
    if ts is None:
        return "never"
    delta = max(0.0, time.time() - ts)
    return f"{delta:.0f}s ago" if delta < 120 else f"{delta / 60:.0f}m ago"


def hosts_table(hosts: Sequence[api.HostView]) -> Table:
    table = Table(title="hosts")
    for col in (
        "HOST",
        "STATUS",
        "ENABLED",
        "HYPERVISOR",
        "HW VIRT",
        "CPUS",
        "MEMORY MiB",
        "DISK GiB",
        "VMS",
        "HEARTBEAT",
    ):
        table.add_column(col)
    for h in hosts:
        status = h.status + (" (maintenance)" if h.maintenance else "")
        table.add_row(
            h.host_id,
            status,
            "yes" if h.enabled else "no",
            h.hypervisor_type,
            "yes" if h.hw_virt else "no",
            str(h.cpus),
            str(h.memory_mib),
            str(h.disk_gib),
            str(h.vm_count),
            _ago(h.last_heartbeat),
        )
    return table


def host_detail(h: api.HostView) -> list[Table]:
    info = Table(title=f"host {h.host_id}", show_header=False)
    info.add_column("field")
    info.add_column("value")
    rows = [
        ("hostname", h.hostname),
        ("status", h.status),
        ("enabled", "yes" if h.enabled else "no"),
        ("maintenance", "yes" if h.maintenance else "no"),
        ("reason", h.state_reason or "-"),
        ("hypervisor", h.hypervisor_type),
        ("libvirt uri", h.libvirt_uri),
        ("hardware virt", "yes" if h.hw_virt else "no"),
        ("cpus", str(h.cpus)),
        ("memory MiB", str(h.memory_mib)),
        ("disk GiB", str(h.disk_gib)),
        ("last heartbeat", _ago(h.last_heartbeat)),
        ("networks", ", ".join(h.networks) or "-"),
        ("bridges", ", ".join(h.bridges) or "-"),
        ("vms", ", ".join(h.vms) or "-"),
    ]
    for k, v in rows:
        info.add_row(k, v)
    res = Table(title="capacity")
    for col in ("RESOURCE", "TOTAL", "RESERVED", "RATIO", "CAPACITY", "USED", "FREE"):
        res.add_column(col)
    for r in h.resources:
        res.add_row(
            r.resource,
            str(r.total),
            str(r.reserved),
            f"{r.allocation_ratio:g}",
            str(r.capacity),
            str(r.used),
            str(r.free),
        )
    return [info, res]


def vms_table(vms: Sequence[VmView]) -> Table:
    table = Table(title="vms")
    for col in ("NAME", "HOST", "STATUS", "STATE", "VCPUS", "MEMORY MiB", "DISK GiB", "TASK"):
        table.add_column(col)
    for v in vms:
        table.add_row(
            v.name,
            v.host or "-",
            v.status,
            v.power_state,
            str(v.vcpus),
            str(v.memory_mib),
            str(v.disk_gib),
            v.task or "",
        )
    return table


def vm_detail(v: VmView) -> Table:
    table = Table(title=f"vm {v.name}", show_header=False)
    table.add_column("field")
    table.add_column("value")
    rows = [
        ("uuid", v.uuid),
        ("host", v.host or "-"),
        ("status", v.status),
        ("state", v.power_state),
        ("desired power", v.desired_power),
        ("vcpus", f"{v.vcpus} (max {v.max_vcpus})"),
        ("max memory", f"{v.max_memory_mib} MiB"),
        ("used memory", f"{v.memory_mib} MiB"),
        ("disk", f"{v.disk_gib} GiB"),
        ("cpu time", f"{v.cpu_time_ns / 1e9:.1f}s"),
        ("autostart", "enable" if v.autostart else "disable"),
        ("persistent", "yes" if v.persistent else "no"),
        ("task", v.task or "-"),
        ("last error", v.last_error or "-"),
    ]
    for k, val in rows:
        table.add_row(k, val)
    return table


def vm_action_done(console: Console, r: VmActionDone) -> None:
    """What a VM operation answered: the VM's power state afterwards (with the agent's words)."""
    if r.vm is not None:
        console.print(
            f"{r.vm.name}: {r.vm.power_state}" + (f" ({r.message})" if r.message else ""), highlight=False
        )
    else:
        console.print(r.message, highlight=False)


def placement_table(p: api.PlacementView, title: str) -> Table:
    table = Table(title=title)
    for col in ("RANK", "HOST", "SCORE", "WEIGHTS"):
        table.add_column(col)
    for i, c in enumerate(p.candidates, 1):
        weights = ", ".join(f"{k}={v:.2f}" for k, v in sorted(c.weights.items()))
        table.add_row(str(i), c.host, f"{c.score:.3f}", weights)
    for r in p.rejected:
        table.add_row("-", r.host, "rejected", r.message)
    return table


def error_document(exc: VirtfleetError) -> dict[str, Any]:
    return {"error": exc.to_wire()}


def styled(label: str, style: str, message: str) -> Text:
    """``label: message`` with the label styled and the message printed exactly as it is."""
    return Text.assemble((label, style), ": ", message)


def error_text(console: Console, exc: VirtfleetError) -> None:
    console.print(styled("error", "bold red", exc.message), highlight=False, soft_wrap=True)
    reasons = exc.details.get("reasons")
    if isinstance(reasons, list) and reasons:
        table = Table(title="why each host was excluded")
        for col in ("HOST", "RULE", "REASON"):
            table.add_column(col)
        for r in reasons:
            if isinstance(r, dict):
                table.add_row(str(r.get("host", "")), str(r.get("rule", "")), str(r.get("message", "")))
        console.print(table)
