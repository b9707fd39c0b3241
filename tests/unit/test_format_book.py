"""The recorded image formats (agent.host_files.FormatBook) on disk: a record plus a change log.

What must hold after any crash: an image whose record() returned reads with its format (a qcow2
image is never read as raw, nor a raw one as qcow2), and a forgotten one reads as raw.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from agent import host_files
from agent.host_files import FormatBook, change_log_path


@pytest.fixture
def book_file(tmp_path: Path) -> Path:
    return tmp_path / "state" / "image-formats.json"


def log_lines(book_file: Path) -> list[object]:
    return [json.loads(line) for line in change_log_path(book_file).read_text().splitlines()]


def test_a_change_is_one_appended_line_not_a_rewrite(book_file: Path) -> None:
    book = FormatBook(book_file)
    book.record("/p/a.qcow2", "qcow2")
    book.record("/p/b.raw", "raw")
    book.record("/p/b.raw", "raw")  # the same again: nothing to write
    book.forget("/p/a.qcow2")
    book.forget("/p/never")  # nothing recorded: nothing to write
    assert not book_file.exists()  # the whole record was never written
    assert log_lines(book_file) == [["/p/a.qcow2", "qcow2"], ["/p/b.raw", "raw"], ["/p/a.qcow2", None]]
    again = FormatBook(book_file)
    assert again.get("/p/a.qcow2") is None
    assert again.format_of("/p/b.raw") == "raw"


def test_a_record_written_by_earlier_agents_is_read(book_file: Path) -> None:
    book_file.parent.mkdir()
    book_file.write_text(json.dumps({"/p/a.qcow2": "qcow2", "/p/b.raw": "raw"}))
    book = FormatBook(book_file)
    assert book.format_of("/p/a.qcow2") == "qcow2"
    book.record("/p/c.qcow2", "qcow2")
    book.forget("/p/b.raw")
    again = FormatBook(book_file)
    assert (again.get("/p/a.qcow2"), again.get("/p/b.raw"), again.get("/p/c.qcow2")) == (
        "qcow2",
        None,
        "qcow2",
    )


def test_the_log_is_folded_into_the_record_when_long(
    book_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(host_files, "COMPACT_AFTER", 3)
    book = FormatBook(book_file)
    book.record("/p/1", "qcow2")
    book.record("/p/2", "raw")
    assert len(log_lines(book_file)) == 2
    book.record("/p/3", "qcow2")  # the third change: folded
    assert json.loads(book_file.read_text()) == {"/p/1": "qcow2", "/p/2": "raw", "/p/3": "qcow2"}
    assert change_log_path(book_file).read_text() == ""
    book.forget("/p/2")
    again = FormatBook(book_file)
    assert (again.get("/p/1"), again.get("/p/2"), again.get("/p/3")) == ("qcow2", None, "qcow2")


def test_a_log_longer_than_the_threshold_is_folded_at_start(
    book_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    book = FormatBook(book_file)
    for i in range(4):
        book.record(f"/p/{i}", "qcow2")
    monkeypatch.setattr(host_files, "COMPACT_AFTER", 3)
    FormatBook(book_file)
    assert change_log_path(book_file).read_text() == ""
    assert FormatBook(book_file).format_of("/p/3") == "qcow2"


def test_a_crash_between_the_record_and_emptying_the_log_loses_nothing(book_file: Path) -> None:
    """The record was renamed into place but the log not yet emptied: the log replays onto a
    record that holds it already."""
    book_file.parent.mkdir()
    book_file.write_text(json.dumps({"/p/b": "raw"}))  # the state after the log below
    change_log_path(book_file).write_text(
        "".join(json.dumps(c) + "\n" for c in (["/p/a", "qcow2"], ["/p/b", "raw"], ["/p/a", None]))
    )
    book = FormatBook(book_file)
    assert (book.get("/p/a"), book.get("/p/b")) == (None, "raw")


def test_a_torn_last_line_is_dropped_and_later_changes_survive(book_file: Path) -> None:
    """A crash during an append leaves part of a line (its record() never returned). It must not
    swallow the next change, which would be appended to it."""
    book_file.parent.mkdir()
    change_log_path(book_file).write_text(json.dumps(["/p/a", "qcow2"]) + '\n["/p/tor')
    book = FormatBook(book_file)
    assert book.format_of("/p/a") == "qcow2"
    book.record("/p/b", "qcow2")
    again = FormatBook(book_file)
    assert (again.get("/p/a"), again.get("/p/b"), again.get("/p/tor")) == ("qcow2", "qcow2", None)


def test_an_unreadable_line_is_skipped_not_the_rest(book_file: Path) -> None:
    book_file.parent.mkdir()
    change_log_path(book_file).write_text('["/p/a", "qcow2"]\n{"not": "a change"}\n["/p/b", "raw"]\n')
    book = FormatBook(book_file)
    assert (book.get("/p/a"), book.get("/p/b")) == ("qcow2", "raw")


def test_a_change_that_could_not_be_synced_is_taken_back(
    book_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    book = FormatBook(book_file)
    book.record("/p/a", "qcow2")

    def failing(_fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", failing)
    with pytest.raises(OSError):
        book.record("/p/b", "qcow2")
    monkeypatch.undo()
    assert book.get("/p/b") is None  # not recorded in memory either
    assert log_lines(book_file) == [["/p/a", "qcow2"]]
    book.record("/p/c", "raw")
    again = FormatBook(book_file)
    assert (again.get("/p/a"), again.get("/p/b"), again.get("/p/c")) == ("qcow2", None, "raw")


def test_the_log_is_private_to_the_agent(book_file: Path) -> None:
    FormatBook(book_file).record("/p/a", "qcow2")
    assert change_log_path(book_file).stat().st_mode & 0o077 == 0


def test_without_a_file_the_record_is_kept_in_memory(tmp_path: Path) -> None:
    book = FormatBook()
    book.record("/p/a", "qcow2")
    assert book.format_of("/p/a") == "qcow2"
    book.forget("/p/a")
    assert book.format_of("/p/a") == "raw"
    assert list(tmp_path.iterdir()) == []
