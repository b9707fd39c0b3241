"""What access control and the audit log cost an API call, next to floors measured in the same run.

Run from the repository root: ``python bench/audit_path.py [--database URL] [--calls 20000]
[--entries 2000]``. Two figures:

1. **The API front per call**: the controller's API Dispatcher with a handler that does nothing
   (floor), then the same wrapped as the controller runs it: the role check (admission), the
   per-login rate limiter (a limit no call reaches) and :class:`~controller.audit.AuditedApi`
   recording every call (the call is state-changing) into an :class:`~controller.db.audit.AuditLog`
   whose writer runs meanwhile. Microseconds per call, and the ratio.
2. **Writing the entries**: one transaction per entry (what an audit insert on each call's own path
   would cost: the floor of "write it before answering") against the batched writer (record all,
   then flush). Entries per second, and the ratio.

The database is a throw-away SQLite file by default; ``--database`` names a PostgreSQL URL to
create a throw-away database in.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url

from common.codec import to_wire
from common.messages import api
from common.messages.descriptor import Role, Side
from common.messages.envelope import Envelope
from common.messages.vm import VmActionDone
from common.transport.port import Delivery
from common.transport.rpc import Dispatcher, HandlerTable
from controller.access import Rate, RateLimiter, RoleCheck
from controller.audit import AuditedApi
from controller.db.audit import AuditEntry, AuditLog, insert_entries
from controller.db.engine import make_engine, migrate


def deliveries(n: int) -> list[Delivery]:
    body = to_wire(api.VmDeleteRequest("web-1"))
    now = time.time()
    return [
        Delivery(
            Envelope(
                kind=api.API_VM_DELETE.kind, body=body, sender="bench", sent_at=now, expires_at=now + 3600
            ),
            "virtfleet.api",
            False,
            "reply",
            user_id="olga",
        )
        for _ in range(n)
    ]


def dispatcher() -> Dispatcher:
    table = HandlerTable(Side.CONTROLLER)
    table.register(api.API_VM_DELETE, lambda _body: VmActionDone(vm=None, message="ok"))
    return Dispatcher("controller", table)


def per_call_us(handle: object, items: list[Delivery]) -> float:
    assert callable(handle)
    start = time.perf_counter()
    for d in items:
        handle(d)
    return (time.perf_counter() - start) / len(items) * 1e6


def front_figures(engine: Engine, calls: int) -> None:
    items = deliveries(calls)
    bare = dispatcher()
    per_call_us(bare, items[:1000])  # warm up
    floor = per_call_us(bare, items)
    table = HandlerTable(Side.CONTROLLER)
    table.register(api.API_VM_DELETE, lambda _body: VmActionDone(vm=None, message="ok"))
    guarded = Dispatcher("controller", table, admit=[RoleCheck({"olga": Role.OPERATOR})])
    limiter = RateLimiter(Rate(1e9, 1_000_000_000), Rate(0.0, 1))
    kept: list[AuditEntry] = []
    unwritten = AuditedApi(guarded, kept.append, limit=limiter)  # the front's own work, nothing written
    per_call_us(unwritten, items[:1000])
    alone = per_call_us(unwritten, items)
    log = AuditLog(engine)
    log.start()
    front = AuditedApi(guarded, log.record, limit=limiter)
    per_call_us(front, items[:1000])
    measured = per_call_us(front, items)
    log.stop()
    print(
        f"API front per call without the writer (entries kept in a list): {alone:.1f} us, "
        f"+{alone - floor:.1f} us over the floor"
    )
    print(
        f"API front per call: dispatcher alone {floor:.1f} us (floor); with roles + rate limit + audit "
        f"{measured:.1f} us = {measured / floor:.2f}x the floor, +{measured - floor:.1f} us"
    )


def entry(n: int) -> AuditEntry:
    return AuditEntry(time.time(), "olga", api.API_VM_DELETE.kind, f"vm{n}", "ok", None, uuid.uuid4().hex)


def write_figures(engine: Engine, entries: int) -> None:
    start = time.perf_counter()
    for n in range(entries):
        with engine.begin() as connection:
            insert_entries(connection, [entry(n)])
    one_by_one = entries / (time.perf_counter() - start)
    log = AuditLog(engine)
    log.start()
    start = time.perf_counter()
    for n in range(entries):
        log.record(entry(n))
    log.flush()
    batched = entries / (time.perf_counter() - start)
    log.stop()
    print(
        f"audit writes: one transaction per entry {one_by_one:,.0f}/s (floor); batched writer "
        f"{batched:,.0f}/s = {batched / one_by_one:.1f}x"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database", help="a PostgreSQL URL (default: a throw-away SQLite file)")
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--entries", type=int, default=2_000)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="vf-audit-") as tmp:
        if args.database:
            name = f"virtfleet_bench_audit_{uuid.uuid4().hex[:8]}"
            admin = create_engine(
                make_url(args.database).set(database="postgres"), isolation_level="AUTOCOMMIT"
            )
            with admin.connect() as conn:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
            url = make_url(args.database).set(database=name).render_as_string(hide_password=False)
        else:
            url = f"sqlite:///{Path(tmp) / 'audit.db'}"
        engine = make_engine(url)
        try:
            migrate(engine)
            print(f"database: {engine.dialect.name}")
            front_figures(engine, args.calls)
            write_figures(engine, args.entries)
        finally:
            engine.dispose()
            if args.database:
                with admin.connect() as conn:
                    conn.execute(text(f'DROP DATABASE "{name}"'))
                admin.dispose()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
