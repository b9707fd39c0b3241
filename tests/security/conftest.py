"""The security tier (marker ``security``): issue 12's attacks reproduced against a live fleet on the
real RabbitMQ (agent processes on libvirt's test driver, the real qemu-img), with the users and
permissions deploy/rabbitmq/bootstrap.sh makes where the attack is on the bus, each in a private
vhost with users named uniquely per run (users are global to the broker); each test asserts the
attack had no effect."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/security/" in str(item.fspath):
            item.add_marker(pytest.mark.security)
            item.add_marker(pytest.mark.broker)
