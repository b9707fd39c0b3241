"""docs/operations.md promises a test for every ops-notes row: the named tests must exist.

A renamed or deleted test otherwise leaves the page pointing at nothing.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "operations.md"
# `tests/x/test_y.py::test_z` or a continuation `::test_w` (same file as the id before it)
TEST_REF = re.compile(r"(tests/[\w/]+\.py)?::(test_\w+)")
# Rows that point at another row's tests, or at none (a step that is not virtfleet's to do).
NO_OWN_TESTS = re.compile(r"^(same tests as .+|none)$")


def ops_rows(text: str) -> list[tuple[str, str]]:
    """(first cell, last cell) of every row of every table whose header starts with `| ops notes |`."""
    rows: list[tuple[str, str]] = []
    in_ops_table = False
    for line in text.splitlines():
        if not line.startswith("|"):
            in_ops_table = False
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if cells and cells[0] == "ops notes":
            in_ops_table = True
            continue
        if in_ops_table and not set(cells[0]) <= {"-"}:
            rows.append((cells[0], cells[-1]))
    return rows


def referenced_tests(cell: str) -> list[tuple[str, str]]:
    refs: list[tuple[str, str]] = []
    current: str | None = None
    for path, name in TEST_REF.findall(cell):
        current = path or current
        assert current is not None, f"a `::{name}` with no file before it in: {cell}"
        refs.append((current, name))
    return refs


def test_the_parser_sees_the_three_areas() -> None:
    rows = ops_rows(DOC.read_text())
    assert len(rows) >= 40
    notes = " ".join(first for first, _ in rows)
    for command in ("virt-install", "virsh setvcpus", "qemu-img convert", "brctl", "bond0", "taskset"):
        assert command in notes


def test_parser_handles_continuations_and_escaped_pipes() -> None:
    text = "| ops notes | virtfleet | notes | tested by |\n|---|---|---|---|\n| `a \\| b` | x | y | `tests/u/t.py::test_a`, `::test_b` |\n"
    ((first, last),) = ops_rows(text)
    assert first == "`a \\| b`"
    assert referenced_tests(last) == [("tests/u/t.py", "test_a"), ("tests/u/t.py", "test_b")]


@pytest.mark.parametrize(("row", "cell"), ops_rows(DOC.read_text()), ids=lambda v: str(v)[:40])
def test_every_row_names_tests_that_exist(row: str, cell: str) -> None:
    refs = referenced_tests(cell)
    if not refs:
        assert NO_OWN_TESTS.match(cell), f"row {row!r} names no test: {cell!r}"
        return
    for path, name in refs:
        source = ROOT / path
        assert source.is_file(), f"row {row!r}: {path} does not exist"
        assert re.search(rf"^\s*def {name}\(", source.read_text(), re.M), f"row {row!r}: no {path}::{name}"
