"""``virtfleet-controller keys ...``: the fleet's signing keys, on the controller's own host.

Secrets never travel over the bus: the operator CLI talks only to the controller through the
broker, so key management is a command of the controller's host, run by whoever may read its
master file (docs/security.md, "Message signatures"):

* ``keys init``: create the master file (generation 1, mode 0600; refused when it exists);
* ``keys enroll HOST... --out FILE | --out-dir DIR``: write each host's key file (its derived key
  of every accepted generation, mode 0600), to be copied to that host;
* ``keys rotate``: a new generation; the previous one stays accepted for ``key_grace_s``;
* ``keys show``: the generations and when they were made (never the secrets).

The master file is ``--master-key-file``, or ``master_key_file`` of ``--config`` /
``VIRTFLEET_MASTER_KEY_FILE``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from common.errors import VirtfleetError
from common.signing import (
    host_keys_of,
    init_master,
    parse_master,
    read_secret_file,
    rotate_master,
    write_secret_file,
)
from common.validation import check_host_id
from controller.config import ControllerConfig, load_config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="virtfleet-controller keys", description="Manage the fleet's message signing keys."
    )
    parser.add_argument("--config", type=Path, help="controller TOML file (for master_key_file)")
    parser.add_argument("--master-key-file", help="the fleet master secret (env VIRTFLEET_MASTER_KEY_FILE)")
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("init", help="create the master file (generation 1)")
    sub.add_parser("rotate", help="start a new key generation (the previous one stays valid for key_grace_s)")
    sub.add_parser("show", help="the key generations (not the secrets)")
    enroll = sub.add_parser("enroll", help="write host key files, to be copied to each host (mode 0600)")
    enroll.add_argument("hosts", nargs="+", metavar="HOST")
    where = enroll.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", type=Path, help="the key file of the one HOST")
    where.add_argument("--out-dir", type=Path, help="write DIR/HOST.key for each HOST")
    enroll.add_argument("--force", action="store_true", help="replace existing key files (after a rotation)")
    return parser


def _when(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def run(args: argparse.Namespace, config: ControllerConfig, now: float) -> list[str]:
    """Do what ``args`` asks; the lines to print."""
    if not config.master_key_file:
        raise VirtfleetError("no master key file: give --master-key-file or set master_key_file")
    path = Path(config.master_key_file)
    if args.action == "init":
        init_master(path, now)
        return [f"created {path} (generation 1)"]
    if args.action == "rotate":
        master = rotate_master(path, now)
        return [
            f"{path}: generation {master.current.number} is current; generation "
            f"{master.generations[1].number} is accepted until {_when(now + config.key_grace_s)}",
            "enroll every host again (keys enroll --force) and let each agent read its new key file",
        ]
    master = parse_master(read_secret_file(path)[0], path)
    if args.action == "show":
        accepted = {g.number for g in master.accepted(now, config.key_grace_s)}
        return [
            f"generation {g.number}: created {_when(g.created_at)}"
            f"{' (current)' if g is master.current else ''}{'' if g.number in accepted else ' (retired)'}"
            for g in master.generations
        ]
    hosts = [check_host_id(h) for h in args.hosts]
    if args.out is not None and len(hosts) != 1:
        raise VirtfleetError("--out takes the key file of one host; use --out-dir for several")
    lines = []
    for host in hosts:
        out = args.out if args.out is not None else args.out_dir / f"{host}.key"
        keys = host_keys_of(master, host, now, config.key_grace_s)
        write_secret_file(out, keys.to_text(), overwrite=args.force)
        lines.append(f"wrote {out}: key of {host}, generation(s) {', '.join(str(g) for g, _k in keys.keys)}")
    return lines


def main(argv: Sequence[str]) -> int:
    """Exit 0 when done, 2 with a message on stderr when refused."""
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config, overrides={"master_key_file": args.master_key_file})
        lines = run(args, config, time.time())
    except VirtfleetError as exc:
        print(f"virtfleet-controller keys: error: {exc.message}", file=sys.stderr)
        return 2
    for line in lines:
        print(line)
    return 0
