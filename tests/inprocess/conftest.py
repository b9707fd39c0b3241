"""The in-process tier (marker ``inprocess``): every test here runs without a broker, root or QEMU."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import Engine

from controller.db.engine import make_engine, migrate


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Every test of this folder is in-process and touches the database (so the PostgreSQL pass of
    # deploy/test.sh runs it again, in-process too).
    for item in items:
        if "tests/inprocess/" in str(item.fspath):
            item.add_marker(pytest.mark.inprocess)
            item.add_marker(pytest.mark.db)


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    """A migrated engine on an empty database (a SQLite file, or PostgreSQL when
    VIRTFLEET_DATABASE_URL says so), for tests that drive the service or repository directly."""
    eng = make_engine(database_url)
    migrate(eng)
    try:
        yield eng
    finally:
        eng.dispose()
