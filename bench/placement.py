"""Placement benchmark: pure decision latency, end-to-end creates on the real broker, and the
raw pika request/reply round trip on this machine (so the overhead is a ratio).

Run as root from the repository root (needs RabbitMQ on 127.0.0.1:5672 and rabbitmqctl)::

    .venv/bin/python bench/placement.py [--agents 5] [--creates 300] [--clients 16] [--quick]

It prints:
1. ``bench/placement_pure.py``'s figures: p50/p99 of place() at 100, 1,000 and 10,000 hosts
   and the packing quality of the pack policy against a lower bound on the optimum;
2. the raw pika RPC round trip (a BlockingConnection echo server in another process,
   exclusive reply queue, persistent requests with publisher confirms, like ours);
3. end-to-end ``api.vm.create`` against one real controller (SQLite) and N simulated agents
   (libvirt test driver) in a private vhost: sequential p50/p99 latency, and creates per
   second with several concurrent clients; the e2e p50 divided by the raw RPC p50.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import pika  # noqa: E402
from vfsupport import Fleet, fresh_database, node_uri, private_vhost  # noqa: E402

from common.messages import api  # noqa: E402
from common.transport.amqp import AmqpTransport  # noqa: E402
from controller.cli.client import ApiClient  # noqa: E402

ECHO_SERVER = """
import sys, pika
conn = pika.BlockingConnection(pika.URLParameters(sys.argv[1]))
ch = conn.channel()
ch.queue_declare("bench.echo", durable=True, arguments={"x-queue-type": sys.argv[2]})
ch.basic_qos(prefetch_count=50)
def on(ch, method, props, body):
    ch.basic_publish("", props.reply_to, body, pika.BasicProperties(correlation_id=props.correlation_id))
    ch.basic_ack(method.delivery_tag)
ch.basic_consume("bench.echo", on)
print("ready", flush=True)
ch.start_consuming()
"""


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def raw_rpc(url: str, calls: int, *, persistent: bool = True, queue_type: str = "classic") -> list[float]:
    """Round trips of a 200-byte request through a plain pika echo server in another process
    (confirmed publishes; ``persistent``: delivery_mode 2, as agent commands, else 1, as API calls),
    on a durable queue of ``queue_type`` (``classic``, or ``quorum`` as virtfleet's queues are)."""
    server = subprocess.Popen(
        [sys.executable, "-c", ECHO_SERVER, url, queue_type], stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        server.stdout.readline()
        conn = pika.BlockingConnection(pika.URLParameters(url))
        ch = conn.channel()
        ch.confirm_delivery()
        reply_q = ch.queue_declare("", exclusive=True).method.queue
        got: dict[str, bytes] = {}
        ch.basic_consume(reply_q, lambda _c, _m, p, b: got.__setitem__(p.correlation_id, b), auto_ack=True)
        body = b"x" * 200
        samples = []
        for i in range(calls + 100):
            cid = str(i)
            t0 = time.perf_counter()
            ch.basic_publish(
                "",
                "bench.echo",
                body,
                pika.BasicProperties(
                    reply_to=reply_q, correlation_id=cid, delivery_mode=2 if persistent else 1
                ),
            )
            while cid not in got:
                conn.process_data_events(time_limit=1)
            if i >= 100:  # warm-up excluded
                samples.append(time.perf_counter() - t0)
        ch.queue_delete("bench.echo")
        conn.close()
        return samples
    finally:
        server.terminate()
        server.wait()


def e2e(
    url: str, db: str, tmp: Path, agents: int, creates: int, clients: int
) -> tuple[list[float], float, int]:
    fleet = Fleet(tmp, url, db)
    try:
        fleet.start_controller("controller", "--log-level", "WARNING", down_after=60)
        names = [f"sim{i:02d}" for i in range(agents)]
        for name in names:
            fleet.start_agent(name, node_uri("large"), heartbeat=5.0)
        fleet.wait_hosts(set(names), timeout=120)
        client = ApiClient(AmqpTransport(url, "bench-sequential"), timeout=120)
        try:
            seq: list[float] = []
            for i in range(creates // 2):
                t0 = time.perf_counter()
                client.call(
                    api.API_VM_CREATE, api.VmCreate(name=f"seq-{i}", vcpus=1, memory_mib=64, disk_gib=1)
                )
                seq.append(time.perf_counter() - t0)
        finally:
            client.close()
        # One transport for the pool: each client thread gets its own connection on first use.
        shared = ApiClient(AmqpTransport(url, "bench-concurrent"), timeout=120)

        def one(i: int) -> bool:
            shared.call(api.API_VM_CREATE, api.VmCreate(name=f"par-{i}", vcpus=1, memory_mib=64, disk_gib=1))
            return True

        try:
            t0 = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                done = sum(pool.map(one, range(creates - creates // 2)))
            rate = done / (time.perf_counter() - t0)
        finally:
            shared.close()
        return seq, rate, done
    finally:
        fleet.stop_all()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--agents", type=int, default=5)
    parser.add_argument("--creates", type=int, default=300)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rpc-calls", type=int, default=2000)
    parser.add_argument("--quick", action="store_true", help="smaller runs (pure bench --quick, 100 creates)")
    args = parser.parse_args()
    if args.quick:
        args.creates, args.rpc_calls = 100, 500

    print("== 1. pure scheduler (bench/placement_pure.py)", flush=True)
    pure = [sys.executable, str(ROOT / "bench" / "placement_pure.py")] + (["--quick"] if args.quick else [])
    subprocess.run(pure, check=True)

    with private_vhost("vfbench") as url, tempfile.TemporaryDirectory() as tmp:
        print("\n== 2. raw pika request/reply round trip (persistent, confirmed, loopback)", flush=True)
        raw = raw_rpc(url, args.rpc_calls)
        raw_p50 = statistics.median(raw)
        print(f"calls {len(raw)}  p50 {raw_p50 * 1000:.2f} ms  p99 {pct(raw, 0.99) * 1000:.2f} ms")

        print(
            f"\n== 3. end to end: {api.API_VM_CREATE.kind}, 1 controller (SQLite), {args.agents} simulated agents",
            flush=True,
        )
        with fresh_database(Path(tmp)) as db:
            seq, rate, done = e2e(url, db, Path(tmp), args.agents, args.creates, args.clients)
        p50 = statistics.median(seq)
        print(f"sequential creates {len(seq)}  p50 {p50 * 1000:.1f} ms  p99 {pct(seq, 0.99) * 1000:.1f} ms")
        print(f"concurrent creates {done} with {args.clients} clients: {rate:.1f} creates/s")
        print(
            f"e2e create p50 / raw RPC p50 = {p50 / raw_p50:.1f}x  (a create is 2 RPC hops + DB claim + libvirt)"
        )


if __name__ == "__main__":
    main()
