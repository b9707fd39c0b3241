"""Command-line mistakes, as a script sees them: with --output json, one JSON error document.

No controller runs here: these never get past argument parsing, and nothing is sent (a command
that did get through would end with exit 5, "no virtfleet controller is running", instead of 2).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from inproc import InProcessFleet

from controller.cli.app import wants_json

# SQLite only (deploy/test.sh): usage errors and a missing controller never reach the database.
pytestmark = pytest.mark.backend_neutral


@pytest.fixture
def no_controller(tmp_path: Path) -> InProcessFleet:
    """A broker with nothing on it: no controller, no agents, no database."""
    return InProcessFleet(tmp_path, database_url="sqlite:///unused")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("image", "create", "h1", "/tmp/x.qcow2", "--format", "foo"), "'--format'"),
        (("vm", "show"), "Missing argument 'name'"),
        (("host", "bogus"), "No such command 'bogus'"),
        (("vm", "create", "a", "--vcpus", "two"), "'--vcpus'"),
    ],
)
def test_json_mode_reports_usage_errors_as_one_document(
    no_controller: InProcessFleet, args: tuple[str, ...], fragment: str
) -> None:
    done = no_controller.cli(*args, output="json")
    assert done.code == 2, done.stdout + done.stderr
    error = done.json["error"]
    assert error["type"] == "InvalidRequest" and error["retryable"] is False
    assert fragment in error["message"] and error["details"] == {"usage": True}
    assert no_controller.broker.queues() == ()  # nothing was sent


@pytest.mark.parametrize("output", ["json", "table"])
def test_an_argument_that_is_not_utf8_is_refused_before_anything_is_sent(
    no_controller: InProcessFleet, output: str
) -> None:
    # What Python makes of the bytes of `virtfleet host disable h1 --reason $'ab\xffc'` (PEP 383):
    # no message can carry it; it used to fail in the encoder with exit 1 (DecodeError).
    done = no_controller.cli("host", "disable", "h1", "--reason", "ab\udcffc", output=output)
    assert done.code == 2, done.stdout + done.stderr
    if output == "json":
        error = done.json["error"]
        assert error["type"] == "InvalidRequest" and error["details"]["usage"] is True
        assert f"argument {error['details']['argument']} (ab\\xffc) is not valid UTF-8" in error["message"]
    else:
        assert done.stdout == "" and "(ab\\xffc) is not valid UTF-8" in done.stderr
    assert no_controller.broker.queues() == ()  # nothing was sent


def test_table_mode_keeps_the_usage_text(no_controller: InProcessFleet) -> None:
    done = no_controller.cli("vm", "show", output="table")
    assert done.code == 2 and done.stdout == ""
    assert "Missing argument" in done.stderr


def test_cli_says_clearly_when_no_controller_runs(no_controller: InProcessFleet) -> None:
    table = no_controller.cli("host", "list", output="table")
    assert table.code == 5
    assert "no virtfleet controller is running" in table.stderr
    scripted = no_controller.cli("vm", "list")
    assert scripted.code == 5
    error = scripted.json["error"]
    assert error["type"] == "ControllerUnavailable" and error["retryable"] is True
    assert "no virtfleet controller is running" in error["message"]


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
