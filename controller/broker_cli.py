"""``virtfleet-controller broker migrate``: make an older release's classic queues quorum queues.

Every shared queue of this release is a quorum queue (common/transport/topology.py); a broker
that has the classic queues of an older release refuses to redeclare them (``406``, the
controllers and agents log the queue and this command). Stop the controllers and agents, run
this once (with the controller's configuration: its broker URL and login, and its database for the
hosts whose command queues to move; ``--host`` adds more), then start the new release. Safe to run
again; see :mod:`common.transport.amqp_migration` for the steps (docs/operations.md, "Running it
highly available").
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import sqlalchemy as sa

from common.errors import VirtfleetError
from common.transport.topology import SHARED_QUEUES, Queue, agent_queue
from common.validation import check_host_id
from controller.config import load_config
from controller.db.engine import make_engine
from controller.db.models import Host


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="virtfleet-controller broker", description="Broker maintenance (the controller's login)."
    )
    parser.add_argument("--config", type=Path, help="controller TOML file (amqp_url, database_url)")
    parser.add_argument("--amqp-url", help="broker URL(s), comma-separated (env VIRTFLEET_AMQP_URL)")
    parser.add_argument("--database-url", help="the controller database (for the hosts' command queues)")
    sub = parser.add_subparsers(dest="action", required=True)
    migrate = sub.add_parser(
        "migrate", help="move classic queues to quorum queues, keeping their messages (stop consumers first)"
    )
    migrate.add_argument("--host", action="append", default=[], help="also this host's command queue")
    migrate.add_argument(
        "--no-database", action="store_true", help="do not read the hosts from the database (only --host)"
    )
    return parser


def queues_to_migrate(hosts: Sequence[str]) -> list[Queue]:
    """The shared quorum queues (not the dead-letter queue, which stays classic: topology.py) and
    each host's command queue."""
    shared = [q for q in SHARED_QUEUES if q.arguments.get("x-queue-type") == "quorum"]
    return [*shared, *(agent_queue(h) for h in sorted(set(hosts)))]


def _database_hosts(url: str) -> list[str]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return list(conn.scalars(sa.select(Host.id)))
    except sa.exc.SQLAlchemyError as exc:
        raise VirtfleetError(
            f"cannot read the hosts from the database ({type(exc).__name__}); give --host or --no-database"
        ) from None
    finally:
        engine.dispose()


def main(argv: Sequence[str]) -> int:
    """Exit 0 when every queue is a quorum queue, 2 with a message on stderr otherwise."""
    args = build_parser().parse_args(argv)
    # Imported here: pika only for this command (the keys commands never need it).
    from common.transport.amqp_migration import migrate  # noqa: PLC0415

    try:
        config = load_config(
            args.config, overrides={"amqp_url": args.amqp_url, "database_url": args.database_url}
        )
        hosts = [check_host_id(h) for h in args.host]
        if not args.no_database:
            hosts += _database_hosts(config.database_url)
        results = migrate(config.amqp_url, queues_to_migrate(hosts), name="virtfleet-controller-migrate")
    except VirtfleetError as exc:
        print(f"virtfleet-controller broker: error: {exc.message}", file=sys.stderr)
        return 2
    for result in results:
        print(
            f"{result.queue}: {result.result.value}"
            + (f", {result.messages} message(s) moved" if result.messages else "")
        )
    return 0
