"""Reading docs/protocol.md as an independent client would: the generated sections, their Markdown
tables, and the cells' code spans, queue arguments and yes/no.

tests/unit/test_protocol_reference.py checks that what this reads back is exactly the code's
topology; tests/integration/test_protocol_doc_broker.py declares it on a real broker with plain pika.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

DOC = Path(__file__).resolve().parents[1] / "docs" / "protocol.md"


def section(text: str, name: str) -> str:
    """The text between a generated section's markers."""
    start, end = f"<!-- generated: {name} -->", f"<!-- end generated: {name} -->"
    assert text.count(start) == 1, f"{DOC.name} needs exactly one {start}"
    return text.split(start, 1)[1].split(end, 1)[0]


def table(text: str) -> list[dict[str, str]]:
    """The first Markdown table in ``text`` as rows of header -> cell (pipes unescaped)."""
    lines: list[str] = []
    for line in text.splitlines():
        if line.startswith("|"):
            lines.append(line)
        elif lines:
            break
    cells = [[c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]] for line in lines]
    header, _rule, *rows = cells
    return [dict(zip(header, row, strict=True)) for row in rows]


def code(cell: str) -> str:
    """The text of a cell that is one code span; ``""`` stands for the empty string."""
    match = re.fullmatch(r"`([^`]*)`", cell)
    assert match is not None, f"expected a code span, got {cell!r}"
    return "" if match.group(1) == '""' else match.group(1)


def arguments(cell: str) -> dict[str, Any]:
    """``x-max-length: 10000`` (int)<br>... -> {"x-max-length": 10000}, the type checked."""
    if cell == "none":
        return {}
    out: dict[str, Any] = {}
    for part in cell.split("<br>"):
        match = re.fullmatch(r"`([^`:]+): ([^`]+)` \((\w+)\)", part)
        assert match is not None, f"cannot read the queue argument {part!r}"
        name, literal, type_name = match.groups()
        value = ast.literal_eval(literal)
        assert type(value).__name__ == type_name, f"{name}: {literal} is not a {type_name}"
        out[name] = value
    return out


def yes(cell: str) -> bool:
    assert cell in {"yes", "no"}, cell
    return cell == "yes"
