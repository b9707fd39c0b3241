"""The security tier (marker ``security``): attacks against a live fleet on the real RabbitMQ, with
the users and permissions deploy/rabbitmq/bootstrap.sh makes, each in a private vhost with users
named uniquely per run (users are global to the broker), created and deleted here."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/security/" in str(item.fspath):
            item.add_marker(pytest.mark.security)
            item.add_marker(pytest.mark.broker)
