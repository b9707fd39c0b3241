"""Memory of one ``virtfleet-agent --simulate N`` process, next to the floor of a one-host agent.

For the floor and for each N (default 1, 100, 1000), in a private RabbitMQ vhost of its own:

* the shared queues the controller would declare (reports, heartbeats, dead letters), so that the
  agent's mandatory reports are routable; a consumer here counts the distinct hosts that reported
  and heartbeated;
* the agent: the floor is ``virtfleet-agent --host-id floor --libvirt-uri test:///<template>``
  (a single-host agent as today), the others ``virtfleet-agent --simulate N --node-template
  <template>`` (hosts ``sim-...``), each with a state directory in a temporary directory;
* once every host has sent a report and a heartbeat, plus ``--settle`` seconds of steady state
  (reports and heartbeats keep flowing): VmRSS and threads from ``/proc/<pid>/status``, and the
  time the hosts took to come up.

Printed: RSS in MiB, threads, startup seconds, and the per-host MiB above the floor
``(RSS - floor) / N``, next to the 512 MiB target at 1,000 hosts.

Run from the repository root (RabbitMQ on 127.0.0.1:5672, rabbitmqctl on PATH; or a private node
named by ``VF_BENCH_AMQP_PORT`` and ``VF_BENCH_RABBITMQCTL``, as for bench/fleet.py: a shared
RabbitMQ 3.10 node once wedged with 1,000 quorum queues, docs/performance.md)::

    .venv/bin/python bench/agent_memory.py [--hosts 1 100 1000] [--template tests/fixtures/nodes/small.xml]
        [--heartbeat 5] [--settle 10] [--timeout 300]

Bounded (a deadline per agent) and self-cleaning on any exit, Ctrl-C included: the agent stopped
(SIGTERM, then SIGKILL), the vhost deleted, the temporary directory removed.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from common.messages.host import HOST_HEARTBEAT, HOST_REPORT
from common.transport.amqp import AmqpTransport
from common.transport.port import Delivery, Outcome, Route
from common.transport.topology import DEAD_LETTER_QUEUE, HEARTBEATS_QUEUE, REPORTS_QUEUE

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fleetkit import private_vhost

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TARGET_MIB = 512.0
TARGET_HOSTS = 1000


class Seen:
    """The hosts that sent a report and a heartbeat (by the ``agent:<host>`` sender)."""

    def __init__(self) -> None:
        self.reported: set[str] = set()
        self.heartbeated: set[str] = set()
        self.lock = threading.Lock()

    def handler(self, delivery: Delivery) -> Outcome:
        host = delivery.envelope.sender.removeprefix("agent:")
        with self.lock:
            if delivery.envelope.kind == HOST_REPORT.kind:
                self.reported.add(host)
            elif delivery.envelope.kind == HOST_HEARTBEAT.kind:
                self.heartbeated.add(host)
        return Outcome()

    def both(self) -> int:
        with self.lock:
            return len(self.reported & self.heartbeated)


def status(pid: int) -> dict[str, str]:
    """``/proc/<pid>/status`` as a dict."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


@dataclass(frozen=True)
class Sample:
    label: str
    hosts: int
    rss_mib: float
    threads: int
    startup_s: float


def measure(label: str, hosts: int, argv: list[str], args: argparse.Namespace) -> Sample:
    """Start the agent ``argv`` in a fresh vhost, wait for ``hosts`` hosts, settle, read its RSS."""
    with private_vhost("vfbench-mem") as url, tempfile.TemporaryDirectory(prefix="vfbench-mem-") as tmp:
        transport = AmqpTransport(url, "bench-agent-memory")
        seen = Seen()
        for queue in (DEAD_LETTER_QUEUE, REPORTS_QUEUE, HEARTBEATS_QUEUE):
            transport.declare(queue)
        consumer = transport.multi_consumer(
            [Route(REPORTS_QUEUE, seen.handler), Route(HEARTBEATS_QUEUE, seen.handler)],
            name="bench-reports",
            prefetch=200,
            workers=2,
        )
        consumer.start()
        log = Path(tmp) / "agent.log"
        started = time.monotonic()
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [
                    str(BIN / "virtfleet-agent"),
                    *argv,
                    "--amqp-url",
                    url,
                    "--state-dir",
                    str(Path(tmp) / "state"),
                    "--heartbeat-interval",
                    str(args.heartbeat),
                    "--log-level",
                    "WARNING",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=REPO,
            )
        try:
            deadline = started + args.timeout
            while seen.both() < hosts:
                if proc.poll() is not None or time.monotonic() > deadline:
                    tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
                    raise SystemExit(f"{label}: {seen.both()} of {hosts} hosts came up:\n{tail}")
                time.sleep(0.2)
            startup = time.monotonic() - started
            time.sleep(args.settle)
            fields = status(proc.pid)
            rss = int(fields["VmRSS"].split()[0]) / 1024
            return Sample(label, hosts, rss, int(fields["Threads"]), startup)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            consumer.stop(timeout=1)
            transport.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, nargs="+", default=[1, 100, 1000])
    parser.add_argument("--template", type=Path, default=REPO / "tests/fixtures/nodes/small.xml")
    parser.add_argument("--heartbeat", type=float, default=5.0, help="agent heartbeat interval (s)")
    parser.add_argument("--settle", type=float, default=10.0, help="steady state before reading RSS (s)")
    parser.add_argument("--timeout", type=float, default=300.0, help="per agent, to have every host up (s)")
    args = parser.parse_args()
    template = args.template.resolve()

    floor = measure(
        "floor: 1-host agent", 1, ["--host-id", "floor", "--libvirt-uri", f"test://{template}"], args
    )
    samples = [floor]
    for n in args.hosts:
        samples.append(
            measure(f"--simulate {n}", n, ["--simulate", str(n), "--node-template", str(template)], args)
        )

    print(
        f"\n{'agent':<22} {'hosts':>6} {'RSS MiB':>9} {'threads':>8} {'up in s':>8} {'MiB/host > floor':>17}"
    )
    for s in samples:
        per_host = (s.rss_mib - floor.rss_mib) / s.hosts if s is not floor else 0.0
        print(
            f"{s.label:<22} {s.hosts:>6} {s.rss_mib:>9.1f} {s.threads:>8} {s.startup_s:>8.1f} {per_host:>17.3f}"
        )
    at_target = [s for s in samples if s.hosts == TARGET_HOSTS and s is not floor]
    for s in at_target:
        verdict = "within" if s.rss_mib <= TARGET_MIB else "OVER"
        print(f"target: {TARGET_HOSTS} hosts in <= {TARGET_MIB:.0f} MiB: {s.rss_mib:.1f} MiB ({verdict})")
    return 0 if all(s.rss_mib <= TARGET_MIB for s in at_target) else 1


if __name__ == "__main__":
    sys.exit(main())
