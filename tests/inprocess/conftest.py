"""The in-process tier (marker ``inprocess``): every test here runs without a broker, root or QEMU."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Every test of this folder is in-process and touches the database (so the PostgreSQL pass of
    # deploy/test.sh runs it again, in-process too).
    for item in items:
        if "tests/inprocess/" in str(item.fspath):
            item.add_marker(pytest.mark.inprocess)
            item.add_marker(pytest.mark.db)
