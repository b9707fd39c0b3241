"""Reconnection delays shared by both transports (kept free of pika on purpose)."""

from __future__ import annotations

import random
from collections.abc import Iterator


def backoff_delays(base: float = 0.2, cap: float = 10.0) -> Iterator[float]:
    """Yield 'full jitter' backoff delays: random in [0, min(cap, base * 2**n)].

    Jitter spreads the reconnections of a whole fleet after a broker restart.
    """
    attempt = 0
    while True:
        yield random.uniform(0, min(cap, base * (2**attempt)))  # noqa: S311 - jitter, not crypto
        attempt += 1
