"""RabbitMQ's own CPU per round trip on a classic and on a quorum queue: what each message of a
create costs the broker, whatever virtfleet does around it.

A plain pika echo server in another process consumes a durable queue (prefetch 100) and answers
each message on the caller's exclusive reply queue; this process keeps ``--window`` persistent
200-byte requests outstanding until ``--calls`` round trips are done. The broker's CPU is read
from ``/proc/PID/stat`` of every ``beam.smp`` process before and after (so the node should serve
nothing else meanwhile: use a private node, see docs/performance.md, "Reproduce").

    .venv/bin/python bench/broker_queues.py [--calls 3000] [--window 64] [--repeat 2]

Bounded (a timeout per run) and self-cleaning: a private vhost, deleted at the end.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import pika

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fleet import BROKER_COMMANDS, named_cpu
from fleetkit import private_vhost

ECHO = """
import sys, pika
conn = pika.BlockingConnection(pika.URLParameters(sys.argv[1]))
ch = conn.channel()
ch.basic_qos(prefetch_count=100)
left = [int(sys.argv[3])]
def on(ch, method, props, body):
    ch.basic_publish("", props.reply_to, body, pika.BasicProperties(correlation_id=props.correlation_id))
    ch.basic_ack(method.delivery_tag)
    left[0] -= 1
    if left[0] == 0:
        ch.stop_consuming()
ch.basic_consume(sys.argv[2], on)
print("ready", flush=True)
ch.start_consuming()
"""


def round_trips(url: str, queue_type: str, calls: int, window: int, timeout: float) -> tuple[float, float]:
    """(round trips per second, broker CPU ms per round trip) on a fresh queue of ``queue_type``."""
    name = f"bench.cost.{queue_type}"
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        ch.queue_declare(name, durable=True, arguments={"x-queue-type": queue_type})
        reply = ch.queue_declare("", exclusive=True).method.queue
        server = subprocess.Popen(
            [sys.executable, "-c", ECHO, url, name, str(calls)], stdout=subprocess.PIPE, text=True
        )
        try:
            assert server.stdout is not None
            server.stdout.readline()
            got = [0]
            ch.basic_consume(reply, lambda _c, _m, _p, _b: got.__setitem__(0, got[0] + 1), auto_ack=True)
            deadline = time.monotonic() + timeout
            started, cpu0 = time.perf_counter(), named_cpu(BROKER_COMMANDS)
            sent = 0
            while got[0] < calls:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{got[0]} of {calls} round trips in {timeout} s")
                while sent < calls and sent - got[0] < window:
                    props = pika.BasicProperties(reply_to=reply, correlation_id=str(sent), delivery_mode=2)
                    ch.basic_publish("", name, b"x" * 200, props)
                    sent += 1
                conn.process_data_events(time_limit=0.01)
            elapsed, cpu = time.perf_counter() - started, named_cpu(BROKER_COMMANDS) - cpu0
            server.wait(timeout)
        finally:
            if server.poll() is None:
                server.kill()
                server.wait()
        ch.queue_delete(name)
    finally:
        if conn.is_open:
            conn.close()
    return calls / elapsed, cpu / calls * 1000


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args()
    with private_vhost("vfbench-queues") as url:
        for run in range(1, args.repeat + 1):
            for queue_type in ("classic", "quorum"):
                rate, ms = round_trips(url, queue_type, args.calls, args.window, args.timeout)
                print(
                    f"run {run}: {queue_type:7} {rate:6.0f} round trips/s, broker CPU {ms:.3f} ms per round trip"
                )


if __name__ == "__main__":
    main()
