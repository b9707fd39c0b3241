"""CLI start-up benchmark: wall time of ``virtfleet ... --help`` as processes, next to floors.

Each command runs ``--runs`` times as a fresh process (stdout and stderr discarded); the figures
are the median and the 90th percentile of its wall time. The floors run in the same rounds, so
that a busy machine slows them as much as the CLI:

* ``python -c pass``: the interpreter and site (the venv's .pth files included);
* ``python -c "import typer"``: what any typer CLI imports;
* ``python -c "import typer._adapters"``: typer plus the pydantic-based option coercion it imports
  the first time it converts an option's value; every command below the root pays it (the root's
  ``--output`` / ``--amqp-url`` / ``--timeout`` are converted before a group is entered).

Every round runs each command once, in the same order, so drifts in load spread over all rows.
With ``--before REV`` the same commands also run from the tree of another revision (extracted
with ``git archive`` into a temporary directory, run by this venv's Python with that tree first on
``sys.path`` and as the working directory), to compare before and after in one run.

Run from the repository root::

    .venv/bin/python bench/cli_startup.py [--runs 30] [--before REV]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = str(ROOT / ".venv" / "bin" / "python")
ENTRY_POINT = str(ROOT / ".venv" / "bin" / "virtfleet")
#: What the console script does, for a tree that is not installed (``--before``).
LAUNCH = "import sys; from controller.cli.app import main; sys.argv[0] = 'virtfleet'; main()"
COMMANDS = (["--help"], ["vm", "--help"], ["vm", "create", "--help"])
FLOORS = {
    "python -c pass": [PYTHON, "-c", "pass"],
    "import typer": [PYTHON, "-c", "import typer"],
    "import typer._adapters": [PYTHON, "-c", "import typer._adapters"],
}


@dataclass
class Row:
    label: str
    argv: list[str]
    env: dict[str, str] | None = None
    cwd: str | None = None
    times: list[float] = field(default_factory=list)

    def run_once(self) -> None:
        started = time.perf_counter()
        subprocess.run(
            self.argv,
            env=self.env,
            cwd=self.cwd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=True,
            timeout=60,
        )
        self.times.append(time.perf_counter() - started)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def p90(self) -> float:
        ordered = sorted(self.times)
        return ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]


def extract(rev: str, into: Path) -> None:
    """The tree of ``rev`` under ``into`` (no git worktree: nothing is registered in .git)."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)


def rows_for(label: str, launcher: list[str], env: dict[str, str], cwd: str | None = None) -> list[Row]:
    return [Row(f"{label}: virtfleet {' '.join(args)}", [*launcher, *args], env, cwd) for args in COMMANDS]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=30, help="processes per row (default 30)")
    parser.add_argument("--before", metavar="REV", help="also run the CLI of this git revision")
    args = parser.parse_args()

    env = dict(os.environ, COLUMNS="100")
    floors = [Row(name, argv, env) for name, argv in FLOORS.items()]
    rows = rows_for("this tree", [ENTRY_POINT], env)
    with tempfile.TemporaryDirectory(prefix="cli-startup-") as tmp:
        if args.before:
            extract(args.before, Path(tmp))
            # run from there too: ``python -c`` puts the working directory first on sys.path
            before_env = dict(env, PYTHONPATH=tmp)
            rows += rows_for(f"before {args.before}", [PYTHON, "-c", LAUNCH], before_env, cwd=tmp)
        everything = floors + rows
        for row in everything:  # once unmeasured: the page cache and .pyc files are warm
            row.run_once()
            row.times.clear()
        for _ in range(args.runs):
            for row in everything:
                row.run_once()

    base, typer_floor = floors[0].median, floors[1].median
    width = max(len(r.label) for r in everything)
    print(f"{args.runs} runs each; ratios are medians over the floors' medians (same run)\n")
    print(f"{'':{width}}  median ms   p90 ms   / python   / typer")
    for row in everything:
        print(
            f"{row.label:{width}}  {row.median * 1e3:9.1f}  {row.p90 * 1e3:7.1f}"
            f"  {row.median / base:8.2f}x  {row.median / typer_floor:7.2f}x"
        )


if __name__ == "__main__":
    main()
