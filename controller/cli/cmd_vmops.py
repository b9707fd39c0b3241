"""CLI commands of the vmops feature area (registered on the groups of controller.cli.tree).

``vm autostart|console|export|import|setvcpus|setmem|memstat``,
``vm snapshot create|list|revert|delete``, ``vm disk attach|detach|resize``,
``vm nic attach|detach|list`` and ``image create|info|convert``. docs/operations.md maps each one
to the virsh / qemu-img command of the ops notes it replaces.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from common.errors import InvalidRequest
from common.messages import api
from common.messages.vm import (
    CacheMode,
    DiskBus,
    DiskFormat,
    IoMode,
    NicKind,
    NicModel,
    VmActionDone,
    VmRefRequest,
)
from common.messages.vmops import (
    API_IMAGE_CONVERT,
    API_IMAGE_CREATE,
    API_IMAGE_INFO,
    API_VM_AUTOSTART,
    API_VM_CONSOLE,
    API_VM_DISK_ATTACH,
    API_VM_DISK_DETACH,
    API_VM_DISK_RESIZE,
    API_VM_EXPORT,
    API_VM_EXPORT_SECURE,
    API_VM_IMPORT,
    API_VM_MEMSTAT,
    API_VM_NIC_ATTACH,
    API_VM_NIC_DETACH,
    API_VM_NIC_LIST,
    API_VM_SETMEM,
    API_VM_SETVCPUS,
    API_VM_SNAPSHOT_CREATE,
    API_VM_SNAPSHOT_DELETE,
    API_VM_SNAPSHOT_LIST,
    API_VM_SNAPSHOT_REVERT,
    ConsoleView,
    ImageConvertRequest,
    ImageCreateRequest,
    ImageInfoApiRequest,
    ImageLocation,
    ImageView,
    MemStatView,
    NicListView,
    SnapshotCreateRequest,
    SnapshotListView,
    SnapshotRequest,
    VmAutostartRequest,
    VmDiskAttachRequest,
    VmDiskDetachRequest,
    VmDiskResizeRequest,
    VmExport,
    VmExportRequest,
    VmImportRequest,
    VmNicAttachRequest,
    VmNicDetachRequest,
    VmSetMemoryRequest,
    VmSetVcpusRequest,
)
from controller.cli import render
from controller.cli.runner import State, fail, run, validated
from controller.cli.tree import image_app, vm_app
from controller.cli.vm_options import cache_warning

snapshot_app = typer.Typer(help="VM snapshots (qcow2 disks only).", no_args_is_help=True)
disk_app = typer.Typer(help="A VM's disks: attach, detach, resize.", no_args_is_help=True)
nic_app = typer.Typer(help="A VM's network interfaces.", no_args_is_help=True)
vm_app.add_typer(snapshot_app, name="snapshot")
vm_app.add_typer(disk_app, name="disk")
vm_app.add_typer(nic_app, name="nic")

LiveOpt = Annotated[bool, typer.Option("--live", help="change the running VM (only it, unless --config too)")]
ConfigOpt = Annotated[
    bool, typer.Option("--config", help="change the definition (only it, unless --live too)")
]


def scope(live: bool, config: bool) -> tuple[bool | None, bool]:
    """``virsh`` semantics: neither flag = the running VM if it runs, and the definition."""
    if not live and not config:
        return None, True
    return live, config


def _done(s: State, r: VmActionDone) -> None:
    render.vm_action_done(s.out, r)


def _ref(ctx: typer.Context, name: str) -> VmRefRequest:
    body: VmRefRequest = validated(lambda: VmRefRequest(name), ctx)
    return body


# ----------------------------------------------------------------------------- lifecycle


@vm_app.command("autostart")
def vm_autostart(
    ctx: typer.Context,
    name: str,
    disable: Annotated[bool, typer.Option("--disable", help="do not start it with its host")] = False,
) -> None:
    """Start the VM when its host boots (virsh autostart [--disable])."""
    body = validated(lambda: VmAutostartRequest(name, enabled=not disable), ctx)

    def show(s: State, r: VmActionDone) -> None:
        if r.vm is not None:
            s.out.print(f"{r.vm.name}: autostart {'on' if r.vm.autostart else 'off'}", highlight=False)

    run(ctx, API_VM_AUTOSTART, body, show)


@vm_app.command("console")
def vm_console(ctx: typer.Context, name: str) -> None:
    """Where the VM's VNC console listens: HOST:PORT for a VNC viewer."""

    def show(s: State, r: ConsoleView) -> None:
        if not r.address:
            s.out.print(f"{r.name}: {r.type} console on host {r.host}; no port yet (the VM is not running)")
            return
        s.out.print(r.address, highlight=False)
        if r.listen in {"127.0.0.1", "::1", "localhost"}:
            s.err.print(
                f"note: it listens on {r.listen} of host {r.host} only: tunnel to it, e.g. "
                f"ssh -L {r.port}:{r.listen}:{r.port} {r.hostname}",
                highlight=False,
            )
        if r.password_set:
            s.err.print("note: the console is password protected", highlight=False)

    run(ctx, API_VM_CONSOLE, _ref(ctx, name), show)


# ----------------------------------------------------------------------------- export / import


@vm_app.command("export")
def vm_export(
    ctx: typer.Context,
    name: str,
    secure: Annotated[
        bool,
        typer.Option("--secure", help="include secrets such as the VNC password (virsh --security-info)"),
    ] = False,
    live: Annotated[
        bool, typer.Option("--live", help="the running VM's XML instead of its definition")
    ] = False,
) -> None:
    """Print the VM's libvirt XML (virsh dumpxml): virtfleet vm export NAME > backup.xml."""
    body = validated(lambda: VmExportRequest(name, secure=secure, live=live), ctx)

    def show(s: State, r: VmExport) -> None:
        s.out.file.write(r.xml if r.xml.endswith("\n") else r.xml + "\n")
        s.out.file.flush()

    # The secrets are an admin's call of their own (api.vm.export_secure).
    run(ctx, API_VM_EXPORT_SECURE if secure else API_VM_EXPORT, body, show)


@vm_app.command("import")
def vm_import(
    ctx: typer.Context,
    file: Annotated[
        str, typer.Argument(help="libvirt domain XML (from vm export or virsh dumpxml); - for stdin")
    ],
    host: Annotated[
        str | None, typer.Option(help="define it on this host (default: the scheduler decides)")
    ] = None,
    start: Annotated[bool, typer.Option("--start", help="start it once defined")] = False,
    allow_shared_disk: Annotated[
        bool, typer.Option("--allow-shared-disk", help="allow images another guest already uses")
    ] = False,
) -> None:
    """Define a VM from its XML (virsh define backup.xml), placed like a new VM."""
    state: State = ctx.obj
    try:
        xml = state.stdin.read() if file == "-" else Path(file).read_text(encoding="utf-8")
    except OSError as exc:
        raise fail(state, InvalidRequest(f"cannot read {file}: {exc.strerror}")) from None
    body = validated(
        lambda: VmImportRequest(xml, host=host, start=start, allow_shared_disk=allow_shared_disk), ctx
    )

    def show(s: State, r: api.VmCreated) -> None:
        assert r.vm is not None
        s.out.print(f"{r.vm.name} imported on host {r.vm.host} ({r.vm.power_state})", highlight=False)

    run(ctx, API_VM_IMPORT, body, show)


# ----------------------------------------------------------------------------- live changes


@vm_app.command("setvcpus")
def vm_setvcpus(ctx: typer.Context, name: str, vcpus: int) -> None:
    """Set the vCPU count (virsh setvcpus --live --config): a running VM can only gain vCPUs."""
    body = validated(lambda: VmSetVcpusRequest(name, vcpus), ctx)
    run(ctx, API_VM_SETVCPUS, body, _done)


@vm_app.command("setmem")
def vm_setmem(ctx: typer.Context, name: str, memory: Annotated[int, typer.Argument(help="MiB")]) -> None:
    """Set the memory (balloon) within the VM's max memory (the notes' qemu-monitor-command balloon)."""
    body = validated(lambda: VmSetMemoryRequest(name, memory), ctx)
    run(ctx, API_VM_SETMEM, body, _done)


@vm_app.command("memstat")
def vm_memstat(ctx: typer.Context, name: str) -> None:
    """The balloon's current value (info balloon) and the guest's memory statistics."""

    def show(s: State, r: MemStatView) -> None:
        actual = "-" if r.balloon_kib is None else f"{r.balloon_kib // 1024}"
        s.out.print(f"balloon: actual={actual}", highlight=False)
        table = Table(title=f"memory of {r.name} (KiB)", show_header=False)
        table.add_column("stat")
        table.add_column("value")
        table.add_row("max memory", str(r.max_memory_mib * 1024))
        table.add_row("used memory", str(r.memory_mib * 1024))
        for key, value in sorted(r.stats.items()):
            table.add_row(key, str(value))
        s.out.print(table)

    run(ctx, API_VM_MEMSTAT, _ref(ctx, name), show)


# ----------------------------------------------------------------------------- snapshots


def _snapshots_table(r: SnapshotListView) -> Table:
    table = Table(title=f"snapshots of {r.name}")
    for col in ("NAME", "CREATED", "STATE", "MEMORY", "CURRENT", "DESCRIPTION"):
        table.add_column(col)
    for snap in r.snapshots:
        created = datetime.fromtimestamp(snap.created_at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        table.add_row(
            snap.name,
            created,
            snap.state,
            "yes" if snap.memory else "no",
            "*" if snap.current else "",
            snap.description,
        )
    return table


def _show_snapshots(s: State, r: SnapshotListView) -> None:
    if r.message:
        s.out.print(f"{r.name}: {r.message}", highlight=False)
    s.out.print(_snapshots_table(r))


@snapshot_app.command("create")
def snapshot_create(
    ctx: typer.Context,
    name: str,
    snapshot: str,
    description: Annotated[str, typer.Option(help="free text")] = "",
) -> None:
    """Take a snapshot (virsh snapshot-create-as); refused on raw disks."""
    body = validated(lambda: SnapshotCreateRequest(name, snapshot, description), ctx)
    run(ctx, API_VM_SNAPSHOT_CREATE, body, _show_snapshots)


@snapshot_app.command("list")
def snapshot_list(ctx: typer.Context, name: str) -> None:
    """List a VM's snapshots (virsh snapshot-list)."""
    run(ctx, API_VM_SNAPSHOT_LIST, _ref(ctx, name), _show_snapshots)


@snapshot_app.command("revert")
def snapshot_revert(ctx: typer.Context, name: str, snapshot: str) -> None:
    """Go back to a snapshot (virsh snapshot-revert); what changed since is lost."""
    run(ctx, API_VM_SNAPSHOT_REVERT, validated(lambda: SnapshotRequest(name, snapshot), ctx), _done)


@snapshot_app.command("delete")
def snapshot_delete(ctx: typer.Context, name: str, snapshot: str) -> None:
    """Delete a snapshot (virsh snapshot-delete)."""
    run(
        ctx,
        API_VM_SNAPSHOT_DELETE,
        validated(lambda: SnapshotRequest(name, snapshot), ctx),
        _show_snapshots,
    )


# ----------------------------------------------------------------------------- disks


@disk_app.command("attach")
def disk_attach(
    ctx: typer.Context,
    name: str,
    size: Annotated[int, typer.Option(help="a new disk of this many GiB in the host's pool")] = 0,
    path: Annotated[str | None, typer.Option(help="an existing image on the host instead")] = None,
    fmt: Annotated[DiskFormat, typer.Option("--format", help="image format")] = DiskFormat.QCOW2,
    target: Annotated[str | None, typer.Option(help="guest disk name (default: next free, e.g. vdb)")] = None,
    bus: Annotated[DiskBus, typer.Option(help="bus")] = DiskBus.VIRTIO,
    cache: Annotated[CacheMode, typer.Option(help="cache mode")] = CacheMode.NONE,
    io: Annotated[IoMode | None, typer.Option(help="io mode")] = None,
    readonly: Annotated[bool, typer.Option("--readonly", help="read-only")] = False,
    allow_shared_disk: Annotated[
        bool, typer.Option("--allow-shared-disk", help="allow a shared image")
    ] = False,
    live: LiveOpt = False,
    config: ConfigOpt = False,
) -> None:
    """Attach a data disk (the notes: add a disk rather than grow one)."""
    state: State = ctx.obj
    warning = cache_warning(target or path or f"new {size} GiB disk", cache)
    if warning is not None:
        state.err.print(render.styled("warning", "yellow", warning), highlight=False)
    live_scope, config_scope = scope(live, config)
    body = validated(
        lambda: VmDiskAttachRequest(
            name,
            size_gib=size,
            path=path,
            format=fmt,
            target=target,
            bus=bus,
            cache=cache,
            io=io,
            readonly=readonly,
            live=live_scope,
            config=config_scope,
            allow_shared_disk=allow_shared_disk,
        ),
        ctx,
    )
    run(ctx, API_VM_DISK_ATTACH, body, _done)


@disk_app.command("detach")
def disk_detach(
    ctx: typer.Context,
    name: str,
    target: str,
    delete_volume: Annotated[
        bool, typer.Option("--delete-volume", help="also delete the volume (only one virtfleet created)")
    ] = False,
    live: LiveOpt = False,
    config: ConfigOpt = False,
) -> None:
    """Detach a disk; its image is kept unless --delete-volume."""
    live_scope, config_scope = scope(live, config)
    body = validated(
        lambda: VmDiskDetachRequest(
            name, target, live=live_scope, config=config_scope, delete_volume=delete_volume
        ),
        ctx,
    )
    run(ctx, API_VM_DISK_DETACH, body, _done)


@disk_app.command("resize")
def disk_resize(
    ctx: typer.Context,
    name: str,
    target: str,
    size: Annotated[int, typer.Argument(help="new size in GiB (grow only)")],
    yes_i_know: Annotated[
        bool, typer.Option("--yes-i-know", help="I have a backup and know the guest must grow its filesystem")
    ] = False,
) -> None:
    """Grow a disk image. Not recommended: add a disk instead; never grow a system disk."""
    state: State = ctx.obj
    state.err.print(
        render.styled(
            "warning",
            "yellow",
            "growing a disk is not recommended (ops notes): never the system disk, back up a data disk "
            "first, and prefer `vm disk attach`. The guest must grow its partition and filesystem itself.",
        ),
        highlight=False,
    )
    body = validated(lambda: VmDiskResizeRequest(name, target, size, i_know=yes_i_know), ctx)
    if not yes_i_know:
        raise fail(state, InvalidRequest("refused: add --yes-i-know to grow the disk anyway"))
    run(ctx, API_VM_DISK_RESIZE, body, _done)


# ----------------------------------------------------------------------------- NICs


def _nics_table(r: NicListView) -> Table:
    table = Table(title=f"interfaces of {r.name}")
    for col in ("INTERFACE", "TYPE", "SOURCE", "MODEL", "MAC"):
        table.add_column(col)
    for nic in r.nics:
        table.add_row(nic.interface, nic.type, nic.source, nic.model, nic.mac)
    return table


def _show_nics(s: State, r: NicListView) -> None:
    if r.message:
        s.out.print(f"{r.name}: {r.message}", highlight=False)
    s.out.print(_nics_table(r))


@nic_app.command("attach")
def nic_attach(
    ctx: typer.Context,
    name: str,
    bridge: Annotated[str | None, typer.Option(help="a host bridge, e.g. br0")] = None,
    network: Annotated[str | None, typer.Option(help="a libvirt network, e.g. default")] = None,
    model: Annotated[NicModel, typer.Option(help="NIC model")] = NicModel.VIRTIO,
    mac: Annotated[
        str | None, typer.Option(help="MAC address (default: generated 52:54:00:xx:xx:xx)")
    ] = None,
    live: LiveOpt = False,
    config: ConfigOpt = False,
) -> None:
    """Attach a network interface (virsh attach-interface)."""
    state: State = ctx.obj
    if (bridge is None) == (network is None):
        raise fail(state, InvalidRequest("give --bridge BR or --network NET"))
    kind, source = (NicKind.BRIDGE, bridge) if bridge is not None else (NicKind.NETWORK, network)
    assert source is not None
    live_scope, config_scope = scope(live, config)
    body = validated(
        lambda: VmNicAttachRequest(
            name, kind, source, model=model, mac=mac, live=live_scope, config=config_scope
        ),
        ctx,
    )
    run(ctx, API_VM_NIC_ATTACH, body, _show_nics)


@nic_app.command("detach")
def nic_detach(
    ctx: typer.Context,
    name: str,
    mac: Annotated[str, typer.Option(help="MAC address of the interface")],
    live: LiveOpt = False,
    config: ConfigOpt = False,
) -> None:
    """Detach a network interface (virsh detach-interface --mac)."""
    live_scope, config_scope = scope(live, config)
    body = validated(lambda: VmNicDetachRequest(name, mac, live=live_scope, config=config_scope), ctx)
    run(ctx, API_VM_NIC_DETACH, body, _show_nics)


@nic_app.command("list")
def nic_list(ctx: typer.Context, name: str) -> None:
    """The VM's interfaces (virsh domiflist)."""
    run(ctx, API_VM_NIC_LIST, _ref(ctx, name), _show_nics)


# ----------------------------------------------------------------------------- images


def location(image: str, pool: str | None) -> ImageLocation:
    """An absolute path, or a volume name in ``pool`` (the host's default pool when None)."""
    if image.startswith("/"):
        return ImageLocation(path=image, pool=pool)
    return ImageLocation(volume=image, pool=pool)


PoolOpt = Annotated[
    str | None, typer.Option(help="storage pool of a volume name (default: the host's default pool)")
]


def _show_image(s: State, r: ImageView) -> None:
    info = r.image
    if r.message:
        s.out.print(f"{r.host}: {r.message}", highlight=False)
    lines = [
        f"image: {info.path}",
        f"file format: {info.format}",
        f"virtual size: {render_size(info.virtual_size_bytes)} ({info.virtual_size_bytes} bytes)",
        f"disk size: {render_size(info.actual_size_bytes)}",
    ]
    if info.cluster_size is not None:
        lines.append(f"cluster_size: {info.cluster_size}")
    if info.backing_file:
        lines.append(f"backing file: {info.backing_file}")
    if info.snapshots:
        lines.append(f"snapshots: {info.snapshots}")
    s.out.print("\n".join(lines), highlight=False)


def render_size(n: int) -> str:
    """``qemu-img info`` style: 10 GiB, 196 KiB."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.3g} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


@image_app.command("create")
def image_create(
    ctx: typer.Context,
    host: str,
    image: Annotated[str, typer.Argument(help="absolute path, or a volume name in --pool")],
    fmt: Annotated[DiskFormat, typer.Option("--format", help="raw or qcow2")] = DiskFormat.QCOW2,
    size: Annotated[int, typer.Option(help="virtual size in GiB")] = 0,
    pool: PoolOpt = None,
) -> None:
    """Create an image (qemu-img create -f raw|qcow2 PATH SIZE); never overwrites."""
    body = validated(lambda: ImageCreateRequest(host, location(image, pool), fmt, size), ctx)
    run(ctx, API_IMAGE_CREATE, body, _show_image)


@image_app.command("info")
def image_info(
    ctx: typer.Context,
    host: str,
    image: Annotated[str, typer.Argument(help="absolute path, or a volume name in --pool")],
    pool: PoolOpt = None,
) -> None:
    """Format, virtual size, size on disk and cluster size (qemu-img info)."""
    body = validated(lambda: ImageInfoApiRequest(host, location(image, pool)), ctx)
    run(ctx, API_IMAGE_INFO, body, _show_image)


@image_app.command("convert")
def image_convert(
    ctx: typer.Context,
    host: str,
    source: Annotated[str, typer.Argument(help="absolute path, or a volume name in --pool")],
    dest: Annotated[str, typer.Argument(help="absolute path, or a volume name in --pool; must not exist")],
    fmt: Annotated[DiskFormat, typer.Option("--format", help="the format to write")] = DiskFormat.QCOW2,
    pool: PoolOpt = None,
) -> None:
    """Convert an image (qemu-img convert -O raw|qcow2 SRC DST)."""
    body = validated(
        lambda: ImageConvertRequest(host, location(source, pool), location(dest, pool), fmt), ctx
    )
    run(ctx, API_IMAGE_CONVERT, body, _show_image)
