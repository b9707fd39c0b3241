"""The agent's CPU per ``vm.create``, in one process: the handler alone, on libvirt's test driver.

What the fleet benchmark's agent does for each create (``AgentHandlers.create``: name and uuid
checks, the new volume, its format record, define, start, status), without the broker, the
journal or the reporter around it. The host is ``tests/fixtures/nodes/small.xml`` opened as the
agent opens it; the spec is the fleet benchmark's (1 vCPU, 64 MiB, a new 1 GiB qcow2 disk). The
image format record lives in a temporary directory on ``--dir`` (the agent's state directory is
on the same disk), and already holds ``--images`` records before the first create, as on a host
that has made that many images.

For each repeat: ``--creates`` creates on a fresh connection (so the test driver holds at most
that many domains), CPU time (``time.process_time``: user + system of this process, so the
fsync's kernel time counts) and wall time per create. ``--profile N`` runs N more creates under
cProfile and prints the top functions.

    .venv/bin/python bench/agent_create.py [--creates 1000] [--repeat 3] [--images 1000] [--dir DIR]
        [--profile 2000]

``--dir`` should be on the filesystem of the agent's state directory (/var/lib/virtfleet/agent by
default); a tmpfs would hide the fsync.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import libvirt

from agent.drivers import host_facts
from agent.drivers.libvirt_driver import LibvirtHypervisor, open_connection
from agent.handlers import AgentHandlers
from agent.host_storage import HostStorage
from common.messages.vm import CreateVm, DiskFormat, DiskSpec, DomainType, VmSpec

ROOT = Path(__file__).resolve().parent.parent
NODE = ROOT / "tests" / "fixtures" / "nodes" / "small.xml"
URI = f"test://{NODE}"


def spec(name: str) -> VmSpec:
    """What the controller sends for the fleet benchmark's create (bench/fleetkit.py create_body)."""
    return VmSpec(
        uuid=str(uuid.uuid4()),
        name=name,
        vcpus=1,
        memory_mib=64,
        domain_type=DomainType.TEST,
        disks=(DiskSpec(target="vda", source="new", format=DiskFormat.QCOW2, size_gib=1),),
    )


@contextmanager
def host(state: Path, images: int) -> Iterator[AgentHandlers]:
    """The handlers of one simulated host, as agent/main.py and agent/host_runtime.py build them,
    with ``images`` format records already made."""
    conn = open_connection(URI)
    try:
        hv = LibvirtHypervisor(
            conn,
            "default",
            simulated=True,
            pool_capacity_bytes=host_facts.read_node_file_pool_capacity(URI, "default"),
        )
        hv.ensure_pool(state / "images")
        formats = state / "image-formats.db"
        # As many records as the host has images (an earlier agent's record, imported at the start).
        formats.with_suffix(".json").write_text(
            json.dumps({f"/var/lib/old/img-{i}.qcow2": "qcow2" for i in range(images)})
        )
        storage = HostStorage.for_host(hv, default="default", formats_file=formats)
        yield AgentHandlers(hv, lambda: 0, storage=storage)
    finally:
        conn.close()


def run(handlers: AgentHandlers, prefix: str, creates: int) -> tuple[float, float]:
    """(CPU, wall) seconds per create over ``creates`` creates."""
    bodies = [CreateVm(spec=spec(f"{prefix}-{i}"), start=True) for i in range(creates)]
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for body in bodies:
        handlers.create(body)
    return (time.process_time() - cpu0) / creates, (time.perf_counter() - wall0) / creates


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--creates", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--images", type=int, default=1000, help="format records before the first create")
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp"))
    parser.add_argument("--profile", type=int, default=0, help="creates under cProfile after the runs")
    args = parser.parse_args()
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # as agent/main.py: no stderr noise

    cpu: list[float] = []
    wall: list[float] = []
    for r in range(args.repeat):
        with (
            tempfile.TemporaryDirectory(dir=args.dir, prefix="vf-agent-create-") as tmp,
            host(Path(tmp), args.images) as handlers,
        ):
            run(handlers, f"warm{r}", 20)
            c, w = run(handlers, f"vm{r}", args.creates)
        cpu.append(c)
        wall.append(w)
        print(f"run {r + 1}: {c * 1e6:.0f} us CPU, {w * 1e6:.0f} us wall per create", flush=True)
    print(
        f"agent create handler ({ROOT}), {args.creates} creates x {args.repeat}, {args.images} records before:"
        f" CPU {statistics.median(cpu) * 1e6:.0f} us per create (min {min(cpu) * 1e6:.0f}, max"
        f" {max(cpu) * 1e6:.0f}); wall {statistics.median(wall) * 1e6:.0f} us"
    )
    if args.profile:
        with (
            tempfile.TemporaryDirectory(dir=args.dir, prefix="vf-agent-create-") as tmp,
            host(Path(tmp), args.images) as handlers,
        ):
            run(handlers, "pwarm", 20)
            prof = cProfile.Profile()
            bodies: list[Any] = [CreateVm(spec=spec(f"p-{i}"), start=True) for i in range(args.profile)]
            prof.enable()
            for body in bodies:
                handlers.create(body)
            prof.disable()
        stats = pstats.Stats(prof)
        stats.sort_stats("cumulative").print_stats(40)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
