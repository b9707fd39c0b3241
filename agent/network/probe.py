"""The real broker probe of a network transaction: an AMQP round trip on a fresh connection."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable

from agent.network.model import ProbeResult
from common.errors import TransportError
from common.transport.amqp import connect


class BrokerProbe:
    """Can this host reach the broker? A real round trip, on a fresh connection each attempt:
    TCP + AMQP handshake, a confirm-mode channel, one transient message published to the
    default exchange and the broker's publisher confirm for it. Retried until the deadline."""

    def __init__(
        self,
        url: str,
        name: str,
        *,
        attempt_timeout: float = 5.0,
        interval: float = 0.5,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.url = url
        self.name = name
        self.attempt_timeout = attempt_timeout
        self.interval = interval
        self._monotonic = monotonic
        self._sleep = sleep

    def attempt(self, timeout: float) -> None:
        """One round trip; TransportError when it fails."""
        conn = connect(self.url, self.name, heartbeat=0, timeout=max(0.5, timeout))
        try:
            ch = conn.channel()
            ch.confirm_delivery()
            # Not mandatory: the broker confirms an unroutable message, which is all we need.
            ch.basic_publish("", f"virtfleet.netprobe.{uuid.uuid4().hex}", b"probe")
        except Exception as exc:  # noqa: BLE001 - pika's errors stay inside common.transport.amqp
            raise TransportError(f"round trip to the broker failed: {type(exc).__name__}: {exc}") from None
        finally:
            with contextlib.suppress(Exception):
                conn.close()

    def __call__(self, deadline_s: float) -> ProbeResult:
        start = self._monotonic()
        end = start + deadline_s
        attempts = 0
        last = "no attempt"
        while True:
            attempts += 1
            remaining = end - self._monotonic()
            try:
                self.attempt(min(self.attempt_timeout, max(remaining, 0.5)))
            except TransportError as exc:
                last = exc.message
            else:
                elapsed = self._monotonic() - start
                return ProbeResult(True, f"broker reached in {elapsed:.2f} s (attempt {attempts})", elapsed)
            if self._monotonic() + self.interval >= end:
                elapsed = self._monotonic() - start
                return ProbeResult(
                    False, f"broker unreachable for {elapsed:.1f} s ({attempts} attempts): {last}", elapsed
                )
            self._sleep(self.interval)
