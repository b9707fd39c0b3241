"""Open the transport a URL names: ``amqp://`` (RabbitMQ via pika) or ``memory://`` (in process)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from common.errors import InvalidRequest
from common.transport.topology import MAX_MESSAGE_BYTES

if TYPE_CHECKING:
    from common.transport.memory import MemoryBroker
    from common.transport.port import Transport

#: The scheme of the in-process broker.
MEMORY_SCHEME = "memory://"


def open_transport(
    url: str,
    *,
    name: str,
    memory: MemoryBroker | None = None,
    memory_user: str = "guest",
    max_message_bytes: int = MAX_MESSAGE_BYTES,
) -> Transport:
    """A transport for ``url``; ``name`` labels its connections (seen in the broker's UI).

    ``memory://`` URLs name a broker that lives inside this process, so it must be handed in
    (``memory``): there is no process-wide registry of brokers; its connections log in as
    ``memory_user`` (on AMQP the login is the URL's). Nothing larger than ``max_message_bytes``
    is published or handled.
    """
    if url.startswith(MEMORY_SCHEME):
        if memory is None:
            raise InvalidRequest(
                f"{url}: memory:// brokers exist only inside one process; pass the broker object"
            )
        return memory.transport(name, user=memory_user, max_message_bytes=max_message_bytes)
    if url.startswith(("amqp://", "amqps://")):
        # Imported here so that processes on the memory transport never load pika.
        from common.transport.amqp import AmqpTransport  # noqa: PLC0415

        return AmqpTransport(url, name, max_message_bytes=max_message_bytes)
    raise InvalidRequest(f"unsupported broker URL {url!r}: use amqp://… or memory://…")
