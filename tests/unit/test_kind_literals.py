"""A message kind is spelled in exactly one source file: where its descriptor is declared.

Everything else (controller, agent, CLI, tests, benchmarks) refers to the descriptor object, so
renaming or retiring an operation is one edit, and a typo is an import error, not a message nobody
handles. API calls derived from a command (``api.`` + the command's kind) are spelled nowhere.
"""

from __future__ import annotations

import re
from pathlib import Path

from common.messages.catalogue import CATALOGUE
from common.messages.descriptor import ApiCall

REPO = Path(__file__).resolve().parents[2]
SOURCES = ("controller", "agent", "common", "tests", "bench")


def _python_files() -> dict[Path, str]:
    return {
        path: path.read_text(encoding="utf-8")
        for top in SOURCES
        for path in (REPO / top).rglob("*.py")
        if ".venv" not in path.parts
    }


def test_each_kind_literal_is_in_exactly_one_source_file() -> None:
    files = _python_files()
    wrong: list[str] = []
    for kind, op in CATALOGUE.items():
        literal = re.compile(rf"""["']{re.escape(kind)}["']""")
        where = sorted(str(p.relative_to(REPO)) for p, text in files.items() if literal.search(text))
        derived = isinstance(op, ApiCall) and op.forward is not None
        expected = 0 if derived else 1
        if len(where) != expected:
            wrong.append(f"{kind}: {where or 'nowhere'}")
    assert wrong == []
