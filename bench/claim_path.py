"""The controller's create path without the wire: SQL statements and transactions per create,
and ms per create, next to a floor measured in the same run.

Run from the repository root: ``python bench/claim_path.py [--database URL] [--hosts 100]
[--creates 300]``. A :class:`~controller.service.ControllerService` on a fresh database (a
throw-away SQLite file by default; a PostgreSQL URL names a database to create and drop), hosts
registered by reports, agents answered in-process (a build succeeds at once), so what is
measured is the controller's own work per create: decide in memory, claim, record the result.

Floor: two write transactions of one trivial UPDATE each on the same database (a create needs at
least the claim and the result), timed the same way.

``--threads N``: then ``--creates`` creates from N threads at once (as the controller's API
workers run them), through two services on the same database: one with the default config
(creates that arrive together are claimed in one batch) and one with ``create_batch_max = 1``
(each create alone), alternated ``--rounds`` times. For each: creates/s, the process's CPU per
create (``time.process_time``: every thread of this process) and the mean batch size.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import make_url

from common.messages import api
from common.messages.descriptor import Command
from common.messages.host import CpuTopology, HostReport
from common.messages.vm import CreateVm, KernelBoot, PowerState, VmResult, VmStatus
from controller.config import ControllerConfig
from controller.db.engine import make_engine, migrate
from controller.service import ControllerService

B = TypeVar("B")
R = TypeVar("R")


class _InstantAgents:
    """Every build succeeds at once with the VM running (no transport, no hypervisor)."""

    def call(self, host_id: str, op: Command[B, R], body: B) -> R:
        assert isinstance(body, CreateVm), op.kind
        spec = body.spec
        status = VmStatus(
            spec.uuid, spec.name, PowerState.RUNNING, spec.vcpus, spec.vcpus, spec.memory_mib, spec.memory_mib
        )
        return VmResult(status=status)  # type: ignore[return-value]  # only vm.create is sent here


def _report(host_id: str, now: float) -> HostReport:
    return HostReport(
        host_id=host_id,
        hostname=host_id,
        agent_version="bench",
        hypervisor_type="TEST",
        hypervisor_version="1.0.0",
        libvirt_uri="test:///default",
        hw_virt=True,
        cpu=CpuTopology(cpus=64),
        memory_mib=262144,
        memory_free_mib=262144,
        storage=None,
        networks=(),
        bridges=(),
        vms=(),
        seq=1,
        started_at=now,
        reported_at=now,
    )


def _database(url: str | None) -> tuple[str, Any]:
    """A fresh database URL and a function that drops it."""
    if url is None:
        path = Path(tempfile.mkdtemp(prefix="vf-claim-")) / "bench.db"
        return f"sqlite:///{path}", lambda: path.unlink(missing_ok=True)
    base = make_url(url).set(drivername="postgresql+psycopg")
    name = f"virtfleet_claim_{uuid.uuid4().hex[:10]}"
    admin = create_engine(base.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    return base.set(database=name).render_as_string(hide_password=False), drop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--database", help="a PostgreSQL URL (default: a throw-away SQLite file)")
    parser.add_argument("--hosts", type=int, default=100)
    parser.add_argument("--creates", type=int, default=300)
    parser.add_argument("--threads", type=int, default=0, help="then creates from this many threads at once")
    parser.add_argument("--rounds", type=int, default=2, help="of the batched and one-at-a-time runs")
    args = parser.parse_args()
    url, drop = _database(args.database)
    engine = make_engine(url)
    try:
        migrate(engine)
        service = ControllerService(engine, ControllerConfig(database_url=url), _InstantAgents())
        now = time.time()
        for n in range(args.hosts):
            service.record_report(_report(f"h{n:04d}", now))
        statements: list[str] = []

        def seen(_conn: Any, _cursor: Any, statement: str, *_rest: Any) -> None:
            statements.append(statement.split(None, 1)[0].upper())

        def create(name: str) -> None:
            service.create_vm(
                api.VmCreate(name=name, vcpus=1, memory_mib=64, kernel_boot=KernelBoot("/vmlinuz"))
            )

        for n in range(20):  # warm up (statement caches, the index)
            create(f"warm{n}")
        event.listen(engine, "before_cursor_execute", seen)
        create("counted")
        event.remove(engine, "before_cursor_execute", seen)
        times = []
        for n in range(args.creates):
            start = time.perf_counter()
            create(f"vm{n}")
            times.append((time.perf_counter() - start) * 1000.0)
        floors = []
        with engine.connect() as conn:
            for _ in range(args.creates):
                start = time.perf_counter()
                for _tx in range(2):
                    with conn.begin():
                        conn.execute(text("UPDATE hosts SET generation = generation WHERE id = 'h0000'"))
                floors.append((time.perf_counter() - start) * 1000.0)
        concurrent = _concurrent(engine, url, args) if args.threads else []
        service.close()
    finally:
        engine.dispose()
        drop()
    begins = statements.count("BEGIN")
    kinds = {k: statements.count(k) for k in sorted(set(statements))}
    create_ms, floor_ms = statistics.median(times), statistics.median(floors)
    print(f"database {make_url(url).get_backend_name()}, {args.hosts} hosts, {args.creates} creates")
    print(f"  statements per create: {len(statements)} {kinds}; transactions: {begins or '(implicit)'}")
    print(
        f"  create p50 {create_ms:.2f} ms; floor (2 write transactions) p50 {floor_ms:.2f} ms; {create_ms / floor_ms:.1f}x"
    )
    for line in concurrent:
        print(line)


def _vm(name: str) -> api.VmCreate:
    return api.VmCreate(name=name, vcpus=1, memory_mib=64, kernel_boot=KernelBoot("/vmlinuz"))


def _concurrent(engine: Any, url: str, args: argparse.Namespace) -> list[str]:
    """Creates from ``args.threads`` threads, batched (default config) and one at a time."""
    configs = {"batched": ControllerConfig(database_url=url)}
    if "create_batch_max" in {f.name for f in dataclasses.fields(ControllerConfig)}:
        configs["one at a time"] = ControllerConfig(database_url=url, create_batch_max=1)
    services = {mode: ControllerService(engine, c, _InstantAgents()) for mode, c in configs.items()}
    results: dict[str, list[tuple[float, float, float]]] = {mode: [] for mode in services}
    for round_ in range(args.rounds):
        for mode, service in services.items():
            service.fleet.load(time.time())  # the other service's creates since
            batcher = getattr(service, "_creates", None)
            before = (batcher.batches, batcher.items) if batcher is not None else (0, 0)
            names = [f"r{round_}-{mode[0]}-{n}" for n in range(args.creates)]
            cpu, wall = time.process_time(), time.perf_counter()
            with ThreadPoolExecutor(max_workers=args.threads) as pool:
                list(pool.map(service.create_vm, (_vm(name) for name in names)))
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            batches = (batcher.batches - before[0]) if batcher is not None else args.creates
            items = (batcher.items - before[1]) if batcher is not None else args.creates
            results[mode].append((args.creates / wall, cpu * 1000.0 / args.creates, items / max(batches, 1)))
    for service in services.values():
        service.close()
    lines = [f"  {args.creates} creates from {args.threads} threads, {args.rounds} rounds alternated:"]
    for mode, runs in results.items():
        rates = ", ".join(f"{r:.0f}/s ({c:.2f} ms CPU, batch {b:.1f})" for r, c, b in runs)
        lines.append(f"    {mode:14s} {rates}")
    if len(results) == 2:
        ratio = statistics.median(r for r, _c, _b in results["batched"]) / statistics.median(
            r for r, _c, _b in results["one at a time"]
        )
        lines.append(f"    batched / one at a time (median creates/s): {ratio:.2f}x")
    return lines


if __name__ == "__main__":
    main()
