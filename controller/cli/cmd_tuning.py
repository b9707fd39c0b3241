"""CLI commands of the tuning feature area (registered on the groups of controller.cli.tree).

``vm pin`` / ``vm affinity``; ``host tuning``, ``host taskset``, ``host hugepages``,
``host io-scheduler``, ``host tune``. Every command calls one ``api.tuning.*`` kind.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from common.errors import InvalidRequest
from common.messages.api import HostRef
from common.messages.tuning import (
    API_TUNING_AFFINITY,
    API_TUNING_HUGEPAGES,
    API_TUNING_IO_SCHEDULER,
    API_TUNING_PIN,
    API_TUNING_SHOW,
    API_TUNING_TASKSET,
    API_TUNING_TUNE,
    HostHugepagesDone,
    HostHugepagesRequest,
    HostIoSchedulerDone,
    HostIoSchedulerRequest,
    HostTasksetDone,
    HostTasksetRequest,
    HostTuneDone,
    HostTuneRequest,
    HostTuningView,
    ThreadAffinity,
    VmAffinityView,
    VmPinRequest,
    page_size_label,
)
from common.messages.vm import VmRefRequest
from controller.cli.runner import State, fail, run, validated
from controller.cli.tree import host_app, vm_app

# ----------------------------------------------------------------------------- rendering


def _threads_table(title: str, threads: tuple[ThreadAffinity, ...]) -> Table:
    table = Table(title=title)
    for col in ("TID", "THREAD", "ROLE", "CPUS"):
        table.add_column(col)
    for t in threads:
        role = f"vCPU {t.vcpu}" if t.vcpu is not None else "emulator"
        table.add_row(str(t.tid), t.name, role, t.cpus)
    return table


def _show_affinity(s: State, r: VmAffinityView) -> None:
    a = r.affinity
    if r.message:
        s.out.print(f"{r.vm}: {r.message}", highlight=False)
    s.out.print(
        f"{r.vm} on {r.host}: policy {r.cpu_policy}"
        + (f", pCPUs {r.pcpus}" if r.pcpus else "")
        + f", may be pinned to {r.allowance or 'nothing'}; state {a.state}",
        highlight=False,
    )
    pins = Table(title="libvirt pinning (virsh vcpupin / emulatorpin)")
    pins.add_column("WHAT")
    pins.add_column("CPUS")
    for pin in a.vcpu_pins:
        pins.add_row(f"vCPU {pin.vcpu}", pin.cpuset or "-")
    pins.add_row("emulator", a.emulator_cpuset or "-")
    s.out.print(pins)
    if a.observed:
        s.out.print(_threads_table(f"QEMU process {a.pid} threads (taskset -p)", a.threads))
    else:
        s.out.print("no QEMU process to inspect (not running, or a simulated host)", highlight=False)


def _show_tuning(s: State, r: HostTuningView) -> None:
    f = r.facts
    if f is None:
        s.out.print(f"host {r.host} has not reported tuning facts", highlight=False)
        return
    simulated = " (simulated host)" if f.simulated else ""
    s.out.print(
        f"{r.host}{simulated}: {f.sockets} socket(s) x {f.cores_per_socket} core(s) x "
        f"{f.threads_per_core} thread(s), online CPUs {f.online_cpus}",
        highlight=False,
    )
    cpus = Table(title="CPU sets")
    for col in ("SET", "CPUS"):
        cpus.add_column(col)
    cpus.add_row("dedicated", f.dedicated_cpus or "-")
    cpus.add_row("  free", r.free_pcpus or "-")
    cpus.add_row("shared", f.shared_cpus or "-")
    cpus.add_row("reserved", f.reserved_cpus or "-")
    for cell in f.cells:
        cpus.add_row(f"NUMA cell {cell.id}", f"{cell.cpus} ({cell.memory_mib} MiB)")
    s.out.print(cpus)
    if r.pinned:
        pinned = Table(title="VMs holding CPUs")
        for col in ("VM", "POLICY", "PCPUS", "STATUS"):
            pinned.add_column(col)
        for vm in r.pinned:
            pinned.add_row(vm.name, vm.cpu_policy, vm.pcpus or "-", vm.status)
        s.out.print(pinned)
    pages = Table(title="hugepages")
    for col in ("SIZE", "TOTAL", "FREE", "RESERVED", "CLAIMED BY VMS", "HUGETLBFS"):
        pages.add_column(col)
    claimed = r.hugepages_claimed or {}
    for pool in f.hugepages:
        label = page_size_label(pool.size_kib)
        default = " (default)" if pool.size_kib == f.default_hugepage_kib else ""
        pages.add_row(
            label + default,
            str(pool.total),
            str(pool.free),
            str(pool.reserved),
            str(claimed.get(label, 0)),
            "mounted" if pool.mounted else "not mounted",
        )
    s.out.print(pages)
    s.out.print(f"transparent hugepages: enabled {f.thp_enabled}, defrag {f.thp_defrag}", highlight=False)
    io = Table(title="block devices")
    for col in ("DEVICE", "SCHEDULER", "AVAILABLE", "KIND"):
        io.add_column(col)
    for dev in f.block_devices:
        kind = ("rotational" if dev.rotational else "non-rotational") + ("" if dev.physical else ", virtual")
        io.add_row(dev.name, dev.scheduler, " ".join(dev.available), kind)
    s.out.print(io)


# ----------------------------------------------------------------------------- vm


@vm_app.command("pin")
def vm_pin(
    ctx: typer.Context,
    name: str,
    cpus: Annotated[str, typer.Option("--cpus", help="host CPUs, e.g. 2 or 2-3 (libvirt cpuset syntax)")],
    vcpu: Annotated[int | None, typer.Option("--vcpu", help="the vCPU to re-pin")] = None,
    emulator: Annotated[bool, typer.Option("--emulator", help="re-pin the emulator threads instead")] = False,
) -> None:
    """Re-pin a vCPU (or the emulator threads) of a running VM, live, within its allowance.

    A dedicated VM's vCPUs may move among its own pCPUs, a shared VM's among the host's shared
    CPUs; emulator threads stay on the shared CPUs.
    """
    body = validated(lambda: VmPinRequest(name=name, cpus=cpus, vcpu=vcpu, emulator=emulator), ctx)
    run(ctx, API_TUNING_PIN, body, _show_affinity)


@vm_app.command("affinity")
def vm_affinity(ctx: typer.Context, name: str) -> None:
    """Show a VM's pinning (libvirt) and each QEMU thread's CPU affinity (as taskset -p shows it)."""
    run(ctx, API_TUNING_AFFINITY, validated(lambda: VmRefRequest(name), ctx), _show_affinity)


# ----------------------------------------------------------------------------- host


@host_app.command("tuning")
def host_tuning(ctx: typer.Context, host: str) -> None:
    """Show a host's topology, CPU sets, hugepages, THP mode and IO schedulers."""
    run(ctx, API_TUNING_SHOW, HostRef(host), _show_tuning)


@host_app.command("taskset")
def host_taskset(
    ctx: typer.Context,
    host: str,
    pid: int,
    cpus: Annotated[str, typer.Option("--cpus", help="host CPUs for every thread of the process")],
) -> None:
    """taskset -a -pc CPUS PID, for the QEMU process of a VM virtfleet manages only."""

    def show(s: State, r: HostTasksetDone) -> None:
        before = {t.tid: t.cpus for t in r.result.before}
        table = Table(title=f"{r.vm}: QEMU process {r.result.pid} on {r.host}")
        for col in ("TID", "THREAD", "ROLE", "BEFORE", "AFTER"):
            table.add_column(col)
        for t in r.result.after:
            role = f"vCPU {t.vcpu}" if t.vcpu is not None else "emulator"
            table.add_row(str(t.tid), t.name, role, before.get(t.tid, "-"), t.cpus)
        s.out.print(table)

    body = validated(lambda: HostTasksetRequest(host=host, pid=pid, cpus=cpus), ctx)
    run(ctx, API_TUNING_TASKSET, body, show)


@host_app.command("hugepages")
def host_hugepages(
    ctx: typer.Context,
    host: str,
    count: Annotated[int, typer.Option("--count", help="pages in the pool (0 empties it)")],
    size: Annotated[str, typer.Option("--size", help="page size: 2M or 1G")] = "2M",
) -> None:
    """Set a host's hugepage pool of one page size (the kernel may give fewer pages)."""

    def show(s: State, r: HostHugepagesDone) -> None:
        s.out.print(f"{r.host}: {r.result.message}", highlight=False)

    body = validated(lambda: HostHugepagesRequest(host=host, size=size, count=count), ctx)
    run(ctx, API_TUNING_HUGEPAGES, body, show)


@host_app.command("io-scheduler")
def host_io_scheduler(ctx: typer.Context, host: str, device: str, scheduler: str) -> None:
    """Set a block device's IO scheduler (none, mq-deadline, kyber, bfq: what the kernel offers)."""

    def show(s: State, r: HostIoSchedulerDone) -> None:
        res = r.result
        s.out.print(
            f"{r.host}: {res.device} IO scheduler {res.before} -> {res.after} "
            f"(available: {' '.join(res.available)})",
            highlight=False,
        )

    body = validated(lambda: HostIoSchedulerRequest(host=host, device=device, scheduler=scheduler), ctx)
    run(ctx, API_TUNING_IO_SCHEDULER, body, show)


def _hugepage_targets(values: list[str], ctx: typer.Context) -> dict[str, int]:
    out: dict[str, int] = {}
    for value in values:
        size, sep, count = value.partition("=")
        if not sep or not count.strip().isdigit():
            exc = InvalidRequest(f"--hugepages takes SIZE=COUNT such as 2M=512, got {value!r}")
            raise fail(ctx.obj, exc)
        out[size.strip().upper()] = int(count)
    return out


@host_app.command("tune")
def host_tune(
    ctx: typer.Context,
    host: str,
    profile: Annotated[str, typer.Option("--profile", help="virt-host")] = "virt-host",
    hugepages: Annotated[
        list[str] | None, typer.Option("--hugepages", help="grow a pool to SIZE=COUNT, e.g. 2M=512")
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="show what would change")] = False,
) -> None:
    """Apply a documented host profile (idempotent) and show what it changed."""

    def show(s: State, r: HostTuneDone) -> None:
        res = r.result
        verb = "would change" if res.dry_run else "changed"
        table = Table(title=f"{r.host}: profile {res.profile}")
        for col in ("SETTING", "BEFORE", "AFTER", "CHANGED", "NOTE"):
            table.add_column(col)
        for c in res.changes:
            table.add_row(c.setting, c.before, c.after, "yes" if c.changed else "no", c.note)
        s.out.print(table)
        count = sum(1 for c in res.changes if c.changed)
        s.out.print(f"{verb} {count} setting(s)" if count else "nothing to change", highlight=False)

    targets = _hugepage_targets(hugepages or [], ctx)
    body = validated(
        lambda: HostTuneRequest(host=host, profile=profile, hugepages=targets or None, dry_run=dry_run), ctx
    )
    run(ctx, API_TUNING_TUNE, body, show)
