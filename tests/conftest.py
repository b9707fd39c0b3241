"""Shared fixtures. Real parts only: RabbitMQ on 127.0.0.1:5672, SQLite or PostgreSQL,
libvirt's test driver, and (for tests marked ``qemu``) libvirtd with QEMU."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from vfsupport import Fleet, fresh_database, private_vhost


@pytest.fixture(scope="module")
def vhost_url() -> Iterator[str]:
    """A private RabbitMQ vhost for one test module."""
    with private_vhost() as url:
        yield url


@pytest.fixture
def database_url(tmp_path: Path) -> Iterator[str]:
    """An empty database (SQLite file, or PostgreSQL when VIRTFLEET_DATABASE_URL says so)."""
    with fresh_database(tmp_path) as url:
        yield url


@pytest.fixture
def fleet_factory(tmp_path: Path) -> Iterator[list[Fleet]]:
    """Collects fleets so they are always stopped, with their logs printed on failure."""
    fleets: list[Fleet] = []
    yield fleets
    for f in fleets:
        f.stop_all()


@pytest.hookimpl(trylast=True)  # after the folders' conftests have added their markers (db...)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Refuse ``backend_neutral`` on a test that is not ``db``: the marker only takes a database
    test out of deploy/test.sh's PostgreSQL pass, and a test that needs no database is in no such pass."""
    del config
    wrong = [
        i.nodeid
        for i in items
        if i.get_closest_marker("backend_neutral") is not None and i.get_closest_marker("db") is None
    ]
    if wrong:
        raise pytest.UsageError(f"backend_neutral without db: {', '.join(wrong)}")
