"""``virtfleet``: the operator CLI. Parses, calls one controller endpoint, renders.

The entry point and global options. The machinery (exit codes, JSON vs tables, calling the
controller) is in :mod:`controller.cli.runner`, the command groups in :mod:`controller.cli.tree`
and the commands in ``cmd_*.py``.

This module is what every ``virtfleet`` process imports first, so it imports only what parsing
needs: rich, the message types and the transport are imported where a command uses them, and
the command modules when the command line reaches their group (docs/performance.md,
"CLI start-up"; tests/unit/test_cli_startup.py checks it).
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, cast

import typer

from common.broker_url import DEFAULT_URL
from controller.cli.runner import Environment, Output, State
from controller.cli.tree import LazyRoot

if TYPE_CHECKING:
    from common.transport.port import Transport

app = typer.Typer(
    cls=LazyRoot,
    help="virtfleet: run VMs on a fleet of KVM/libvirt hosts.",
    no_args_is_help=True,
    # plain click help, like the groups' (controller.cli.tree explains why)
    rich_markup_mode=None,
)


@app.callback()
def main_options(
    ctx: typer.Context,
    output: Annotated[
        Output, typer.Option("--output", "-o", help="table for people, json for scripts")
    ] = Output.TABLE,
    amqp_url: Annotated[
        str,
        typer.Option(
            "--amqp-url",
            envvar="VIRTFLEET_AMQP_URL",
            help="RabbitMQ URL of the fleet (several nodes: comma-separated)",
        ),
    ] = DEFAULT_URL,
    timeout: Annotated[float | None, typer.Option(help="seconds to wait for the controller")] = None,
    idempotency_key: Annotated[
        str | None,
        typer.Option(
            "--idempotency-key",
            help="retry-safe: a command repeated with the same key gets the first one's answer"
            " instead of running again (kept request_retention_s, 24 h by default)",
        ),
    ] = None,
) -> None:
    """Global options."""
    # rich only now: a command runs (``--help`` of the root has exited before this callback).
    from rich.console import Console  # noqa: PLC0415

    env = ctx.obj if isinstance(ctx.obj, Environment) else Environment(connect=_open_broker)
    width = env.width or int(os.environ.get("COLUMNS", "160"))
    ctx.obj = State(
        output=output,
        amqp_url=amqp_url,
        timeout=timeout,
        # No markup: names, paths and messages from hosts are printed as they are (a path such as
        # "[/srv/x.raw]" is not a style tag); styled words use rich Text (render.styled).
        out=Console(file=env.stdout, width=width, soft_wrap=False, markup=False),
        err=Console(file=env.stderr, stderr=env.stderr is None, width=width, markup=False),
        connect=env.connect,
        stdin=env.stdin or sys.stdin,
        idempotency_key=idempotency_key,
    )


def _open_broker(url: str) -> Transport:
    from common.transport.factory import open_transport  # noqa: PLC0415 - only a command that calls

    return open_transport(url, name="virtfleet-cli")


def wants_json(argv: list[str]) -> bool:
    """Whether the global options ask for JSON, read before click parses anything (a usage
    error stops parsing before ``main_options`` can record the choice)."""
    takes_value = {"--amqp-url", "--timeout", "--idempotency-key"}
    args = iter(argv)
    for arg in args:
        if arg in ("-o", "--output"):
            return next(args, None) == Output.JSON.value
        if arg in ("--output=json", "-ojson"):
            return True
        if arg in takes_value:
            next(args, None)
        elif not arg.startswith("-"):
            return False  # the command: global options come before it
    return False


@functools.cache
def _command() -> Callable[..., Any]:
    """The click command tree, built once per process (typer rebuilds it on every call otherwise,
    which is most of a CLI call's CPU when several run in one process, as in-process tests do)."""
    return typer.main.get_command(app)


def undecodable(args: Sequence[str]) -> int | None:
    """The index of the first argument that is not valid UTF-8, or None. Python hands such bytes
    of the command line over as lone surrogates (PEP 383), which no UTF-8 text can hold."""
    for index, arg in enumerate(args):
        try:
            arg.encode()
        except UnicodeEncodeError:
            return index
    return None


def _as_typed(arg: str) -> str:
    """An undecodable argument as the bytes typed (``ab\\xffc``), for the error message."""
    try:
        raw = os.fsencode(arg)  # the bytes Python decoded it from (surrogateescape)
    except UnicodeEncodeError:  # a surrogate no byte maps to: handed in by a caller, not a shell
        return arg.encode("utf-8", "backslashreplace").decode()
    return raw.decode("utf-8", "backslashreplace")


def _json_usage_error(message: str, details: dict[str, object], env: Environment | None) -> NoReturn:
    """A command-line mistake under ``--output json``: one error document on stdout, exit 2."""
    # the error path imports what it renders with (see the module docstring)
    from rich.console import Console  # noqa: PLC0415

    from common.errors import InvalidRequest  # noqa: PLC0415
    from controller.cli import render  # noqa: PLC0415

    error = InvalidRequest(message, details=details)
    render.emit_json(Console(file=env.stdout if env else None, soft_wrap=True), render.error_document(error))
    sys.exit(2)


def main(argv: list[str] | None = None, env: Environment | None = None) -> None:
    """Console-script entry point.

    With ``--output json`` a command-line mistake (unknown option, bad choice, missing
    argument) is one JSON error document on stdout with exit 2, like every other error,
    so that scripts never have to parse usage text. ``env`` says how to reach the broker
    (tests hand in an in-process one); by default the URL is opened.
    """
    args = sys.argv[1:] if argv is None else argv
    bad = undecodable(args)
    if bad is not None:
        # No message can carry it (MessagePack text is UTF-8): refused here, before any
        # option is read or anything is sent, as bad input always is (exit 2).
        shown = _as_typed(args[bad])
        message = f"argument {bad + 1} ({shown}) is not valid UTF-8 text"
        if not wants_json(args):
            (env.stderr if env is not None and env.stderr is not None else sys.stderr).write(
                f"Error: {message}\n"
            )
            sys.exit(2)
        _json_usage_error(message, {"usage": True, "argument": bad + 1}, env)
    try:
        code = _command()(args=args, standalone_mode=False, obj=env)
    except typer.TyperException as exc:
        if wants_json(args):
            _json_usage_error(exc.format_message(), {"usage": True}, env)
        if env is not None and env.stderr is not None:
            env.stderr.write(f"Error: {exc.format_message()}\n")
        else:
            # typer's usual panel, on stderr (click's exceptions are TyperExceptions at run time)
            from typer import rich_utils  # noqa: PLC0415

            rich_utils.rich_format_error(cast(Any, exc))
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)
