"""``virtfleet ... --help`` loads no transport, codec, database or markdown code.

Start-up time is mostly imports (docs/performance.md, "CLI start-up"), so what a ``--help`` imports
is checked here, in a fresh interpreter each time, rather than timed (the timing is
bench/cli_startup.py's). The root ``--help`` must not load the message types either; a group's
``--help`` does (the ``vm`` verbs come from the catalogue), but still nothing that talks.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

#: Never imported for any --help: the transport and what is behind it, the database, and typer's
#: rich help formatter (rich.markdown is its biggest import).
NEVER = ("pika", "msgpack", "sqlalchemy", "alembic", "common.transport", "common.codec", "rich.markdown")
#: Not imported for ``virtfleet --help`` either: the message types and the command modules.
NOT_AT_ROOT = (*NEVER, "msgspec", "common.messages", "controller.cli.cmd_core", "controller.cli.render")

PROBE = textwrap.dedent(
    """
    import contextlib, io, json, sys

    from controller.cli.app import main

    with contextlib.redirect_stdout(io.StringIO()) as out:
        try:
            main(sys.argv[1:])
        except SystemExit as exc:
            code = exc.code
    print(json.dumps({"code": code, "help": out.getvalue(), "modules": sorted(sys.modules)}))
    """
)


def imported_by(argv: list[str]) -> tuple[str, set[str]]:
    """The help text and the modules a fresh interpreter has imported after ``virtfleet argv``."""
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, check=True, timeout=60
    )
    result = json.loads(done.stdout)
    assert result["code"] == 0, done.stderr
    return result["help"], set(result["modules"])


def loaded(modules: set[str], forbidden: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if any(m == f or m.startswith(f + ".") for f in forbidden))


def test_root_help_imports_no_messages_transport_or_database() -> None:
    text, modules = imported_by(["--help"])
    assert "vm " in text and "image " in text  # the groups are listed without being built
    assert loaded(modules, NOT_AT_ROOT) == []


@pytest.mark.parametrize("argv", [["vm", "--help"], ["vm", "create", "--help"], ["host", "net", "--help"]])
def test_group_and_command_help_import_no_transport_or_database(argv: list[str]) -> None:
    text, modules = imported_by(argv)
    assert "Usage:" in text
    assert loaded(modules, NEVER) == []
