"""What the controller's API request journal adds per create: the API Dispatcher with and without
it, on one service and database, in the same run.

Run from the repository root: ``python bench/request_journal.py [--database URL] [--creates 300]
[--threads 8] [--rounds 3]``. Creates go through :func:`controller.endpoint.api_dispatcher` as
deliveries (no broker: what is measured is the controller's own work), agents answered
in-process (a build succeeds at once), as in ``bench/claim_path.py``. Each round runs the
creates without the journal, then with it (alternated, so drift in the machine's load hits both);
printed: ms per create (median of the rounds), the ratio with/without, and the SQL statements and
transactions one create costs with the journal. ``--threads`` > 1: the creates come from that
many threads at once (as the API workers run them; they are then claimed in batches).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from claim_path import _database, _InstantAgents, _report  # the same fleet and agents
from sqlalchemy import event

from common.messages import api
from common.messages.vm import KernelBoot
from common.transport.port import Delivery
from common.transport.rpc import Dispatcher, request, unwrap
from controller.config import ControllerConfig
from controller.db.engine import make_engine, migrate
from controller.endpoint import api_dispatcher
from controller.request_journal import ApiJournal
from controller.service import ControllerService


def _delivery(name: str) -> Delivery:
    body = api.VmCreate(name=name, vcpus=1, memory_mib=64, kernel_boot=KernelBoot("/vmlinuz"))
    return Delivery(request(api.API_VM_CREATE, body, "bench"), "api", False, "reply", user_id="bench")


def _create(dispatcher: Dispatcher, name: str) -> None:
    outcome = dispatcher(_delivery(name))
    assert outcome.reply is not None
    unwrap(outcome.reply, api.API_VM_CREATE)


def _run(dispatcher: Dispatcher, prefix: str, creates: int, threads: int) -> float:
    """ms per create (wall time over all creates)."""
    names = [f"{prefix}-{n}" for n in range(creates)]
    start = time.perf_counter()
    if threads <= 1:
        for name in names:
            _create(dispatcher, name)
    else:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            list(pool.map(lambda n: _create(dispatcher, n), names))
    return (time.perf_counter() - start) * 1000.0 / creates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--database", help="a PostgreSQL URL (default: a throw-away SQLite file)")
    parser.add_argument("--hosts", type=int, default=100)
    parser.add_argument("--creates", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    url, drop = _database(args.database)
    engine = make_engine(url)
    try:
        migrate(engine)
        service = ControllerService(engine, ControllerConfig(database_url=url), _InstantAgents())
        now = time.time()
        for n in range(args.hosts):
            service.record_report(_report(f"h{n:04d}", now))
        plain = api_dispatcher(service, "bench")
        journalled = api_dispatcher(service, "bench", journal=ApiJournal(service))
        for n in range(20):  # warm up both (statement caches, the indexes)
            _create(plain, f"warm-p{n}")
            _create(journalled, f"warm-j{n}")
        statements: list[str] = []

        def seen(_conn: Any, _cursor: Any, statement: str, *_rest: Any) -> None:
            statements.append(statement.split(None, 1)[0].upper())

        event.listen(engine, "before_cursor_execute", seen)
        _create(journalled, "counted")
        event.remove(engine, "before_cursor_execute", seen)
        without, with_ = [], []
        for round_ in range(args.rounds):
            without.append(_run(plain, f"r{round_}-p", args.creates, args.threads))
            with_.append(_run(journalled, f"r{round_}-j", args.creates, args.threads))
        service.close()
    finally:
        engine.dispose()
        drop()
    kinds = {k: statements.count(k) for k in sorted(set(statements))}
    off, on = statistics.median(without), statistics.median(with_)
    print(
        f"database {engine.dialect.name}, {args.hosts} hosts, {args.creates} creates x {args.rounds} rounds,"
        f" {args.threads} thread(s)"
    )
    print(f"  statements per journalled create: {len(statements)} {kinds}")
    print(f"  without journal: {', '.join(f'{x:.2f}' for x in without)} ms/create")
    print(f"  with journal:    {', '.join(f'{x:.2f}' for x in with_)} ms/create")
    print(f"  with / without (medians): {on / off:.2f}x (+{on - off:.2f} ms per create)")


if __name__ == "__main__":
    main()
