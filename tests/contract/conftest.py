"""The contract suite runs every test against both transports: ``memory`` and ``amqp``.

The AMQP variant is marked ``broker`` and runs in the module's private vhost (``vhost_url``
from tests/conftest.py); each test uses its own names (transportkit.Names) inside it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from transportkit import AmqpKit, Consumers, Kit, MemoryKit, Names


@pytest.fixture(params=[pytest.param("memory"), pytest.param("amqp", marks=pytest.mark.broker)])
def kit(request: pytest.FixtureRequest) -> Iterator[Kit]:
    """The transport under test with its broker-side tools."""
    made: Kit = MemoryKit() if request.param == "memory" else AmqpKit(request.getfixturevalue("vhost_url"))
    try:
        yield made
    finally:
        made.close()


@pytest.fixture
def names() -> Names:
    return Names()


@pytest.fixture
def consumers(kit: Kit) -> Iterator[Consumers]:
    """Consumers of one test, stopped before its transports close."""
    del kit  # requested only so that it is torn down after the consumers
    started = Consumers()
    try:
        yield started
    finally:
        started.stop_all()
