"""Names of every exchange and queue, and their (idempotent) declarations.

See docs/protocol.md for the picture. All declarations are safe to repeat: every party
declares what it uses, so start order does not matter.
"""

from __future__ import annotations

from typing import Any, Protocol

COMMANDS_EXCHANGE = "virtfleet.commands"  # direct, routing key = host id
REPORTS_EXCHANGE = "virtfleet.reports"  # topic, routing key = "<kind>.<host id>"
DEAD_LETTER_EXCHANGE = "virtfleet.dlx"  # fanout
DEAD_LETTER_QUEUE = "virtfleet.dead"
API_QUEUE = "virtfleet.api"  # on the default exchange; competing controllers
REPORTS_QUEUE = "virtfleet.controller.reports"  # competing controllers
#: Heartbeats have their own queue so that they are never stuck behind a backlog of full
#: reports (a late heartbeat would make a busy host look down).
HEARTBEATS_QUEUE = "virtfleet.controller.heartbeats"
HEARTBEAT_TTL_MS = 30_000
#: Reports older than this are worthless (a newer one will follow); keeps the queue short
#: while no controller runs.
REPORT_TTL_MS = 120_000
#: Messages kept in the dead-letter queue before the oldest are dropped.
DEAD_LETTER_MAX = 10_000


def agent_queue(host_id: str) -> str:
    """The durable command queue of one agent."""
    return f"virtfleet.agent.{host_id}"


class Channel(Protocol):
    """The subset of pika's BlockingChannel the declarations use."""

    def exchange_declare(self, exchange: str, exchange_type: str, durable: bool = ...) -> Any: ...

    def queue_declare(
        self,
        queue: str,
        passive: bool = ...,
        durable: bool = ...,
        exclusive: bool = ...,
        auto_delete: bool = ...,
        arguments: dict[str, Any] | None = ...,
    ) -> Any: ...

    def queue_bind(self, queue: str, exchange: str, routing_key: str | None = ...) -> Any: ...


def _dead_letter_args() -> dict[str, Any]:
    return {"x-dead-letter-exchange": DEAD_LETTER_EXCHANGE}


def declare_dead_letters(ch: Channel) -> None:
    """The DLX and the queue that keeps every rejected (malformed) message for inspection."""
    ch.exchange_declare(DEAD_LETTER_EXCHANGE, "fanout", durable=True)
    # Bounded: rejected messages are kept for inspection, not forever (oldest dropped first).
    ch.queue_declare(DEAD_LETTER_QUEUE, durable=True, arguments={"x-max-length": DEAD_LETTER_MAX})
    ch.queue_bind(DEAD_LETTER_QUEUE, DEAD_LETTER_EXCHANGE, "")


def declare_agent_queue(ch: Channel, host_id: str) -> str:
    """The commands exchange and one agent's durable queue bound to it by host id."""
    declare_dead_letters(ch)
    ch.exchange_declare(COMMANDS_EXCHANGE, "direct", durable=True)
    name = agent_queue(host_id)
    ch.queue_declare(name, durable=True, arguments=_dead_letter_args())
    ch.queue_bind(name, COMMANDS_EXCHANGE, host_id)
    return name


def declare_reports(ch: Channel) -> str:
    """The reports exchange and the controllers' shared reports queue."""
    declare_dead_letters(ch)
    ch.exchange_declare(REPORTS_EXCHANGE, "topic", durable=True)
    # No dead-lettering here: an expired report is simply stale (a newer one follows), and a
    # malformed one is logged and dropped rather than filling the dead-letter queue.
    ch.queue_declare(REPORTS_QUEUE, durable=True, arguments={"x-message-ttl": REPORT_TTL_MS})
    ch.queue_bind(REPORTS_QUEUE, REPORTS_EXCHANGE, "host.report.*")
    return REPORTS_QUEUE


def declare_heartbeats(ch: Channel) -> str:
    """The heartbeats exchange binding and the controllers' shared heartbeat queue."""
    ch.exchange_declare(REPORTS_EXCHANGE, "topic", durable=True)
    ch.queue_declare(HEARTBEATS_QUEUE, durable=True, arguments={"x-message-ttl": HEARTBEAT_TTL_MS})
    ch.queue_bind(HEARTBEATS_QUEUE, REPORTS_EXCHANGE, "host.heartbeat.*")
    return HEARTBEATS_QUEUE


def declare_reports_exchange(ch: Channel) -> None:
    """Only the exchange: what an agent needs to publish (it may not read the queue)."""
    ch.exchange_declare(REPORTS_EXCHANGE, "topic", durable=True)


def declare_api_queue(ch: Channel) -> str:
    """The controllers' shared API request queue."""
    declare_dead_letters(ch)
    ch.queue_declare(API_QUEUE, durable=True, arguments=_dead_letter_args())
    return API_QUEUE
