"""CLI command ``virtfleet audit list``: the audit log (admins)."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from typing import Annotated

import typer
from rich.table import Table

from common.errors import InvalidRequest
from common.messages.audit import API_AUDIT_LIST, AuditList, AuditListRequest
from controller.cli.runner import State, run, validated
from controller.cli.tree import audit_app

_AGO = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(text: str, now: float) -> float:
    """``--since``: a time ago (``90s``, ``30m``, ``2h``, ``7d``) or an ISO 8601 time (UTC unless it
    names its offset) -> Unix seconds."""
    ago = _AGO.fullmatch(text.strip())
    if ago:
        return now - float(ago.group(1)) * _UNIT_S[ago.group(2)]
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise InvalidRequest(
            f"--since {text!r}: expected a time ago such as 30m, 2h, 7d, or a time such as 2026-12-04T10:00"
        ) from None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


@audit_app.command("list")
def audit_list(
    ctx: typer.Context,
    user: Annotated[str | None, typer.Option(help="only this broker login")] = None,
    since: Annotated[
        str | None, typer.Option(help="only since: 30m, 2h, 7d, or a time such as 2026-12-04T10:00 (UTC)")
    ] = None,
    kind: Annotated[str | None, typer.Option(help="only this operation, e.g. api.vm.create")] = None,
    limit: Annotated[int, typer.Option(help="at most this many, newest first")] = 100,
) -> None:
    """Who changed what (every call above reader) and every refused call, newest first."""
    body = validated(
        lambda: AuditListRequest(
            user=user,
            since=None if since is None else parse_since(since, time.time()),
            kind=kind,
            limit=limit,
        ),
        ctx,
    )

    def show(s: State, r: AuditList) -> None:
        table = Table("time (UTC)", "login", "kind", "target", "result", "request id")
        for e in r.entries:
            result = e.result if e.message is None else f"{e.result}: {e.message}"
            table.add_row(_when(e.at), e.login or "-", e.kind, e.target or "-", result, e.request_id)
        s.out.print(table)

    run(ctx, API_AUDIT_LIST, body, show)
