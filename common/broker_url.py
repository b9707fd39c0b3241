"""The broker URL a fleet uses when none is configured.

A plain constant apart from :mod:`common.transport`: the CLI declares its ``--amqp-url`` option
(and shows this default in ``virtfleet --help``) without loading any transport code
(docs/performance.md, "CLI start-up").
"""

from __future__ import annotations

#: The broker of a single-machine installation (RabbitMQ's default user on loopback).
DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
