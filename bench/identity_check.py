"""What the bus identity check (common/transport/identity.py) costs per delivery, next to its floor.

Per message, the median of several timed batches, in microseconds:

* **floor**: decoding the delivery's envelope (``decode_envelope``), which every delivery pays
  before any check can run;
* **check**: the admission check of a heartbeat from its own host's login (the most frequent
  message) and of a command from the controller's login, as the Dispatcher runs it.

Run from the repository root::

    .venv/bin/python bench/identity_check.py [--batches 7] [--number 50000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import timeit
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.messages import host, vm
from common.messages.envelope import decode_envelope
from common.transport.identity import Logins, broker_identity
from common.transport.port import Delivery
from common.transport.rpc import request
from common.transport.topology import report_routing_key


def per_message_us(fn: Callable[[], object], batches: int, number: int) -> float:
    return statistics.median(timeit.repeat(fn, number=number, repeat=batches)) / number * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--batches", type=int, default=7)
    parser.add_argument("--number", type=int, default=50_000)
    args = parser.parse_args()

    check = broker_identity(Logins())
    now = time.time()
    beat = request(
        host.HOST_HEARTBEAT, host.Heartbeat(host_id="node1", seq=1, started_at=now, sent_at=now), "a"
    )
    heartbeat = Delivery(
        beat, report_routing_key(host.HOST_HEARTBEAT.kind, "node1"), False, None, "agent-node1"
    )
    start = request(vm.VM_START, vm.VmAction(vm.VmRef(uuid="u-1", name="web")), "c")
    command = Delivery(start, "node1", False, "virtfleet.reply.controller.x", "controller")
    encoded = beat.encode()

    floor = per_message_us(lambda: decode_envelope(encoded), args.batches, args.number)
    beat_us = per_message_us(lambda: check(heartbeat, host.HOST_HEARTBEAT), args.batches, args.number)
    command_us = per_message_us(lambda: check(command, vm.VM_START), args.batches, args.number)
    print(f"floor   decode_envelope(heartbeat)      {floor:7.2f} us")
    print(f"check   heartbeat from agent-node1      {beat_us:7.2f} us  ({beat_us / floor:.2f} x floor)")
    print(f"check   vm.start from controller        {command_us:7.2f} us  ({command_us / floor:.2f} x floor)")


if __name__ == "__main__":
    main()
