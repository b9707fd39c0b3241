"""The full fuzz run: tests/fuzz with many examples, and the number of cases it ran.

CI runs tests/fuzz with a few examples per test (tests/fuzzkit.py ``DEFAULT_EXAMPLES``). This runs
the same tests with ``--examples`` per body type (per kind for the handler tests; twenty times as
many for the raw-bytes tests), then sums the cases each test reports (inputs that reached the
decoder or a handler: ``fuzz_cases`` in pytest's JUnit XML) and prints cases, failures and time.
With the default 250 it is at least 100,000 cases (docs/security.md, "Fuzzing").

Run from the repository root::

    .venv/bin/python bench/fuzz.py [--examples 250] [-- PYTEST ARGS...]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=250, help="examples per body type (250)")
    parser.add_argument("pytest_args", nargs="*", help="more pytest arguments (after --)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "fuzz.xml"
        started = time.monotonic()
        done = subprocess.run(
            [
                sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "timeout=0",
                f"--junitxml={report}", "tests/fuzz", *args.pytest_args,
            ],
            cwd=ROOT,
            env={**os.environ, "VIRTFLEET_FUZZ_EXAMPLES": str(args.examples)},
            check=False,
        )  # fmt: skip
        elapsed = time.monotonic() - started
        cases = tests = failures = 0
        by_test: dict[str, int] = {}
        if report.exists():
            for case in ET.parse(report).getroot().iter("testcase"):
                tests += 1
                failures += len(case.findall("failure")) + len(case.findall("error"))
                for prop in case.iter("property"):
                    if prop.get("name") == "fuzz_cases":
                        by_test[case.get("name", "?")] = int(prop.get("value", "0"))
            cases = sum(by_test.values())
    print(
        f"fuzz: {cases} cases in {tests} tests ({args.examples} examples per body type), "
        f"{failures} failed, {elapsed:.0f} s (pytest exit {done.returncode})"
    )
    decoder = sum(n for name, n in by_test.items() if "handlers" not in name)
    print(f"  decoder cases: {decoder}; handler cases: {cases - decoder}")
    return done.returncode


if __name__ == "__main__":
    raise SystemExit(main())
