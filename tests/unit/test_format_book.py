"""The recorded image formats (agent.host_files.FormatBook) on disk: an SQLite database.

What must hold after any crash: an image whose record() returned reads with its format (a qcow2
image is never read as raw, nor a raw one as qcow2), and a forgotten one reads as raw.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from agent.host_files import FormatBook
from common.errors import StorageError


@pytest.fixture
def book_file(tmp_path: Path) -> Path:
    return tmp_path / "state" / "image-formats.db"


def on_disk(book_file: Path) -> dict[str, str]:
    """What another connection reads: what was committed."""
    with sqlite3.connect(book_file) as db:
        return dict(db.execute("SELECT path, format FROM formats"))


def test_each_change_is_committed_before_it_returns(book_file: Path) -> None:
    book = FormatBook(book_file)
    book.record("/p/a.qcow2", "qcow2")
    book.record("/p/b.raw", "raw")
    assert on_disk(book_file) == {"/p/a.qcow2": "qcow2", "/p/b.raw": "raw"}
    book.record("/p/b.raw", "qcow2")  # told again, otherwise: the last word holds
    book.forget("/p/a.qcow2")
    book.forget("/p/never")  # nothing recorded: nothing to write
    assert on_disk(book_file) == {"/p/b.raw": "qcow2"}
    again = FormatBook(book_file)
    assert again.get("/p/a.qcow2") is None
    assert again.format_of("/p/b.raw") == "qcow2"


def test_the_json_record_of_earlier_agents_is_imported_once_and_kept(book_file: Path) -> None:
    legacy = book_file.with_suffix(".json")
    legacy.parent.mkdir()
    legacy.write_text(json.dumps({"/p/a.qcow2": "qcow2", "/p/b.raw": "raw"}))
    book = FormatBook(book_file)
    assert book.format_of("/p/a.qcow2") == "qcow2"
    book.forget("/p/b.raw")
    book.record("/p/c.qcow2", "qcow2")
    # Left for an older agent started again; never read a second time (b stays forgotten).
    assert json.loads(legacy.read_text()) == {"/p/a.qcow2": "qcow2", "/p/b.raw": "raw"}
    again = FormatBook(book_file)
    assert (again.get("/p/a.qcow2"), again.get("/p/b.raw"), again.get("/p/c.qcow2")) == (
        "qcow2",
        None,
        "qcow2",
    )


def test_an_unreadable_json_record_reads_its_images_as_raw(book_file: Path) -> None:
    legacy = book_file.with_suffix(".json")
    legacy.parent.mkdir()
    legacy.write_text("{not json")
    book = FormatBook(book_file)
    assert book.format_of("/p/a") == "raw"
    book.record("/p/b", "qcow2")
    assert FormatBook(book_file).format_of("/p/b") == "qcow2"


def test_a_change_that_could_not_be_committed_is_a_storage_error_and_not_recorded(book_file: Path) -> None:
    book = FormatBook(book_file)
    book.record("/p/a", "qcow2")
    with sqlite3.connect(book_file) as other:
        other.execute("BEGIN EXCLUSIVE")  # another writer holds the database: the commit fails
        with pytest.raises(StorageError, match="cannot record image formats"):
            book.record("/p/b", "qcow2")
        other.rollback()
    assert book.get("/p/b") is None  # not recorded in memory either
    book.record("/p/c", "raw")
    assert on_disk(book_file) == {"/p/a": "qcow2", "/p/c": "raw"}


def test_a_file_that_is_not_a_database_is_a_storage_error(book_file: Path) -> None:
    book_file.parent.mkdir()
    book_file.write_bytes(b"not an sqlite database, but long enough to have a header " * 4)
    with pytest.raises(StorageError, match="cannot open the image format record"):
        FormatBook(book_file)


def test_the_record_is_private_to_the_agent(book_file: Path) -> None:
    FormatBook(book_file).record("/p/a", "qcow2")
    files = sorted(p.name for p in book_file.parent.iterdir())
    assert "image-formats.db" in files
    for path in book_file.parent.iterdir():
        assert path.stat().st_mode & 0o077 == 0, path


def test_without_a_file_the_record_is_kept_in_memory(tmp_path: Path) -> None:
    book = FormatBook()
    book.record("/p/a", "qcow2")
    assert book.format_of("/p/a") == "qcow2"
    book.forget("/p/a")
    assert book.format_of("/p/a") == "raw"
    assert list(tmp_path.iterdir()) == []


def test_a_change_after_close_is_refused_not_kept_in_memory_only(book_file: Path) -> None:
    """A command still running as the agent stops must not believe its format recorded."""
    book = FormatBook(book_file)
    book.record("/p/a", "qcow2")
    book.close()
    with pytest.raises(StorageError, match="closed"):
        book.record("/p/b", "qcow2")
    with pytest.raises(StorageError, match="closed"):
        book.forget("/p/a")
    again = FormatBook(book_file)
    assert (again.get("/p/a"), again.get("/p/b")) == ("qcow2", None)


def test_a_state_directory_that_cannot_be_made_is_a_storage_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(StorageError, match="cannot open the image format record"):
        FormatBook(tmp_path / "file" / "image-formats.db")


def test_the_owner_of_a_new_volume_is_kept_until_it_is_forgotten(book_file: Path) -> None:
    book = FormatBook(book_file)
    book.record("/p/web-vda.qcow2", "qcow2", owner="uuid-1")
    book.record("/p/web-vda.qcow2", "qcow2")  # told the format again (a disk attach): still uuid-1's
    book.record("/p/disk.raw", "raw")
    again = FormatBook(book_file)
    assert again.owner("/p/web-vda.qcow2") == "uuid-1"
    assert again.owner("/p/disk.raw") is None
    again.forget("/p/web-vda.qcow2")
    assert FormatBook(book_file).owner("/p/web-vda.qcow2") is None


def test_the_record_of_an_agent_before_owners_gains_the_column_and_keeps_its_formats(
    book_file: Path,
) -> None:
    book_file.parent.mkdir()
    with sqlite3.connect(book_file) as db:
        db.execute("CREATE TABLE formats (path TEXT PRIMARY KEY, format TEXT NOT NULL)")
        db.execute("INSERT INTO formats VALUES ('/p/old.qcow2', 'qcow2')")
    book = FormatBook(book_file)
    assert (book.format_of("/p/old.qcow2"), book.owner("/p/old.qcow2")) == ("qcow2", None)
    book.record("/p/new.qcow2", "qcow2", owner="uuid-2")
    assert FormatBook(book_file).owner("/p/new.qcow2") == "uuid-2"
