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
