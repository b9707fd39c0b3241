"""The integration tier's fixtures for talking to the broker as the controller does."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from common.transport.amqp import AmqpTransport
from controller.agent_api import AgentClient


@pytest.fixture
def transport(vhost_url: str) -> Iterator[AmqpTransport]:
    """A connection of the test's own to the module's vhost (``vhost_url``), closed afterwards."""
    shared = AmqpTransport(vhost_url, "test-client")
    yield shared
    shared.close()


@pytest.fixture
def client(transport: AmqpTransport) -> AgentClient:
    """What the controller uses to call agents (a new envelope, so a new message id, per call)."""
    return AgentClient(transport, "test")
