"""The agent journal's cost per command, next to its floors.

Each command of the agent's path costs the journal one ``get`` (was it handled already?) and one
``put`` (record the reply, prune old rows): what :class:`common.transport.rpc.Dispatcher` does.
This times that pair with the journal as shipped and with ``synchronous=FULL`` (an fsync of the
WAL on every commit, the setting before issue 11), beside two floors: an empty SQLite transaction
(SQLite's own overhead, no I/O) and a 300-byte write plus ``os.fsync`` of a temporary file (one
flush to this disk).

    .venv/bin/python bench/agent_journal.py [--commands 2000] [--dir DIR] [--repeat 3]

``--dir`` should be on the filesystem of the agent's state directory (/var/lib/virtfleet/agent by
default); a tmpfs would hide the fsync.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from agent.journal import SqliteJournal
from common.messages.vm import VM_CREATE

REPLY = os.urandom(300)  # about a VmResult reply envelope


def per_command_us(run: Callable[[int], None], commands: int) -> float:
    start = time.perf_counter()
    run(commands)
    return (time.perf_counter() - start) / commands * 1e6


def journal_run(directory: Path, synchronous: str | None) -> Callable[[int], None]:
    def run(commands: int) -> None:
        path = directory / f"journal-{uuid.uuid4().hex}.db"
        journal = SqliteJournal(path)
        if synchronous is not None:
            # The same connection the journal uses; set as SqliteJournal did before issue 11.
            db = journal._conn()
            db.execute(f"PRAGMA synchronous={synchronous}")
        try:
            for _ in range(commands):
                message_id = uuid.uuid4().hex
                assert journal.get(message_id) is None
                journal.put(message_id, VM_CREATE.kind, REPLY)
        finally:
            journal.close()
            for suffix in ("", "-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)

    return run


def empty_transactions(directory: Path) -> Callable[[int], None]:
    def run(commands: int) -> None:
        path = directory / f"empty-{uuid.uuid4().hex}.db"
        db = sqlite3.connect(path, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        try:
            for _ in range(commands):
                db.execute("BEGIN IMMEDIATE")
                db.execute("COMMIT")
        finally:
            db.close()
            for suffix in ("", "-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)

    return run


def fsyncs(directory: Path) -> Callable[[int], None]:
    def run(commands: int) -> None:
        fd, name = tempfile.mkstemp(dir=directory)
        try:
            for _ in range(commands):
                os.write(fd, REPLY)
                os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(name)

    return run


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--commands", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--dir", type=Path, default=None, help="where the files go (default: a temporary dir under /var/tmp)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir or "/var/tmp", prefix="vf-journal-") as tmp:
        directory = Path(tmp)
        cases: list[tuple[str, Callable[[int], None]]] = [
            ("floor: empty SQLite transaction (WAL)", empty_transactions(directory)),
            ("floor: write 300 B + os.fsync", fsyncs(directory)),
            ("journal get+put, synchronous=FULL (before)", journal_run(directory, "FULL")),
            ("journal get+put, as shipped (WAL, NORMAL)", journal_run(directory, None)),
        ]
        print(
            f"{args.commands} commands x {args.repeat} runs in {directory} (median, min-max, µs per command)"
        )
        for label, run in cases:
            runs = [per_command_us(run, args.commands) for _ in range(args.repeat)]
            print(f"  {label:<46} {statistics.median(runs):9.1f}   {min(runs):.1f}-{max(runs):.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
