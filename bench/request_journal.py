"""What the controller's API request journal adds per create: the API Dispatcher with and without
it, on one service and database, in the same run.

Run from the repository root: ``python bench/request_journal.py [--database URL] [--creates 300]
[--threads 8] [--rounds 3]``. Creates go through :func:`controller.endpoint.api_dispatcher` as
deliveries (no broker: what is measured is the controller's own work), agents answered
in-process (a build succeeds at once), as in ``bench/claim_path.py``. Each round runs the
creates without the journal, then with it (alternated, so drift in the machine's load hits both);
printed: ms per call (median of the rounds), the ratio with/without, and the SQL statements and
transactions one call costs with the journal, for creates (journalled by their VM row) and for
``group create`` (a state-changing call journalled in ``api_requests``). ``--threads`` > 1: the creates come from that
many threads at once (as the API workers run them; they are then claimed in batches).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from claim_path import _database, _InstantAgents, _report  # the same fleet and agents
from sqlalchemy import event

from common.messages import api
from common.messages.placement import API_GROUP_CREATE, ServerGroupCreate
from common.messages.vm import KernelBoot
from common.transport.port import Delivery
from common.transport.rpc import Dispatcher, request, unwrap
from controller.config import ControllerConfig
from controller.db.engine import make_engine, migrate
from controller.endpoint import api_dispatcher
from controller.request_journal import ApiJournal
from controller.service import ControllerService


def _create(dispatcher: Dispatcher, name: str) -> None:
    body = api.VmCreate(name=name, vcpus=1, memory_mib=64, kernel_boot=KernelBoot("/vmlinuz"))
    env = request(api.API_VM_CREATE, body, "bench")
    outcome = dispatcher(Delivery(env, "api", False, "reply", user_id="bench"))
    assert outcome.reply is not None
    unwrap(outcome.reply, api.API_VM_CREATE)


def _group(dispatcher: Dispatcher, name: str) -> None:
    """A state-changing call other than a create (journalled in ``api_requests``)."""
    env = request(API_GROUP_CREATE, ServerGroupCreate(name=name, policy="affinity"), "bench")
    outcome = dispatcher(Delivery(env, "api", False, "reply", user_id="bench"))
    assert outcome.reply is not None
    unwrap(outcome.reply, API_GROUP_CREATE)


def _run(
    call: Callable[[Dispatcher, str], None], dispatcher: Dispatcher, prefix: str, n: int, threads: int
) -> float:
    """ms per call (wall time over all calls)."""
    names = [f"{prefix}-{i}" for i in range(n)]
    start = time.perf_counter()
    if threads <= 1:
        for name in names:
            call(dispatcher, name)
    else:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            list(pool.map(lambda name: call(dispatcher, name), names))
    return (time.perf_counter() - start) * 1000.0 / n


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
            _group(plain, f"warm-gp{n}")
            _group(journalled, f"warm-gj{n}")  # the first also runs the journal's first prune
        counted: dict[str, list[str]] = {"create": [], "group create": []}

        def counting(kind: str, call: Callable[[Dispatcher, str], None]) -> None:
            statements = counted[kind]

            def seen(_conn: Any, _cursor: Any, statement: str, *_rest: Any) -> None:
                statements.append(statement.split(None, 1)[0].upper())

            event.listen(engine, "before_cursor_execute", seen)
            call(journalled, f"counted-{len(kind)}")
            event.remove(engine, "before_cursor_execute", seen)

        counting("create", _create)
        counting("group create", _group)
        runs: dict[str, dict[str, list[float]]] = {k: {"without": [], "with": []} for k in counted}
        calls = {"create": _create, "group create": _group}
        for round_ in range(args.rounds):
            for kind, call in calls.items():
                for mode, dispatcher in (("without", plain), ("with", journalled)):
                    prefix = f"r{round_}-{kind[0]}-{mode}"
                    runs[kind][mode].append(_run(call, dispatcher, prefix, args.creates, args.threads))
        service.close()
    finally:
        engine.dispose()
        drop()
    print(
        f"database {engine.dialect.name}, {args.hosts} hosts, {args.creates} calls x {args.rounds} rounds,"
        f" {args.threads} thread(s)"
    )
    for kind, statements in counted.items():
        kinds = {k: statements.count(k) for k in sorted(set(statements))}
        off, on = statistics.median(runs[kind]["without"]), statistics.median(runs[kind]["with"])
        print(f"  {kind}: statements with the journal: {len(statements)} {kinds}")
        print(f"    without journal: {', '.join(f'{x:.2f}' for x in runs[kind]['without'])} ms/call")
        print(f"    with journal:    {', '.join(f'{x:.2f}' for x in runs[kind]['with'])} ms/call")
        print(f"    with / without (medians): {on / off:.2f}x ({on - off:+.2f} ms per call)")


if __name__ == "__main__":
    main()
