"""virt-install style options of ``virtfleet vm create`` (pure parsers) and its progress display.

``--disk``, ``--network`` and ``--graphics`` take virt-install's ``key=value,...`` syntax, so the ops
notes' command lines carry over almost word for word::

    virt-install ... --disk path=/opt/CentOS-7-x86_64.raw --network bridge=br0
        --graphics vnc,password=foobar,port=5910,listen=0.0.0.0
    virtfleet vm create ... --disk path=/opt/CentOS-7-x86_64.raw --network bridge=br0
        --graphics vnc,password=foobar,port=5910,listen=0.0.0.0
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import typer

from common.errors import InvalidRequest, NotFound, VirtfleetError
from common.messages import api
from common.messages.api import API_VM_CREATE, API_VM_SHOW
from common.messages.vm import (
    CacheMode,
    DiskBus,
    DiskFormat,
    DiskSpec,
    GraphicsSpec,
    IoMode,
    Lifecycle,
    NicKind,
    NicModel,
    NicSpec,
    VmRefRequest,
)
from controller.cli import render
from controller.cli.progress import LOG_EVERY_S
from controller.cli.runner import Output, State, fail

if TYPE_CHECKING:
    from controller.cli.client import ApiClient

_DISK_KEYS = frozenset({"path", "size", "format", "bus", "cache", "io", "pool", "target", "readonly"})
_NIC_KEYS = frozenset({"network", "bridge", "model", "mac"})
_VNC_KEYS = frozenset({"listen", "port", "password"})


def _pairs(text: str, allowed: frozenset[str], what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or not key:
            raise InvalidRequest(f"{what}: expected key=value, got {part!r}")
        if key not in allowed:
            raise InvalidRequest(f"{what}: unknown key {key!r} (known: {', '.join(sorted(allowed))})")
        if key in out:
            raise InvalidRequest(f"{what}: {key} given twice")
        out[key] = value.strip()
    return out


def _choice(enum: type[Any], value: str, what: str) -> Any:
    try:
        return enum(value)
    except ValueError:
        allowed = "|".join(m.value for m in enum)
        raise InvalidRequest(f"{what} must be {allowed}, got {value!r}") from None


def _size(value: str, what: str) -> int:
    text = value.strip().upper().removesuffix("G").removesuffix("GIB")
    if not text.isdigit() or int(text) <= 0:
        raise InvalidRequest(f"{what}: size must be a positive number of GiB, got {value!r}")
    return int(text)


def parse_disk(text: str) -> DiskSpec:
    """One ``--disk``: ``20``, ``size=20,format=raw``, ``path=/img.qcow2,bus=sata`` or ``/img.raw``."""
    what = f"--disk {text}"
    stripped = text.strip()
    if stripped.isdigit() or (stripped.upper().endswith("G") and stripped[:-1].isdigit()):
        return DiskSpec(target="", source="new", size_gib=_size(stripped, what))
    if stripped.startswith("/") and "=" not in stripped:
        stripped = f"path={stripped}"
    opts = _pairs(stripped, _DISK_KEYS, what)
    path = opts.get("path")
    if (path is None) == ("size" not in opts):
        raise InvalidRequest(
            f"{what}: give size=GIB for a new volume in the host's pool, or path=/image for an existing image "
            "(create a file image first with `virtfleet image create`)"
        )
    default_format = DiskFormat.QCOW2 if path is None or path.endswith(".qcow2") else DiskFormat.RAW
    readonly = opts.get("readonly", "no").lower()
    if readonly not in {"yes", "no", "on", "off", "true", "false"}:
        raise InvalidRequest(f"{what}: readonly must be yes or no")
    return DiskSpec(
        target=opts.get("target", ""),
        source="new" if path is None else "existing",
        format=_choice(DiskFormat, opts["format"], f"{what}: format") if "format" in opts else default_format,
        size_gib=_size(opts["size"], what) if "size" in opts else 0,
        pool=opts.get("pool"),
        path=path,
        bus=_choice(DiskBus, opts["bus"], f"{what}: bus") if "bus" in opts else DiskBus.VIRTIO,
        cache=_choice(CacheMode, opts["cache"], f"{what}: cache") if "cache" in opts else CacheMode.NONE,
        io=_choice(IoMode, opts["io"], f"{what}: io") if "io" in opts else None,
        readonly=readonly in {"yes", "on", "true"},
    )


def parse_disks(values: list[str] | None) -> tuple[DiskSpec, ...] | None:
    """All ``--disk`` options; None when none was given (the default root disk), () for ``none``."""
    if not values:
        return None
    if any(v.strip().lower() == "none" for v in values):
        if len(values) > 1:
            raise InvalidRequest("--disk none cannot be combined with other --disk options")
        return ()
    return tuple(parse_disk(v) for v in values)


def parse_network(text: str) -> NicSpec:
    """One ``--network``: ``network=default``, ``bridge=br0,model=e1000,mac=52:54:00:..`` or ``default``."""
    what = f"--network {text}"
    stripped = text.strip()
    if "=" not in stripped:
        stripped = f"network={stripped}"
    opts = _pairs(stripped, _NIC_KEYS, what)
    if ("network" in opts) == ("bridge" in opts):
        raise InvalidRequest(
            f"{what}: give network=NAME (a libvirt network) or bridge=BRIDGE (a host bridge)"
        )
    kind = NicKind.NETWORK if "network" in opts else NicKind.BRIDGE
    return NicSpec(
        kind=kind,
        source=opts[kind.value],
        model=_choice(NicModel, opts["model"], f"{what}: model") if "model" in opts else NicModel.VIRTIO,
        mac=opts.get("mac") or None,
    )


def parse_graphics(text: str | None) -> GraphicsSpec | None:
    """``--graphics``: ``vnc``, ``vnc,listen=0.0.0.0,port=5910,password=foobar`` or ``none``."""
    if text is None or text.strip().lower() == "none":
        return None
    kind, _, rest = text.strip().partition(",")
    if kind != "vnc":
        raise InvalidRequest(f"--graphics {text}: only vnc is supported")
    opts = _pairs(rest, _VNC_KEYS, f"--graphics {text}") if rest else {}
    port_text = opts.get("port", "auto")
    if port_text in {"auto", "-1"}:
        port = None
    elif port_text.isdigit():
        port = int(port_text)
    else:
        raise InvalidRequest(f"--graphics {text}: port must be a number or auto")
    return GraphicsSpec(listen=opts.get("listen", "127.0.0.1"), port=port, password=opts.get("password"))


def cache_warning(name: str, cache: CacheMode | None) -> str | None:
    """The data-loss warning a cache mode deserves (the ops notes: writeback is fast but unsafe)."""
    if cache is CacheMode.WRITEBACK:
        return (
            f"disk {name} uses cache=writeback: fast, but what the guest believes written is lost if the host "
            "crashes (none is the safe default)"
        )
    if cache is CacheMode.UNSAFE:
        return f"disk {name} uses cache=unsafe: flushes are ignored; only for throw-away guests"
    return None


def create_warnings(req: api.VmCreate) -> list[str]:
    """What the operator should know before this VM is built (printed on stderr, never fatal)."""
    warnings = []
    for disk in req.disks:
        warning = cache_warning(disk.target or disk.path or f"new {disk.size_gib} GiB disk", disk.cache)
        if warning is not None:
            warnings.append(warning)
    graphics = req.graphics
    if (
        graphics is not None
        and graphics.listen not in {"127.0.0.1", "::1", "localhost"}
        and not graphics.password
    ):
        warnings.append(f"VNC listens on {graphics.listen} without a password")
    if req.allow_shared_disk:
        warnings.append(
            "--allow-shared-disk: two guests writing one image corrupt it unless it is meant to be shared"
        )
    return warnings


# ------------------------------------------------------------------------------------- --wait progress


def _phase(client: ApiClient, name: str) -> str | None:
    try:
        vm = client.call(API_VM_SHOW, VmRefRequest(name))
    except NotFound:
        return "placing"
    except VirtfleetError:
        return None
    if vm.status is Lifecycle.BUILDING:
        return f"building on host {vm.host}" if vm.host else "placing"
    return f"{vm.status} on host {vm.host}, {vm.power_state}"


def run_with_progress(ctx: typer.Context, body: api.VmCreate, show: Callable[[State, Any], None]) -> None:
    """``vm create --wait``: the create call in a thread, progress lines on stderr while it runs."""
    state: State = ctx.obj
    outcome: dict[str, Any] = {}

    def create() -> None:
        # Its progress is the phase lines below (a second, generic line would garble a terminal).
        client = state.client(progress=False)
        try:
            outcome["result"] = client.call(API_VM_CREATE, body)
        except VirtfleetError as exc:
            outcome["error"] = exc
        except Exception as exc:  # noqa: BLE001 - handed to the main thread, which reports it
            outcome["crash"] = exc
        finally:
            client.close()

    worker = threading.Thread(target=create, name="vm-create", daemon=True)
    started = time.monotonic()
    worker.start()
    poller = state.client(timeout=10.0, progress=False)  # its phases are the create's progress
    last: str | None = None
    last_at = started
    try:
        while True:
            worker.join(0.5)
            if not worker.is_alive():
                break
            phase = _phase(poller, body.name)
            now = time.monotonic()
            # A new phase at once; the same one again now and then, so a long build shows its time.
            if phase is not None and (phase != last or now - last_at >= LOG_EVERY_S):
                state.err.print(f"[{now - started:5.1f}s] {body.name}: {phase}", highlight=False)
                last, last_at = phase, now
    finally:
        poller.close()
    if "error" in outcome:
        raise fail(state, outcome["error"])
    if "crash" in outcome:
        raise outcome["crash"]
    result = outcome["result"]
    state.err.print(f"[{time.monotonic() - started:5.1f}s] {body.name}: done", highlight=False)
    if state.output is Output.JSON:
        render.emit_json(state.out, result)
    else:
        show(state, result)
