"""Shared CLI machinery: global state, calling the controller, rendering errors.

Exit codes: 0 done; 1 the operation failed; 2 invalid input; 3 not found;
4 refused (no valid host, already exists, conflict); 5 controller or broker unavailable,
or no answer in time. With ``--output json`` errors are one JSON document on stdout too.

The entry point imports this module, so rich, the client (and with it the transport) and the
renderers are imported where they are used, when a command runs (docs/performance.md,
"CLI start-up").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any, TextIO, TypeVar

import typer

from common.errors import (
    AlreadyExists,
    CapacityExceeded,
    Conflict,
    HypervisorUnavailable,
    InvalidRequest,
    NotFound,
    NoValidHost,
    PermissionDenied,
    RateLimited,
    RequestTimeout,
    StoreUnavailable,
    TransportError,
    Unauthenticated,
    VirtfleetError,
)

if TYPE_CHECKING:
    from rich.console import Console

    from common.messages.descriptor import ApiCall
    from common.transport.port import Transport
    from controller.cli.client import ApiClient

B = TypeVar("B")
R = TypeVar("R")


class Output(StrEnum):
    TABLE = "table"
    JSON = "json"


#: Opens the transport to the fleet's broker for a URL (tests hand in an in-process broker's).
Connect = Callable[[str], "Transport"]


@dataclass(frozen=True)
class Environment:
    """What the CLI is run with (set as the click context's ``obj``): how to reach the broker,
    and where its output goes (None: the process's stdout/stderr; in-process tests give each call
    its own buffers, so calls from several threads do not mix)."""

    connect: Connect
    stdin: TextIO | None = None
    stdout: TextIO | None = None
    stderr: TextIO | None = None
    width: int | None = None


@dataclass
class State:
    output: Output
    amqp_url: str
    timeout: float | None
    out: Console
    err: Console
    connect: Connect
    stdin: TextIO
    #: ``--idempotency-key``: sent with the command's state-changing calls (None: none)
    idempotency_key: str | None = None

    @property
    def interactive(self) -> bool:
        """Whether a person can answer a question (stdin is a terminal)."""
        return self.stdin.isatty()

    def ask(self, question: str) -> bool:
        """A yes/no question on stderr, answered on stdin; anything but yes is no."""
        self.err.print(f"{question} [y/N] ", end="", highlight=False, markup=False)
        return self.stdin.readline().strip().lower() in {"y", "yes"}

    def client(self, timeout: float | None = None, *, progress: bool = True) -> ApiClient:
        """A client of the controller API (close it after use). With ``progress``, a call that
        waits longer than a second says on stderr what it waits for (controller.cli.progress)."""
        from controller.cli.client import ApiClient  # noqa: PLC0415 - see the module docstring
        from controller.cli.progress import WaitProgress  # noqa: PLC0415 - see the module docstring

        err = self.err

        def waiting(what: str) -> WaitProgress:
            return WaitProgress(err.file, what, tty=err.is_terminal)

        return ApiClient(
            self.connect(self.amqp_url),
            timeout=self.timeout if timeout is None else timeout,
            progress=waiting if progress else None,
            idempotency_key=self.idempotency_key,
        )


EXIT_CODES: list[tuple[type[VirtfleetError], int]] = [
    (InvalidRequest, 2),
    (NotFound, 3),
    (NoValidHost, 4),
    (AlreadyExists, 4),
    (Conflict, 4),
    (CapacityExceeded, 4),
    (TransportError, 5),
    (RequestTimeout, 5),
    (StoreUnavailable, 5),
    (HypervisorUnavailable, 5),
    (Unauthenticated, 6),
    (PermissionDenied, 6),
    (RateLimited, 7),
]


def exit_code(exc: VirtfleetError) -> int:
    for cls, code in EXIT_CODES:
        if isinstance(exc, cls):
            return code
    return 1


def fail(state: State, exc: VirtfleetError) -> typer.Exit:
    """Render ``exc`` (JSON document or text with reasons) and return the Exit to raise."""
    from controller.cli import render  # noqa: PLC0415 - see the module docstring

    if state.output is Output.JSON:
        render.emit_json(state.out, render.error_document(exc))
    else:
        render.error_text(state.err, exc)
    return typer.Exit(exit_code(exc))


def run(ctx: typer.Context, op: ApiCall[B, R], body: B, show: Callable[[State, R], None]) -> None:
    """Call one controller API operation and render its answer (JSON, or ``show`` for people)."""
    from controller.cli import render  # noqa: PLC0415 - see the module docstring

    state: State = ctx.obj
    client = state.client()
    try:
        result = client.call(op, body)
    except VirtfleetError as exc:
        raise fail(state, exc) from None
    finally:
        client.close()
    if state.output is Output.JSON:
        render.emit_json(state.out, result)
    else:
        show(state, result)


def validated(build: Callable[[], Any], ctx: typer.Context) -> Any:
    """Build a request body; invalid input is reported like any other error (exit 2)."""
    try:
        return build()
    except InvalidRequest as exc:
        raise fail(ctx.obj, exc) from None
