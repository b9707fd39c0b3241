"""Signing benchmark: sign + verify of one envelope, µs, next to encode + decode of the same envelope.

The two messages of bench/codec.py (a ``vm.create`` with a full spec, a ``host.report`` of 200
VMs). For each, medians of several timed batches of:

* **codec** (the floor): what a sender and a receiver already pay -- message -> plain data ->
  envelope -> MessagePack bytes, and bytes -> envelope -> typed message;
* **sign**: the controller's signing of a command to a host (the host key derived from the
  master file's current generation, the canonical bytes encoded, HMAC-SHA256);
* **verify**: the receiver's whole admission check (key derived, canonical bytes re-encoded,
  HMAC compared, expiry and skew checks, the replay window lookup).

CPU time of this process (``time.process_time``), not wall time: the machine is shared.

Run from the repository root::

    .venv/bin/python bench/signing.py [--batches 7]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from codec import _messages

from common import codec
from common.messages import host, vm
from common.messages.envelope import Envelope, decode_envelope
from common.signing import FleetKeys, SignatureCheck, Signer, init_master
from common.transport.port import Delivery


def measure(batches: int, workdir: Path) -> list[tuple[str, int, float, float, float]]:
    """(label, bytes, codec µs, sign µs, verify µs) per message."""
    init_master(workdir / "master.key", time.time())
    keys = FleetKeys(workdir / "master.key")
    signer = Signer(keys)
    check = SignatureCheck(keys, lambda _env: "hv-0001")
    create, report = _messages(vm, host)
    rows = []
    for label, message, op in (
        ("vm.create (full spec)", create, vm.VM_CREATE),
        ("host.report (200 VMs)", report, host.HOST_REPORT),
    ):

        def envelope(message: Any = message, kind: str = op.kind) -> Envelope:
            now = time.time()
            return Envelope(
                kind=kind, body=codec.to_wire(message), sender="bench", sent_at=now, expires_at=now + 60
            )

        def round_trip(message: Any = message, op: Any = op) -> object:
            received = decode_envelope(envelope().encode())
            return codec.from_wire(op.body, received.body)

        signed = signer(envelope(), "hv-0001")
        received = decode_envelope(signed.encode())
        check(Delivery(received, "hv-0001", False, None), op)  # its id is now in the replay window
        # Verified again as a broker redelivery: the whole check (key, canonical bytes, HMAC,
        # expiry, skew, window lookup) runs and admits it, so the same envelope can be timed.
        again = Delivery(received, "hv-0001", True, None)

        def sign(env: Envelope = received) -> object:
            return signer(env, "hv-0001")

        def verify(delivery: Delivery = again, op: Any = op) -> None:
            check(delivery, op)

        assert round_trip() == message
        codec_us = _cpu_per_call(round_trip, batches)
        sign_us = _cpu_per_call(sign, batches)
        verify_us = _cpu_per_call(verify, batches)
        rows.append((label, len(signed.encode()), codec_us, sign_us, verify_us))
    return rows


def _cpu_per_call(fn: Callable[[], object], batches: int) -> float:
    """Median CPU µs per call (process time: steadier than wall time on a shared machine) over
    ``batches`` batches sized to take ~0.2 s each."""
    n = 1
    while True:
        t0 = time.process_time()
        for _ in range(n):
            fn()
        if time.process_time() - t0 >= 0.2:
            break
        n *= 2
    samples = []
    for _ in range(batches):
        t0 = time.process_time()
        for _ in range(n):
            fn()
        samples.append((time.process_time() - t0) / n * 1e6)
    return statistics.median(samples)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure(args.batches, Path(tmp))
    print(f"signing: µs per message (median of {args.batches} batches)")
    print(f"{'message':<24}{'bytes':>8}{'codec':>10}{'sign':>9}{'verify':>9}{'(s+v)/codec':>13}")
    for label, size, codec_us, sign_us, verify_us in rows:
        ratio = (sign_us + verify_us) / codec_us
        print(f"{label:<24}{size:>8}{codec_us:>10.1f}{sign_us:>9.1f}{verify_us:>9.1f}{ratio:>12.2f}x")
    print("codec = encode + decode of the same envelope (what every message costs already); CPU µs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
