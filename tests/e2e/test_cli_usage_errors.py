"""Command-line mistakes, as a script sees them: with --output json, one JSON error document.

No controller is needed: these never get past argument parsing, and nothing is sent.
"""

from __future__ import annotations

import json
import subprocess

import pytest
from vfsupport import BIN

from controller.cli.app import wants_json


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "virtfleet"), *args], capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("image", "create", "h1", "/tmp/x.qcow2", "--format", "foo"), "'--format'"),
        (("vm", "show"), "Missing argument 'name'"),
        (("host", "bogus"), "No such command 'bogus'"),
        (("vm", "create", "a", "--vcpus", "two"), "'--vcpus'"),
    ],
)
def test_json_mode_reports_usage_errors_as_one_document(args: tuple[str, ...], fragment: str) -> None:
    done = run("--output", "json", *args)
    assert done.returncode == 2
    error = json.loads(done.stdout)["error"]
    assert error["type"] == "InvalidRequest" and error["retryable"] is False
    assert fragment in error["message"] and error["details"] == {"usage": True}


def test_table_mode_keeps_the_usage_text() -> None:
    done = run("vm", "show")
    assert done.returncode == 2 and done.stdout == ""
    assert "Missing argument" in done.stderr


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["-o", "json", "vm", "list"], True),
        (["--output=json", "vm"], True),
        (["--output", "table", "vm"], False),
        (["vm", "list", "-o", "json"], False),  # a global option after the command is not one
        ([], False),
        (["--amqp-url", "amqp://x", "-o", "json", "vm"], True),
    ],
)
def test_wants_json_reads_only_the_global_options(argv: list[str], expected: bool) -> None:
    assert wants_json(argv) is expected
