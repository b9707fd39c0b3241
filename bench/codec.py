"""Codec benchmark: encode + decode of one message, µs per message, before and after, with a floor.

Two messages, each encoded as its sender does it (message object -> plain data -> envelope ->
MessagePack bytes) and decoded as its receiver does it (bytes -> envelope -> typed message):

* a ``vm.create`` command with a full VM spec (3 disks, 2 NICs, VNC, pinning);
* a ``host.report`` of a host running 200 VMs.

Figures, each the median of several timed batches:

* **floor**: ``msgpack.packb`` + ``unpackb`` of the same plain data (what the byte codec alone
  costs; no conversion can beat it);
* **after**: this tree's codec (msgspec Structs, ``msgspec.to_builtins`` / ``msgspec.convert``);
* **before**: the same measurement run against another git revision (default: the last one with
  the reflective ``common/schema.py`` converter), in a temporary ``git worktree``.

Run from the repository root::

    .venv/bin/python bench/codec.py [--before REV] [--no-before] [--batches 7]

The measurement runs in a subprocess per tree (``--measure``), so each tree's modules are the only
ones imported; both print one JSON line that this script compares.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
#: The last revision whose messages were dataclasses converted by the reflective common/schema.py.
DEFAULT_BEFORE = "e9ba1a8"


# ------------------------------------------------------------------ building the two messages


def _messages(vm: Any, host: Any) -> tuple[Any, Any]:
    """(a vm.create body, a 200-VM host report) built from the message modules of the tree under test."""
    spec = vm.VmSpec(
        uuid="6f1c1d2e-0000-4000-8000-000000000001",
        name="web-1",
        vcpus=4,
        memory_mib=8192,
        max_vcpus=8,
        max_memory_mib=16384,
        domain_type=vm.DomainType.QEMU,
        cpuset="0-7",
        disks=(
            vm.DiskSpec(target="vda", size_gib=40, pool="default", volume="web-1-vda"),
            vm.DiskSpec(
                target="vdb", size_gib=200, pool="default", volume="web-1-vdb", cache=vm.CacheMode.NONE
            ),
            vm.DiskSpec(
                target="sda",
                source="existing",
                format=vm.DiskFormat.RAW,
                path="/var/lib/iso/boot.iso",
                bus=vm.DiskBus.SATA,
                device=vm.DiskDevice.CDROM,
                readonly=True,
            ),
        ),
        nics=(
            vm.NicSpec(kind=vm.NicKind.NETWORK, source="default", mac="52:54:00:aa:bb:01"),
            vm.NicSpec(kind=vm.NicKind.BRIDGE, source="br0", mac="52:54:00:aa:bb:02"),
        ),
        graphics=vm.GraphicsSpec(listen="127.0.0.1", port=5901),
        cputune=vm.CpuTune(vcpu_pins=tuple(vm.VcpuPin(i, str(i)) for i in range(4)), emulator_cpuset="0"),
        serial_log="/var/log/vm/web-1.log",
        description="benchmark VM",
    )
    create = vm.CreateVm(spec=spec, start=True)
    statuses = tuple(
        vm.VmStatus(
            uuid=f"6f1c1d2e-0000-4000-8000-{i:012d}",
            name=f"vm-{i:04d}",
            state=vm.PowerState.RUNNING,
            vcpus=2,
            max_vcpus=4,
            memory_mib=2048,
            max_memory_mib=4096,
            cpu_time_ns=123456789 * i,
            autostart=True,
        )
        for i in range(200)
    )
    report = host.HostReport(
        host_id="hv-0001",
        hostname="hv-0001.example",
        agent_version="0.1.0",
        hypervisor_type="QEMU",
        hypervisor_version="7.2.0",
        libvirt_uri="qemu:///system",
        hw_virt=True,
        cpu=host.CpuTopology(cpus=64, sockets=2, cores=16, threads=2, numa_cells=2, mhz=2600, model="EPYC"),
        memory_mib=512 * 1024,
        memory_free_mib=100 * 1024,
        storage=host.StoragePoolInfo("default", "/var/lib/libvirt/images", 4000, 1200, 2800),
        networks=("default", "prod"),
        bridges=("br0", "br1"),
        vms=statuses,
        seq=42,
        started_at=1764111111.5,
        reported_at=1764111171.5,
    )
    return create, report


# ------------------------------------------------------------------ measuring one tree


def _codec_of_tree() -> tuple[Callable[[Any], Any], Callable[[type, Any], Any], Any]:
    """(to plain, from plain, envelope module) of whichever tree is on sys.path."""
    from common.messages import envelope  # noqa: PLC0415 - imported from the tree under test

    try:
        from common.codec import from_wire, to_wire  # noqa: PLC0415
    except ImportError:  # the reflective converter of older trees
        from common.schema import from_plain, to_plain  # type: ignore[import-not-found]  # noqa: PLC0415

        return to_plain, from_plain, envelope
    return to_wire, from_wire, envelope


def _time_per_call(fn: Callable[[], object], batches: int) -> float:
    """Median µs per call over ``batches`` batches sized to take ~0.2 s each."""
    n = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        if time.perf_counter() - t0 > 0.05:
            break
        n *= 2
    per = []
    for _ in range(batches):
        t0 = time.perf_counter()
        for _ in range(n * 4):
            fn()
        per.append((time.perf_counter() - t0) / (n * 4) * 1e6)
    return statistics.median(per)


def measure(batches: int) -> dict[str, float]:
    """µs per encode+decode of both messages in this tree, and the msgpack floor."""
    import msgpack  # noqa: PLC0415

    from common.messages import host, vm  # noqa: PLC0415

    to_plain, from_plain, envelope = _codec_of_tree()
    create, report = _messages(vm, host)
    out: dict[str, float] = {}
    for label, message, kind in (("create", create, "bench.create"), ("report200", report, "bench.report")):

        def round_trip(message: Any = message, kind: str = kind) -> object:
            env = envelope.Envelope(kind=kind, body=to_plain(message), sender="bench", expires_at=1.0)
            received = envelope.decode_envelope(env.encode())
            return from_plain(type(message), received.body)

        plain = envelope.Envelope(kind=kind, body=to_plain(message), sender="bench", expires_at=1.0).to_wire()

        def floor(plain: Any = plain) -> object:
            return msgpack.unpackb(msgpack.packb(plain, use_bin_type=True), raw=False)

        assert round_trip() == message
        out[label] = _time_per_call(round_trip, batches)
        out[f"{label}_floor"] = _time_per_call(floor, batches)
        out[f"{label}_bytes"] = float(
            len(envelope.Envelope(kind=kind, body=plain["body"], sender="bench").encode())
        )
    return out


# ------------------------------------------------------------------ driving the comparison


def _run_in(tree: Path, batches: int) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--measure", "--batches", str(batches)],
        env=env,
        cwd=tree,
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


@dataclasses.dataclass
class Row:
    label: str
    floor: float
    before: float | None
    after: float

    def line(self) -> str:
        before = f"{self.before:9.1f}" if self.before is not None else "        -"
        speedup = f"{self.before / self.after:6.1f}x" if self.before is not None else "      -"
        return (
            f"{self.label:<28} {self.floor:9.1f} {before} {self.after:9.1f}   {speedup}"
            f"   {self.after / self.floor:5.1f}x floor"
        )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--measure", action="store_true", help="(internal) measure the tree on sys.path")
    parser.add_argument("--before", default=DEFAULT_BEFORE, help="git revision to compare with")
    parser.add_argument("--no-before", action="store_true", help="only this tree")
    parser.add_argument("--batches", type=int, default=7)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.batches)))
        return 0
    after = _run_in(ROOT, args.batches)
    before: dict[str, float] | None = None
    if not args.no_before:
        with tempfile.TemporaryDirectory(prefix="vf-codec-bench-") as tmp:
            tree = Path(tmp) / "before"
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(tree), args.before],
                check=True,
            )
            try:
                before = _run_in(tree, args.batches)
            finally:
                subprocess.run(
                    ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=True
                )
    print(
        f"codec: encode + decode of one message, µs (median of {args.batches} batches); before = {args.before}"
    )
    print(f"{'message':<28} {'floor':>9} {'before':>9} {'after':>9}   speedup   after/floor")
    for label, name in (("create", "vm.create (full spec)"), ("report200", "host.report (200 VMs)")):
        row = Row(
            f"{name}, {int(after[label + '_bytes'])} B",
            after[f"{label}_floor"],
            before[label] if before else None,
            after[label],
        )
        print(row.line())
    print("floor = msgpack.packb + unpackb of the same plain data in this run")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
