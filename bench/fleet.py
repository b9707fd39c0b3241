"""Fleet benchmark (issue 11, item 9): creates, reads, ingestion and memory of one controller on
real RabbitMQ + a real database + simulated hosts, each figure next to a floor measured in the
same run (ratios, not absolute times: the machine is noisy).

Phases, each in a private RabbitMQ vhost with a fresh database (``--database sqlite`` or
``postgres``: a throw-away ``virtfleet_bench_<pid>_<phase>`` on 127.0.0.1:5432, dropped at the
end), one controller ``python -m controller.main`` and one multi-host agent ``python -m
agent.main --simulate N --node-template FILE``:

0. floors: the raw pika RPC round trip (bench/placement.py's ``raw_rpc``), transient as an API call
   and persistent as an agent command, on classic queues (the floor the issue measured) and again
   on quorum queues (the type of virtfleet's queues since broker HA), and the libvirt test
   driver's defineXML + create;
1. small fleet (``--small-hosts``, 5): creates until ``--base`` VMs (50), ``--sample`` sequential
   creates (p50 against the floor = API round trip + agent round trip + define+start), creates
   until ``--fill`` VMs (2,000) with ``--outstanding`` in flight, the same sample again (p50 at
   2,000 / p50 at 50);
2. ingestion (``--hosts``, 1,000, heartbeat every ``--ingest-heartbeat`` s and a report every
   ``--ingest-report`` s: 2,000 heartbeats/s + 333 reports/s at the defaults): what the agent
   offered (counted in two side queues bound to the reports exchange, purged every second), what
   the controller absorbed (offered minus the growth of its queues), and the queue depths from
   ``rabbitmqctl list_queues -p VHOST name messages``;
3. burst (``--hosts`` with the product's intervals, heartbeat 5 s and report 30 s): creates for
   ``--duration`` s with ``--outstanding`` in flight; ``api.host.list`` polled every second
   during the burst and ``--after`` s after it (hosts shown down, how often a read was answered);
   the controller's VmRSS after the burst; optionally py-spy on the controller during the burst.

Two more phases, each alone when asked for (``--phases`` to combine):

4. synthetic ingestion (``--ingest-synthetic N``, no agent): bench/loadgen.py registers N fake
   hosts (10 VMs each), the bench inserts a VM row + allocations per reported VM (PostgreSQL),
   then the generator offers N/5 heartbeats/s + N/30 reports/s (10 % of reports changed) while
   the queues' depths, the controller's CPU and RSS are sampled every second;
5. several controllers (``--controllers 1,2,4``): the burst with K controller processes on the
   same queues and database; allocations summed from the database checked against each host's
   capacity (``api.host.show``), VM rows against creates.

The raw client speaks the wire protocol with pika + msgpack only (bench/fleetkit.py): reader-role
calls (``api.host.list``) on ``virtfleet.api.read``, the rest on ``virtfleet.api``.

Run as root from the repository root (RabbitMQ on 127.0.0.1:5672 with rabbitmqctl on PATH,
PostgreSQL on 127.0.0.1:5432 user postgres trust)::

    .venv/bin/python bench/fleet.py --quick                       # smoke run, about a minute
    .venv/bin/python bench/fleet.py --hosts 1000 --database postgres --profile /tmp/fleet-ctl.txt

Everything is bounded (a timeout per call, per startup and ``--deadline`` for the whole script)
and cleaned up on every exit, Ctrl-C included: processes stopped (SIGTERM, then SIGKILL; they also
get SIGTERM if this script dies), vhosts deleted, databases dropped, temporary directories removed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pika
import pika.exceptions

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from create_cpu import fleet_env  # noqa: E402
from fleetkit import (  # noqa: E402
    NODE_FILE,
    PYSPY,
    TICKS,
    BenchTimeout,
    Proc,
    Processes,
    RawClient,
    cleanup_stack,
    cpu_seconds,
    create_body,
    enroll_keys,
    init_keys,
    libvirt_cycles,
    load_stacks,
    package_of,
    pct,
    private_vhost,
    queue_depths,
    role_lane,
    rss_mib,
    signals_held,
    throwaway_database,
)
from placement import raw_rpc  # noqa: E402

from common.messages.api import API_HOST_LIST, API_HOST_SHOW, API_VM_CREATE  # noqa: E402

SMALL_TEMPLATE = ROOT / "tests" / "fixtures" / "nodes" / "small.xml"
#: Nova's mean boot time at 1,000 simulated hosts, the outside reference of the issue.
NOVA_BOOT_S = 13.1
HEARTBEATS_QUEUE = "virtfleet.controller.heartbeats"
REPORTS_QUEUE = "virtfleet.controller.reports"
REPORTS_EXCHANGE = "virtfleet.reports"
TARGETS = {"create_over_floor": 3.0, "p50_growth": 1.3, "creates_per_s": 500.0}


# ------------------------------------------------------------------ helpers


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of every CPU, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]
    total = sum(fields[:8])
    return total - idle, total


def proc_cpu(proc: Proc) -> float:
    return sum(cpu_seconds(proc.popen.pid))


#: The processes of the other parties a create costs CPU in: RabbitMQ's Erlang VM and PostgreSQL.
BROKER_COMMANDS = frozenset({"beam.smp"})
DATABASE_COMMANDS = frozenset({"postgres"})


def named_cpu(names: frozenset[str]) -> float:
    """CPU seconds used so far by every live process whose command name is in ``names`` (a
    process that ends in between is missed: PostgreSQL backends of closed connections)."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue  # ended meanwhile
        if text[text.index("(") + 1 : text.rindex(")")] in names:
            fields = text.rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / TICKS
    return total


def self_cpu() -> float:
    """CPU seconds of this process (the bench's client threads)."""
    t = os.times()
    return t.user + t.system


def big_template(tmp: Path) -> Path:
    """large.xml with 128 CPUs (512 vCPUs at the default 4x overcommit), so that a few hosts hold
    2,000 small VMs."""
    text = NODE_FILE.read_text()
    text = re.sub(r"<cores>\d+</cores>", "<cores>32</cores>", text)
    text = re.sub(r"<active>\d+</active>", "<active>128</active>", text)
    path = tmp / "big-node.xml"
    path.write_text(text)
    return path


@dataclass
class Fleet:
    """One phase's controllers, agent and API client (``controller``: the first controller)."""

    url: str
    procs: Processes
    controller: Proc
    agent: Proc
    client: RawClient
    hosts: int
    controllers: list[Proc] = field(default_factory=list)
    db: str = ""


@dataclass
class Plant:
    """A phase's vhost, database and controller processes (no agent yet)."""

    work: Path
    url: str
    db: str
    env: dict[str, str]
    procs: Processes
    controllers: list[Proc]


def start_controllers(
    stack: contextlib.ExitStack, args: argparse.Namespace, tmp: Path, phase: str, count: int = 1
) -> Plant:
    """A vhost, a database and ``count`` controller processes on both; undone by ``stack``."""
    work = tmp / phase
    work.mkdir()
    url = stack.enter_context(private_vhost(f"vffleet-{phase}"))
    db = stack.enter_context(
        throwaway_database(args.database, work, f"virtfleet_bench_{os.getpid()}_{phase}")
    )
    procs = Processes()
    stack.callback(procs.stop_all)
    env = fleet_env(ROOT, url)
    if args.trace is not None:  # bench/stagetrace/sitecustomize.py, loaded by each process
        env.update(
            PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'bench' / 'stagetrace'}", VF_TRACE_FILE=str(args.trace)
        )
    env.update(init_keys(work, env))  # signed, as a deployed fleet is
    argv = [sys.executable, "-m", "controller.main", "--database-url", db, "--log-level", args.log_level]
    if args.down_after:
        argv += ["--down-after", str(args.down_after)]
    if args.choose_among:
        config = work / "controller.toml"
        config.write_text(f"choose_among = {args.choose_among}\n")
        argv += ["--config", str(config)]
    controllers = [
        procs.spawn("controller" if count == 1 else f"controller-{i + 1}", argv, env, work)
        for i in range(count)
    ]
    return Plant(work, url, db, env, procs, controllers)


def start_fleet(
    stack: contextlib.ExitStack,
    args: argparse.Namespace,
    tmp: Path,
    phase: str,
    *,
    hosts: int,
    template: Path,
    heartbeat: float,
    report: float,
    controllers: int = 1,
) -> Fleet:
    """A vhost, a database, ``controllers`` controllers and a ``--simulate hosts`` agent,
    every host up; all undone by ``stack``."""
    plant = start_controllers(stack, args, tmp, phase, controllers)
    work, url, db, env, procs = plant.work, plant.url, plant.db, plant.env, plant.procs
    controller = plant.controllers[0]
    argv = [sys.executable, "-m", "agent.main", "--simulate", str(hosts), "--node-template", str(template)]
    argv += ["--host-prefix", f"{phase}-", "--state-dir", str(work / "agent-state")]
    argv += ["--heartbeat-interval", str(heartbeat), "--report-interval", str(report)]
    width = len(str(hosts))  # the agent's --simulate names: <prefix><number, zero-padded>
    keys = enroll_keys(work, env, [f"{phase}-{n:0{width}d}" for n in range(1, hosts + 1)])
    agent = procs.spawn("agent", [*argv, "--log-level", "WARNING"], {**env, **keys}, work)
    t0 = time.monotonic()
    client = connect(url, procs, timeout=60)
    stack.callback(client.close)
    fleet = Fleet(url, procs, controller, agent, client, hosts, plant.controllers, db)
    wait_hosts_up(fleet, args.startup_timeout)
    print(
        f"  {phase}: {controllers} controller{'s' if controllers > 1 else ''} + agent of {hosts} hosts ({template.name}, heartbeat {heartbeat:g} s,"
        f" report {report:g} s) up in {time.monotonic() - t0:.1f} s",
        flush=True,
    )
    return fleet


def connect(url: str, procs: Processes, timeout: float) -> RawClient:
    deadline = time.monotonic() + timeout
    while True:
        procs.check_alive()
        try:
            return RawClient(url, lane=role_lane)
        except pika.exceptions.AMQPError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def host_statuses(client: RawClient, timeout: float = 10) -> Counter[str]:
    hosts = client.call(API_HOST_LIST.kind, {}, timeout=timeout)["hosts"]
    return Counter(h["status"] for h in hosts)


def wait_hosts_up(fleet: Fleet, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last: Counter[str] = Counter()
    while time.monotonic() < deadline:
        fleet.procs.check_alive()
        try:
            last = host_statuses(fleet.client)
            if last["up"] >= fleet.hosts:
                return
        except (pika.exceptions.UnroutableError, TimeoutError):
            pass  # the controller has not declared its queues yet, or is still starting
        time.sleep(1.0)
    raise TimeoutError(f"{fleet.hosts} hosts not all up after {timeout:.0f} s; last seen {dict(last)}")


# ------------------------------------------------------------------ creates


@dataclass
class Burst:
    latencies: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    timeouts: int = 0
    elapsed: float = 0.0

    @property
    def done(self) -> int:
        return len(self.latencies)

    @property
    def rate(self) -> float:
        return self.done / self.elapsed if self.elapsed else 0.0


def burst(
    url: str,
    names: Iterator[str],
    *,
    outstanding: int,
    duration: float | None,
    call_timeout: float,
    procs: Processes,
    on_second: Callable[[float], None] = lambda _t: None,
) -> Burst:
    """``api.vm.create`` of every name (or until ``duration`` s) with ``outstanding`` in flight,
    from one connection without publisher confirms; then waits for the last replies."""
    client = RawClient(url, call_timeout, lane=role_lane, confirm=False)
    out = Burst()
    sent: dict[str, float] = {}
    try:
        t0 = time.perf_counter()
        stop_at = t0 + duration if duration is not None else None
        exhausted = False
        next_tick = 1.0
        while True:
            now = time.perf_counter()
            sending = not exhausted and (stop_at is None or now < stop_at)
            while sending and len(sent) < outstanding:
                name = next(names, None)
                if name is None:
                    exhausted = sending = False
                    break
                sent[client.send(API_VM_CREATE.kind, create_body(name))] = time.perf_counter()
            if not sent and not sending:
                break
            replies = client.poll(0.005)
            now = time.perf_counter()
            for rid, reply in replies.items():
                started = sent.pop(rid, None)
                if started is None:
                    continue
                if reply.get("ok") is True:
                    out.latencies.append(now - started)
                else:
                    err = reply.get("error") or {}
                    out.errors[str(err.get("type", err) if isinstance(err, dict) else err)] += 1
            for rid, started in list(sent.items()):
                if now - started > call_timeout:
                    client.forget(rid)
                    del sent[rid]
                    out.timeouts += 1
            if now - t0 >= next_tick:
                procs.check_alive()
                on_second(now - t0)
                next_tick += 1.0
        out.elapsed = time.perf_counter() - t0
        return out
    finally:
        client.close()


def sequential(client: RawClient, prefix: str, count: int) -> list[float]:
    latencies = []
    for i in range(count):
        t = time.perf_counter()
        client.call(API_VM_CREATE.kind, create_body(f"{prefix}-{i}"))
        latencies.append(time.perf_counter() - t)
    return latencies


def counter(prefix: str) -> Iterator[str]:
    i = 0
    while True:
        yield f"{prefix}-{i}"
        i += 1


def limited(prefix: str, count: int) -> Iterator[str]:
    return (f"{prefix}-{i}" for i in range(count))


# ------------------------------------------------------------------ phase 0: floors


def floors(args: argparse.Namespace, out: dict[str, Any]) -> None:
    with private_vhost("vffleet-floor") as url:
        api = raw_rpc(url, args.rpc_calls, persistent=False)
        agent = raw_rpc(url, args.rpc_calls, persistent=True)
        # The same round trips on quorum queues, the type virtfleet's API and agent queues have
        # had since broker HA (issue 13): what the product's own hops cost at least.
        api_q = raw_rpc(url, args.rpc_calls, persistent=False, queue_type="quorum")
        agent_q = raw_rpc(url, args.rpc_calls, persistent=True, queue_type="quorum")
    lv = libvirt_cycles(args.libvirt_cycles, SMALL_TEMPLATE)
    out["rpc_api_p50_ms"] = statistics.median(api) * 1000
    out["rpc_api_p99_ms"] = pct(api, 0.99) * 1000
    out["rpc_agent_p50_ms"] = statistics.median(agent) * 1000
    out["libvirt_define_start_ms"] = statistics.median(a for a, _ in lv) * 1000
    out["create_floor_ms"] = out["rpc_api_p50_ms"] + out["rpc_agent_p50_ms"] + out["libvirt_define_start_ms"]
    out["rpc_api_quorum_p50_ms"] = statistics.median(api_q) * 1000
    out["rpc_agent_quorum_p50_ms"] = statistics.median(agent_q) * 1000
    out["create_floor_quorum_ms"] = (
        out["rpc_api_quorum_p50_ms"] + out["rpc_agent_quorum_p50_ms"] + out["libvirt_define_start_ms"]
    )
    print(
        f"  floors: raw pika RPC p50 {out['rpc_api_p50_ms']:.2f} ms transient (API call),"
        f" {out['rpc_agent_p50_ms']:.2f} ms persistent (agent command); test driver define+start"
        f" {out['libvirt_define_start_ms']:.3f} ms; create floor = sum {out['create_floor_ms']:.2f} ms"
        f" (on quorum queues: {out['rpc_api_quorum_p50_ms']:.2f} + {out['rpc_agent_quorum_p50_ms']:.2f}"
        f" + define+start = {out['create_floor_quorum_ms']:.2f} ms)",
        flush=True,
    )


# ------------------------------------------------------------------ phase 1: small fleet


def small_fleet(args: argparse.Namespace, tmp: Path, out: dict[str, Any]) -> None:
    with cleanup_stack() as stack:
        fleet = start_fleet(
            stack,
            args,
            tmp,
            "small",
            hosts=args.small_hosts,
            template=big_template(tmp),
            heartbeat=5.0,
            report=30.0,
        )
        sequential(fleet.client, "warm", 3)
        fill = burst(
            fleet.url,
            limited("base", args.base - 3),
            outstanding=args.outstanding,
            duration=None,
            call_timeout=args.call_timeout,
            procs=fleet.procs,
        )
        cpu = CpuMeter(fleet)
        with contextlib.ExitStack() as spying:
            if args.profile:  # py-spy on the first sequential sample (see --small-profile-s)
                spy = profile_path(args.profile, "small")
                spying.enter_context(
                    pyspy(
                        fleet.controller.popen.pid,
                        spy,
                        args.small_profile_s,
                        args.profile_rate,
                        tmp,
                        fleet.procs,
                    )
                )
            at_base = sequential(fleet.client, "s-base", args.sample)
            cpu_base = cpu.per_create(args.sample)
        grown = burst(
            fleet.url,
            limited("fill", args.fill - args.base - args.sample),
            outstanding=args.outstanding,
            duration=None,
            call_timeout=args.call_timeout,
            procs=fleet.procs,
        )
        cpu_grown = cpu.per_create(grown.done)
        vms = args.base + args.sample + grown.done
        at_fill = sequential(fleet.client, "s-fill", args.sample)
        cpu_fill = cpu.per_create(args.sample)
        failed = fill.errors.total() + fill.timeouts + grown.errors.total() + grown.timeouts
        out["small"] = {
            "hosts": args.small_hosts,
            "base_vms": args.base,
            "fill_vms": vms,
            "p50_base_ms": statistics.median(at_base) * 1000,
            "p99_base_ms": pct(at_base, 0.99) * 1000,
            "p50_fill_ms": statistics.median(at_fill) * 1000,
            "p99_fill_ms": pct(at_fill, 0.99) * 1000,
            "fill_rate": grown.rate,
            "fill_failed": failed,
            "fill_errors": dict(fill.errors + grown.errors),
            # CPU ms per create (controller, agent) in the sample at base, the fill, the sample at fill
            "cpu_ms_base": cpu_base,
            "cpu_ms_fill_burst": cpu_grown,
            "cpu_ms_fill": cpu_fill,
        }
        s = out["small"]
        print(
            f"  small fleet: p50 {s['p50_base_ms']:.1f} ms with {args.base} VMs, {s['p50_fill_ms']:.1f} ms"
            f" with {vms} VMs ({args.sample} sequential creates each); filled at {grown.rate:.0f}"
            f" creates/s with {args.outstanding} outstanding, {failed} failed {dict(fill.errors + grown.errors)}",
            flush=True,
        )
        print(
            "  small fleet, CPU ms per create (controller / agent): sequential at base"
            f" {cpu_base[0]:.2f} / {cpu_base[1]:.2f}, fill ({args.outstanding} outstanding)"
            f" {cpu_grown[0]:.2f} / {cpu_grown[1]:.2f}, sequential at fill {cpu_fill[0]:.2f} / {cpu_fill[1]:.2f}",
            flush=True,
        )


class CpuMeter:
    """The controller's and the agent's CPU (``/proc/PID/stat``, 10-ms ticks) since the last reading."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.last = self.read()

    def read(self) -> tuple[float, float]:
        return proc_cpu(self.fleet.controller), proc_cpu(self.fleet.agent)

    def per_create(self, creates: int) -> tuple[float, float]:
        """(controller, agent) CPU ms per create since the last call."""
        now = self.read()
        spent = [(b - a) * 1000 / max(1, creates) for a, b in zip(self.last, now, strict=True)]
        self.last = now
        return spent[0], spent[1]


# ------------------------------------------------------------------ phase 2: ingestion


def ingestion(args: argparse.Namespace, tmp: Path, out: dict[str, Any]) -> None:
    with cleanup_stack() as stack:
        fleet = start_fleet(
            stack,
            args,
            tmp,
            "ingest",
            hosts=args.hosts,
            template=SMALL_TEMPLATE,
            heartbeat=args.ingest_heartbeat,
            report=args.ingest_report,
        )
        conn = pika.BlockingConnection(pika.URLParameters(fleet.url))
        stack.callback(conn.close)
        ch = conn.channel()
        side = {"heartbeats": "bench.count.heartbeats", "reports": "bench.count.reports"}
        for queue, key in ((side["heartbeats"], "host.heartbeat.#"), (side["reports"], "host.report.#")):
            ch.queue_declare(queue, exclusive=True, auto_delete=True)
            ch.queue_bind(queue, REPORTS_EXCHANGE, key)
        time.sleep(min(3.0, args.ingest_window / 4))  # one spread of heartbeats past the startup
        for queue in side.values():
            ch.queue_purge(queue)
        d0 = queue_depths(fleet.url)
        c0, a0, m0 = proc_cpu(fleet.controller), proc_cpu(fleet.agent), machine_busy()
        t0 = time.monotonic()
        counts = Counter[str]()
        timeline: list[tuple[float, int, int]] = [
            (0.0, d0.get(HEARTBEATS_QUEUE, 0), d0.get(REPORTS_QUEUE, 0))
        ]
        next_depths = t0 + 5.0
        while (now := time.monotonic()) < t0 + args.ingest_window:
            time.sleep(min(1.0, t0 + args.ingest_window - now))
            fleet.procs.check_alive()
            for what, queue in side.items():
                counts[what] += ch.queue_purge(queue).method.message_count
            if time.monotonic() >= next_depths:
                d = queue_depths(fleet.url)
                timeline.append((time.monotonic() - t0, d.get(HEARTBEATS_QUEUE, 0), d.get(REPORTS_QUEUE, 0)))
                next_depths += 5.0
        for what, queue in side.items():
            counts[what] += ch.queue_purge(queue).method.message_count
        elapsed = time.monotonic() - t0
        c1, a1, m1 = proc_cpu(fleet.controller), proc_cpu(fleet.agent), machine_busy()
        d1 = queue_depths(fleet.url)
        timeline.append((elapsed, d1.get(HEARTBEATS_QUEUE, 0), d1.get(REPORTS_QUEUE, 0)))
        rec: dict[str, Any] = {
            "window_s": elapsed,
            "timeline": timeline,
            "heartbeat_s": args.ingest_heartbeat,
            "report_s": args.ingest_report,
        }
        for what, queue in (("heartbeats", HEARTBEATS_QUEUE), ("reports", REPORTS_QUEUE)):
            growth = d1.get(queue, 0) - d0.get(queue, 0)
            offered = counts[what] / elapsed
            rec[what] = {
                "offered_per_s": offered,
                "absorbed_per_s": offered - growth / elapsed,
                "depth_start": d0.get(queue, 0),
                "depth_end": d1.get(queue, 0),
                "depth_max": max(t[1 if what == "heartbeats" else 2] for t in timeline),
            }
        rec["controller_cpu_pct"] = (c1 - c0) / elapsed * 100
        rec["agent_cpu_pct"] = (a1 - a0) / elapsed * 100
        rec["machine_busy_pct"] = (m1[0] - m0[0]) / max(1, m1[1] - m0[1]) * 100 * (os.cpu_count() or 1)
        rec["controller_rss_mib"] = rss_mib(fleet.controller.popen.pid)
        out["ingest"] = rec
        hb, rp = rec["heartbeats"], rec["reports"]
        print(
            f"  ingestion over {elapsed:.1f} s: heartbeats offered {hb['offered_per_s']:.0f}/s absorbed"
            f" {hb['absorbed_per_s']:.0f}/s (depth {hb['depth_start']}->{hb['depth_end']}, max {hb['depth_max']});"
            f" reports offered {rp['offered_per_s']:.0f}/s absorbed {rp['absorbed_per_s']:.0f}/s (depth"
            f" {rp['depth_start']}->{rp['depth_end']}, max {rp['depth_max']}); CPU controller"
            f" {rec['controller_cpu_pct']:.0f} % agent {rec['agent_cpu_pct']:.0f} % machine"
            f" {rec['machine_busy_pct']:.0f} % of {100 * (os.cpu_count() or 1)}",
            flush=True,
        )


# ------------------------------------------------------------------ phase 3: the burst


class HostPoller(threading.Thread):
    """``api.host.list`` every second on its own connection: (t, seconds or None, statuses)."""

    def __init__(self, url: str, timeout: float) -> None:
        super().__init__(name="host-poller", daemon=True)
        self.url = url
        self.timeout = timeout
        self.samples: list[tuple[float, float | None, dict[str, int]]] = []
        self.mark = 0.0
        self.stop_event = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            client = RawClient(self.url, self.timeout, lane=role_lane)
        except BaseException as exc:
            self.error = exc
            return
        try:
            t0 = time.monotonic()
            while not self.stop_event.is_set():
                start = time.monotonic()
                try:
                    statuses: dict[str, int] = dict(host_statuses(client, self.timeout))
                    took: float | None = time.monotonic() - start
                except TimeoutError:
                    statuses, took = {}, None
                self.samples.append((start - t0, took, statuses))
                self.stop_event.wait(max(0.0, 1.0 - (time.monotonic() - start)))
        except BaseException as exc:
            self.error = exc
        finally:
            client.close()


@contextlib.contextmanager
def pyspy(pid: int, out: Path, duration: int, rate: int, tmp: Path, procs: Processes) -> Iterator[None]:
    """Two ``py-spy record --nonblocking --format raw --duration D`` on the controller: every
    thread not sleeping (``out``) and only the thread holding the GIL (``out`` + ``.gil``)."""
    spies = Processes()  # not the fleet's: they end by themselves, which is not a failure
    for name, path, extra in (("py-spy", out, []), ("py-spy-gil", gil_path(out), ["--gil"])):
        argv = [str(PYSPY), "record", "--nonblocking", "-o", str(path), "--pid", str(pid)]
        argv += ["--duration", str(duration), "--format", "raw", "--rate", str(rate), *extra]
        spies.spawn(name, argv, dict(os.environ), tmp)
    try:
        yield
    finally:
        for proc in spies.procs:
            try:
                proc.popen.wait(duration + 30)
            except Exception:
                proc.stop(sig=signal.SIGINT)
        spies.stop_all()


def gil_path(out: Path) -> Path:
    return out.with_name(f"{out.stem}.gil{out.suffix}")


def burst_phase(args: argparse.Namespace, tmp: Path, out: dict[str, Any]) -> None:
    with cleanup_stack() as stack:
        fleet = start_fleet(
            stack, args, tmp, "burst", hosts=args.hosts, template=SMALL_TEMPLATE, heartbeat=5.0, report=30.0
        )
        sequential(fleet.client, "warm", 3)
        rss_before = rss_mib(fleet.controller.popen.pid)
        poller = HostPoller(fleet.url, timeout=args.read_timeout)
        poller.start()
        stack.callback(poller.join, 5)
        stack.callback(poller.stop_event.set)
        time.sleep(2.0)  # the poller's first sample is of the idle fleet
        poller.mark = time.monotonic()
        spy_at = min(5.0, args.duration / 4) if args.profile else None
        spy_ctx = stack.enter_context(contextlib.ExitStack())
        spy_len = max(1, min(20, int(args.duration - (spy_at or 0) - 1)))
        spying: list[bool] = []

        def on_second(t: float) -> None:
            if spy_at is not None and t >= spy_at and not spying:
                spying.append(True)
                spy_ctx.enter_context(
                    pyspy(
                        fleet.controller.popen.pid, args.profile, spy_len, args.profile_rate, tmp, fleet.procs
                    )
                )

        c0, a0, m0 = proc_cpu(fleet.controller), proc_cpu(fleet.agent), machine_busy()
        r0, d0, s0 = named_cpu(BROKER_COMMANDS), named_cpu(DATABASE_COMMANDS), self_cpu()
        started = time.monotonic()
        result = burst(
            fleet.url,
            counter("b"),
            outstanding=args.outstanding,
            duration=args.duration,
            call_timeout=args.call_timeout,
            procs=fleet.procs,
            on_second=on_second,
        )
        ended = time.monotonic()
        c1, a1, m1 = proc_cpu(fleet.controller), proc_cpu(fleet.agent), machine_busy()
        r1, d1, s1 = named_cpu(BROKER_COMMANDS), named_cpu(DATABASE_COMMANDS), self_cpu()
        spy_ctx.close()
        rss_after = rss_mib(fleet.controller.popen.pid)
        time.sleep(args.after)
        poller.stop_event.set()
        poller.join(args.read_timeout + 5)
        if poller.error:
            raise RuntimeError(f"host poller failed: {poller.error!r}")
        t_start, t_end = started - (poller.mark - 2.0), ended - (poller.mark - 2.0)
        during = [s for s in poller.samples if t_start <= s[0] <= t_end]
        after = [s for s in poller.samples if s[0] > t_end]
        answered = [s[1] for s in during if s[1] is not None]

        def down(samples: list[tuple[float, float | None, dict[str, int]]]) -> int:
            return max((args.hosts - s[2].get("up", 0) for s in samples if s[1] is not None), default=-1)

        n = result.done
        out["burst"] = {
            "hosts": args.hosts,
            "outstanding": args.outstanding,
            "duration_s": result.elapsed,
            "creates": n,
            "creates_per_s": result.rate,
            "p50_ms": statistics.median(result.latencies) * 1000 if n else None,
            "p99_ms": pct(result.latencies, 0.99) * 1000 if n else None,
            "errors": dict(result.errors),
            "timeouts": result.timeouts,
            "controller_cpu_ms_per_create": (c1 - c0) / n * 1000 if n else None,
            "agent_cpu_ms_per_create": (a1 - a0) / n * 1000 if n else None,
            # Every process's share of a create: what 500/s on this machine's CPUs leaves each.
            "broker_cpu_ms_per_create": (r1 - r0) / n * 1000 if n else None,
            "database_cpu_ms_per_create": (d1 - d0) / n * 1000 if n else None,
            "client_cpu_ms_per_create": (s1 - s0) / n * 1000 if n else None,
            "machine_cpu_ms_per_create": (
                (m1[0] - m0[0]) / max(1, m1[1] - m0[1]) * (os.cpu_count() or 1) * (ended - started) / n * 1000
                if n
                else None
            ),
            "controller_cpu_pct": (c1 - c0) / (ended - started) * 100,
            "agent_cpu_pct": (a1 - a0) / (ended - started) * 100,
            "machine_busy_pct": (m1[0] - m0[0]) / max(1, m1[1] - m0[1]) * 100 * (os.cpu_count() or 1),
            "reads_polled": len(during),
            "reads_answered": len(answered),
            "read_p50_ms": statistics.median(answered) * 1000 if answered else None,
            "read_max_ms": max(answered) * 1000 if answered else None,
            "down_max_during": down(during),
            "down_max_after": down(after),
            "polls_after": len(after),
            "rss_before_mib": rss_before,
            "rss_after_mib": rss_after,
            "profile": str(args.profile) if args.profile else None,
        }
        b = out["burst"]
        print(
            f"  burst: {n} creates in {result.elapsed:.1f} s = {result.rate:.1f}/s ({args.outstanding} outstanding),"
            f" p50 {b['p50_ms'] or 0:.0f} ms p99 {b['p99_ms'] or 0:.0f} ms, errors {dict(result.errors)}"
            f" timeouts {result.timeouts}; CPU controller {b['controller_cpu_pct']:.0f} % agent"
            f" {b['agent_cpu_pct']:.0f} % machine {b['machine_busy_pct']:.0f} %;"
            f" host.list answered {len(answered)}/{len(during)} polls, down max {b['down_max_during']}"
            f" during, {b['down_max_after']} after; RSS {rss_before:.0f} -> {rss_after:.0f} MiB",
            flush=True,
        )
        if n:
            print(
                f"  CPU per create: controller {b['controller_cpu_ms_per_create']:.2f} ms, agent"
                f" {b['agent_cpu_ms_per_create']:.2f} ms, RabbitMQ {b['broker_cpu_ms_per_create']:.2f} ms,"
                f" PostgreSQL {b['database_cpu_ms_per_create']:.2f} ms, bench client"
                f" {b['client_cpu_ms_per_create']:.2f} ms; machine {b['machine_cpu_ms_per_create']:.2f} ms"
                f" ({TARGETS['creates_per_s']:.0f}/s on {os.cpu_count()} CPUs allows"
                f" {(os.cpu_count() or 1) / TARGETS['creates_per_s'] * 1000:.2f} ms)",
                flush=True,
            )


# ------------------------------------------------------------------ phase 4: synthetic ingestion


class GenReader(threading.Thread):
    """Reads one load generator's JSON lines: the last ``paced`` line and the events."""

    def __init__(self, proc: Proc) -> None:
        super().__init__(name=f"read-{proc.name}", daemon=True)
        self.proc = proc
        self.events: dict[str, dict[str, Any]] = {}
        self.last: dict[str, Any] | None = None
        self.first: dict[str, Any] | None = None
        self.lock = threading.Lock()

    def run(self) -> None:
        stdout = self.proc.popen.stdout
        if stdout is None:
            return
        for raw in stdout:
            try:
                rec = json.loads(raw)
            except ValueError:
                continue
            with self.lock:
                if rec.get("event") == "paced":
                    self.last = rec
                    if self.first is None:
                        self.first = rec
                self.events[rec.get("event", "?")] = rec

    def snapshot(self) -> dict[str, Any] | None:
        with self.lock:
            return dict(self.last) if self.last else None


def sa_url(db: str) -> str:
    return db.replace("postgresql://", "postgresql+psycopg://", 1)


def insert_vm_rows(db: str, prefix: str, hosts: int, vms: int, seed: int) -> tuple[int, int]:
    """One ``vms`` row (active) and its 3 allocations per VM the synthetic hosts report, by COPY;
    then every synthetic host's generation is bumped (what a claim does), so the controller's
    fleet sync re-reads their usage. ``updated_at`` is left alone: a changed row would make every
    host's next report count as new. Returns (VM rows, allocation rows)."""
    import psycopg  # noqa: PLC0415 - only the postgres runs need it
    from loadgen import host_model  # noqa: PLC0415

    now = time.time()
    vm_cols = (
        "uuid, name, host_id, status, task, desired_power, power_state, vcpus, max_vcpus, memory_mib,"
        " max_memory_mib, disk_gib, autostart, persistent, cpu_time_ns, spec, idempotency_key,"
        " last_error, created_at, updated_at, reported_at, server_group, cpu_policy, pcpus,"
        " hugepage_size_kib, needs_hw_virt"
    )
    n_vms = n_alloc = 0
    with psycopg.connect(db) as conn, conn.cursor() as cur:
        models = [host_model(prefix, i, vms, seed) for i in range(hosts)]
        with cur.copy(f"COPY vms ({vm_cols}) FROM STDIN") as copy:
            for h in models:
                for vm, disk in zip(h.vms, h.vm_disks, strict=True):
                    state = vm["state"]
                    copy.write_row(
                        (
                            vm["uuid"], vm["name"], h.host_id, "active", None,
                            "running" if state == "running" else "shutoff", state,
                            vm["vcpus"], vm["max_vcpus"], vm["memory_mib"], vm["max_memory_mib"],
                            disk, vm["autostart"], True, vm["cpu_time_ns"], "{}", None, None,
                            now, now, now, None, "shared", "[]", None, False,
                        )
                    )  # fmt: skip
                    n_vms += 1
        with cur.copy("COPY allocations (vm_uuid, host_id, resource, amount) FROM STDIN") as copy:
            for h in models:
                for vm, disk in zip(h.vms, h.vm_disks, strict=True):
                    for resource, amount in (
                        ("VCPU", vm["vcpus"]),
                        ("MEMORY_MIB", vm["memory_mib"]),
                        ("DISK_GIB", disk),
                    ):
                        copy.write_row((vm["uuid"], h.host_id, resource, amount))
                        n_alloc += 1
        cur.execute("UPDATE hosts SET generation = generation + 1 WHERE id LIKE %s", (prefix + "%",))
        conn.commit()
    return n_vms, n_alloc


def db_count(db: str, sql: str) -> int:
    import psycopg  # noqa: PLC0415

    with psycopg.connect(db) as conn, conn.cursor() as cur:
        cur.execute(sql)
        row = cur.fetchone()
        return int(row[0]) if row else 0


def synthetic_ingestion(args: argparse.Namespace, tmp: Path, out: dict[str, Any]) -> None:
    """``--ingest-synthetic N``: one controller, no agent; N fake hosts from bench/loadgen.py."""
    n = args.ingest_synthetic
    pubs = max(1, args.synthetic_publishers)
    prefix = "syn-"
    rec: dict[str, Any] = {
        "hosts": n,
        "vms_per_host": args.synthetic_vms,
        "publishers": pubs,
        "heartbeat_s": 5.0,
        "report_s": 30.0,
        "change": args.synthetic_change,
    }
    print(
        f"  synthetic: {n} fake hosts from {pubs} bench/loadgen.py process(es) (raw pika + msgpack), heartbeat"
        f" every 5 s and report every 30 s each; {args.synthetic_change * 100:.0f} % of reports change, the"
        f" rest repeat their host's last report (seq, times and CPU time aside), as on an idle fleet; the"
        f" generators share the machine's {os.cpu_count()} CPUs with the controller, RabbitMQ and PostgreSQL",
        flush=True,
    )
    with cleanup_stack() as stack:
        plant = start_controllers(stack, args, tmp, "synthetic", 1)
        ctl = plant.controllers[0]
        # the fake hosts sign their reports and heartbeats, each with its own enrolled key
        from loadgen import host_id  # noqa: PLC0415 - as the database rows below: loadgen's names

        signing = enroll_keys(plant.work, plant.env, [host_id(prefix, i) for i in range(n)])
        client = connect(plant.url, plant.procs, timeout=60)
        stack.callback(client.close)
        conn = pika.BlockingConnection(pika.URLParameters(plant.url))
        stack.callback(conn.close)
        ch = conn.channel()

        def depths() -> tuple[int, int]:
            """Ready messages of the heartbeat and report queues (passive declare: cheap)."""
            return (
                ch.queue_declare(HEARTBEATS_QUEUE, passive=True).method.message_count,
                ch.queue_declare(REPORTS_QUEUE, passive=True).method.message_count,
            )

        deadline = time.monotonic() + 60
        while True:  # the controller declares its queues when it starts
            plant.procs.check_alive()
            try:
                depths()
                break
            except pika.exceptions.ChannelClosedByBroker:
                if time.monotonic() > deadline:
                    raise
                ch = conn.channel()
                time.sleep(0.5)
        rss_empty = rss_mib(ctl.popen.pid)
        # The paced phase: warm-up, the measured window, and a little slack.
        paced_s = args.synthetic_warmup + args.ingest_seconds + 3.0
        gens: list[GenReader] = []
        share = -(-n // pubs)
        for i in range(pubs):
            first, count = i * share, min(share, n - i * share)
            argv = [
                sys.executable,
                str(ROOT / "bench" / "loadgen.py"),
                "--url",
                plant.url,
                "--prefix",
                prefix,
            ]
            argv += ["--hosts", str(n), "--first", str(first), "--count", str(count)]
            argv += ["--vms", str(args.synthetic_vms), "--seconds", f"{paced_s:g}"]
            argv += ["--change", str(args.synthetic_change)]
            if signing:
                argv += ["--key-dir", str(plant.work / "keys")]
            gen = plant.procs.spawn(f"loadgen-{i + 1}", argv, plant.env, plant.work, pipes=True)
            reader = GenReader(gen)
            reader.start()
            gens.append(reader)
        t_reg = time.monotonic()
        # 1. every host's first report, until the controller knows every host
        known = 0
        while known < n:
            if time.monotonic() - t_reg > args.startup_timeout:
                raise TimeoutError(
                    f"{known} of {n} synthetic hosts registered after {args.startup_timeout:.0f} s"
                )
            plant.procs.check_alive()
            time.sleep(1.0)
            if args.database == "postgres":
                known = db_count(plant.db, f"SELECT count(*) FROM hosts WHERE id LIKE '{prefix}%'")
            else:
                hosts = client.call(API_HOST_LIST.kind, {}, timeout=30)["hosts"]
                known = sum(1 for h in hosts if h["host_id"].startswith(prefix))
        reg_s = time.monotonic() - t_reg
        while sum(depths()) > 0 and time.monotonic() - t_reg < args.startup_timeout:
            time.sleep(0.5)
        rec["register_s"] = reg_s
        rec["register_per_s"] = n / reg_s
        rec["register_publish_s"] = max(g.events.get("registered", {}).get("seconds", 0.0) for g in gens)
        rec["register_nacks"] = sum(g.events.get("registered", {}).get("nacks", 0) for g in gens)
        time.sleep(2.0)
        rec["rss_empty_mib"] = rss_empty
        rec["rss_hosts_mib"] = rss_mib(ctl.popen.pid)
        print(
            f"  synthetic: {n} hosts registered (first reports, {args.synthetic_vms} VMs each) in {reg_s:.1f} s"
            f" = {n / reg_s:.0f}/s ({rec['register_nacks']} nacks); controller RSS {rss_empty:.0f} MiB empty,"
            f" {rec['rss_hosts_mib']:.0f} MiB with the hosts",
            flush=True,
        )
        # 2. the VM rows the reports list, as if the controller had created them
        rec["vm_rows"] = rec["allocation_rows"] = 0
        if args.synthetic_vm_rows and args.database == "postgres":
            t = time.monotonic()
            rec["vm_rows"], rec["allocation_rows"] = insert_vm_rows(
                plant.db, prefix, n, args.synthetic_vms, 11
            )
            rec["insert_s"] = time.monotonic() - t
            rec["settle_s"] = settle(ctl, plant.procs, 90.0)  # the fleet sync re-reads the hosts' usage
            rec["rss_vms_mib"] = rss_mib(ctl.popen.pid)
            print(
                f"  synthetic: {rec['vm_rows']} VM rows + {rec['allocation_rows']} allocations inserted (COPY) in"
                f" {rec['insert_s']:.1f} s; controller idle again {rec['settle_s']:.1f} s later; controller RSS"
                f" {rec['rss_vms_mib']:.0f} MiB (peak so far {rss_mib(ctl.popen.pid, 'VmHWM'):.0f})",
                flush=True,
            )
        # 3. paced heartbeats and reports; the window starts after the warm-up
        for g in gens:
            stdin = g.proc.popen.stdin
            assert stdin is not None
            stdin.write(b"go\n")
            stdin.flush()
        time.sleep(args.synthetic_warmup)
        spy_ctx = stack.enter_context(contextlib.ExitStack())
        spy_path = profile_path(args.profile, "synthetic") if args.profile else None
        spy_at = 5.0
        spy_len = max(1, min(20, int(args.ingest_seconds - spy_at - 2)))

        def gen_totals() -> tuple[float, int, int, float]:
            snaps = [g.snapshot() for g in gens]
            if any(s is None for s in snaps):
                raise RuntimeError(f"a load generator is silent: {[g.proc.tail(5) for g in gens]}")
            ok = [s for s in snaps if s is not None]
            return (
                statistics.fmean(s["t"] for s in ok),
                sum(s["hb"] for s in ok),
                sum(s["rep"] for s in ok),
                max(s["lag_s"] for s in ok),
            )

        g0 = gen_totals()
        d0 = depths()
        c0, m0 = proc_cpu(ctl), machine_busy()
        gc0 = [sum(cpu_seconds(g.proc.popen.pid)) for g in gens]
        t0 = time.monotonic()
        timeline: list[tuple[float, int, int, float, float]] = [
            (0.0, d0[0], d0[1], 0.0, rss_mib(ctl.popen.pid))
        ]
        last_c, last_t, max_lag = c0, t0, 0.0
        spying = False
        while (now := time.monotonic()) < t0 + args.ingest_seconds:
            time.sleep(max(0.0, min(1.0, t0 + args.ingest_seconds - now)))
            plant.procs.check_alive()
            if spy_path is not None and not spying and time.monotonic() - t0 >= spy_at:
                spying = True
                spy_ctx.enter_context(
                    pyspy(ctl.popen.pid, spy_path, spy_len, args.profile_rate, plant.work, plant.procs)
                )
            d = depths()
            c, t = proc_cpu(ctl), time.monotonic()
            timeline.append(
                (t - t0, d[0], d[1], (c - last_c) / max(1e-9, t - last_t) * 100, rss_mib(ctl.popen.pid))
            )
            last_c, last_t = c, t
            max_lag = max(max_lag, gen_totals()[3])
        g1 = gen_totals()
        d1 = depths()
        elapsed = time.monotonic() - t0
        c1, m1 = proc_cpu(ctl), machine_busy()
        gc1 = [sum(cpu_seconds(g.proc.popen.pid)) for g in gens]
        spy_ctx.close()
        rec["rss_end_mib"] = rss_mib(ctl.popen.pid)
        rec["rss_peak_mib"] = rss_mib(ctl.popen.pid, "VmHWM")
        for g in gens:
            g.proc.popen.wait(paced_s + 30)
            g.join(5)
        done = [g.events.get("done", {}) for g in gens]
        gen_window = g1[0] - g0[0]
        rec["window_s"] = elapsed
        rec["timeline"] = timeline
        changed = sum(d.get("changed", 0) for d in done)
        reports = sum(d.get("rep", 0) for d in done)
        rec["changed_share"] = changed / reports if reports else 0.0
        for what, idx, interval in (("heartbeats", 1, 5.0), ("reports", 2, 30.0)):
            growth = d1[idx - 1] - d0[idx - 1]
            offered = (g1[idx] - g0[idx]) / gen_window
            rec[what] = {
                "target_per_s": n / interval,
                "offered_per_s": offered,
                "absorbed_per_s": offered - growth / elapsed,
                "depth_start": d0[idx - 1],
                "depth_end": d1[idx - 1],
                "depth_max": max(t[idx] for t in timeline),
            }
        rec["controller_cpu_pct"] = (c1 - c0) / elapsed * 100
        rec["controller_cpu_max_pct"] = max(t[3] for t in timeline[1:]) if len(timeline) > 1 else 0.0
        absorbed = (rec["heartbeats"]["absorbed_per_s"] + rec["reports"]["absorbed_per_s"]) * elapsed
        # the controller's CPU per message of this mix, and the rate one whole CPU would absorb
        rec["controller_cpu_ms_per_msg"] = (c1 - c0) / absorbed * 1000 if absorbed > 0 else None
        rec["ceiling_per_cpu"] = absorbed / (c1 - c0) if c1 > c0 else None
        rec["machine_busy_pct"] = (m1[0] - m0[0]) / max(1, m1[1] - m0[1]) * 100 * (os.cpu_count() or 1)
        rec["generator_cpu_pct"] = (sum(gc1) - sum(gc0)) / elapsed * 100
        rec["generator_busy"] = [d.get("busy", 0.0) for d in done]
        rec["generator_max_lag_s"] = max(max_lag, *(d.get("max_lag_s", 0.0) for d in done))
        rec["profile"] = str(spy_path) if spy_path else None
        out["synthetic"] = rec
        hb, rp = rec["heartbeats"], rec["reports"]
        print(
            f"  synthetic ingestion over {elapsed:.1f} s ({pubs} generator process{'es' if pubs > 1 else ''},"
            f" {rec['changed_share'] * 100:.0f} % of reports changed, the rest repeat their host's last one):"
            f" heartbeats offered {hb['offered_per_s']:.0f}/s (target {hb['target_per_s']:.0f}) absorbed"
            f" {hb['absorbed_per_s']:.0f}/s, depth {hb['depth_start']}->{hb['depth_end']} max {hb['depth_max']};"
            f" reports offered {rp['offered_per_s']:.0f}/s (target {rp['target_per_s']:.0f}) absorbed"
            f" {rp['absorbed_per_s']:.0f}/s, depth {rp['depth_start']}->{rp['depth_end']} max {rp['depth_max']};"
            f" controller CPU {rec['controller_cpu_pct']:.0f} % (max 1 s {rec['controller_cpu_max_pct']:.0f} %,"
            f" {rec['controller_cpu_ms_per_msg'] or 0:.3f} ms per message: one whole CPU would absorb"
            f" {rec['ceiling_per_cpu'] or 0:.0f} msg/s of this mix),"
            f" generator CPU {rec['generator_cpu_pct']:.0f} % (busy {', '.join(f'{b:.2f}' for b in rec['generator_busy'])},"
            f" max lag {rec['generator_max_lag_s']:.2f} s), machine {rec['machine_busy_pct']:.0f} % of"
            f" {100 * (os.cpu_count() or 1)}; controller RSS {rec['rss_end_mib']:.0f} MiB at the end, peak"
            f" {rec['rss_peak_mib']:.0f} MiB",
            flush=True,
        )


def settle(proc: Proc, procs: Processes, timeout: float, idle_pct: float = 25.0) -> float:
    """Seconds until ``proc`` used less than ``idle_pct`` % of a CPU in two 1-s samples running."""
    t0 = time.monotonic()
    quiet = 0
    while quiet < 2 and time.monotonic() - t0 < timeout:
        procs.check_alive()
        c0 = proc_cpu(proc)
        time.sleep(1.0)
        quiet = quiet + 1 if (proc_cpu(proc) - c0) * 100 < idle_pct else 0
    return time.monotonic() - t0


def profile_path(base: Path, phase: str) -> Path:
    """``base`` for the burst; ``STEM.PHASE.SUFFIX`` beside it for another phase."""
    return base.with_name(f"{base.stem}.{phase}{base.suffix}")


# ------------------------------------------------------------------ phase 5: several controllers


def capacity_check(fleet: Fleet) -> dict[str, Any]:
    """Allocation sums per host and resource from the database against each host's capacity
    as ``api.host.show`` gives it; VM rows against creates."""
    import psycopg  # noqa: PLC0415

    with psycopg.connect(fleet.db) as conn, conn.cursor() as cur:
        cur.execute("SELECT host_id, resource, sum(amount) FROM allocations GROUP BY host_id, resource")
        used: dict[str, dict[str, int]] = {}
        for host_id, resource, amount in cur.fetchall():
            used.setdefault(host_id, {})[resource] = int(amount)
        cur.execute("SELECT status, count(*) FROM vms GROUP BY status")
        statuses = {str(s): int(c) for s, c in cur.fetchall()}
    over: list[str] = []
    view_differs = 0
    fill = 0.0
    for host_id, per_resource in sorted(used.items()):
        view = fleet.client.call(API_HOST_SHOW.kind, {"host": host_id}, timeout=30)
        resources = {r["resource"]: r for r in view["resources"]}
        for resource, amount in per_resource.items():
            cap = resources.get(resource)
            if cap is None:
                continue
            fill = max(fill, amount / cap["capacity"] if cap["capacity"] else float("inf"))
            if amount > cap["capacity"]:
                over.append(f"{host_id} {resource} {amount} > {cap['capacity']}")
            if cap["used"] != amount:
                view_differs += 1
    return {
        "hosts_with_vms": len(used),
        "over_capacity": over,
        "max_fill": fill,
        "view_differs": view_differs,
        "vm_statuses": statuses,
    }


def controllers_phase(args: argparse.Namespace, tmp: Path, out: dict[str, Any]) -> None:
    """``--controllers 1,2,4``: the burst with 1, 2, 4 controller processes on the same queues
    and database (a fresh vhost, database and agent each)."""
    counts = [int(c) for c in args.controllers.split(",") if c.strip()]
    print(
        f"  controllers {counts}: note that this machine has {os.cpu_count()} CPUs shared by the"
        " controllers, the agent, RabbitMQ, PostgreSQL and the client: ratios are what they are",
        flush=True,
    )
    runs: list[dict[str, Any]] = []
    out["controllers"] = runs
    for k in counts:
        with cleanup_stack() as stack:
            fleet = start_fleet(
                stack,
                args,
                tmp,
                f"ctl{k}",
                hosts=args.hosts,
                template=SMALL_TEMPLATE,
                heartbeat=5.0,
                report=30.0,
                controllers=k,
            )
            sequential(fleet.client, "warm", 3)
            c0 = [proc_cpu(c) for c in fleet.controllers]
            a0, m0 = proc_cpu(fleet.agent), machine_busy()
            result = burst(
                fleet.url,
                counter("b"),
                outstanding=args.outstanding,
                duration=args.duration,
                call_timeout=args.call_timeout,
                procs=fleet.procs,
            )
            c1 = [proc_cpu(c) for c in fleet.controllers]
            a1, m1 = proc_cpu(fleet.agent), machine_busy()
            check = capacity_check(fleet)
            refilled = sum(
                c.log.read_text(errors="replace").count("filled up while placing") for c in fleet.controllers
            )
            n = result.done
            run = {
                "controllers": k,
                "hosts": args.hosts,
                "outstanding": args.outstanding,
                "duration_s": result.elapsed,
                "creates": n,
                "creates_per_s": result.rate,
                "p50_ms": statistics.median(result.latencies) * 1000 if n else None,
                "p99_ms": pct(result.latencies, 0.99) * 1000 if n else None,
                "errors": dict(result.errors),
                "timeouts": result.timeouts,
                "controller_cpu_pct": [(b - a) / result.elapsed * 100 for a, b in zip(c0, c1, strict=True)],
                "controller_cpu_ms_per_create": (sum(c1) - sum(c0)) / n * 1000 if n else None,
                "agent_cpu_pct": (a1 - a0) / result.elapsed * 100,
                "machine_busy_pct": (m1[0] - m0[0]) / max(1, m1[1] - m0[1]) * 100 * (os.cpu_count() or 1),
                "host_filled_retries": refilled,
                "choose_among": args.choose_among or 1,
                **check,
            }
            runs.append(run)
            base = runs[0]["creates_per_s"]
            active = check["vm_statuses"].get("active", 0)
            print(
                f"  {k} controller{'s' if k > 1 else ''}: {n} creates in {result.elapsed:.1f} s ="
                f" {result.rate:.1f}/s ({result.rate / base if base else 0:.2f}x of 1), p50"
                f" {run['p50_ms'] or 0:.0f} ms p99 {run['p99_ms'] or 0:.0f} ms, errors {dict(result.errors)}"
                f" timeouts {result.timeouts}; CPU controllers"
                f" {' + '.join(f'{c:.0f}' for c in run['controller_cpu_pct'])} % ="
                f" {run['controller_cpu_ms_per_create'] or 0:.1f} ms/create, agent {run['agent_cpu_pct']:.0f} %,"
                f" machine {run['machine_busy_pct']:.0f} %; capacity: {len(check['over_capacity'])} of"
                f" {check['hosts_with_vms']} hosts over (fullest {check['max_fill'] * 100:.0f} %), VM rows"
                f" {check['vm_statuses']} for {n + 3} creates answered ok; {refilled} claims found their host"
                f" filled meanwhile (logged retries); choose_among {args.choose_among or 1}",
                flush=True,
            )
            if check["over_capacity"]:
                print(f"    OVER CAPACITY: {check['over_capacity'][:10]}", flush=True)
            if active != n + 3:
                print(f"    VM rows active {active} != creates answered ok {n + 3}", flush=True)


# ------------------------------------------------------------------ the report


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("met" if ok else "MISSED")


def report(out: dict[str, Any]) -> list[dict[str, Any]]:
    """The figures table (printed and returned)."""
    rows: list[dict[str, Any]] = []

    def row(fig: str, what: str, value: str, floor: str, rat: str, target: str, ok: bool | None) -> None:
        rows.append(
            {"fig": fig, "what": what, "value": value, "floor": floor, "ratio": rat, "target": target}
        )
        rows[-1]["verdict"] = verdict(ok)

    s, ing, b = out.get("small"), out.get("ingest"), out.get("burst")
    if s:
        r = s["p50_base_ms"] / out["create_floor_ms"]
        row(
            "1",
            f"create p50, {s['hosts']} hosts, {s['base_vms']} VMs",
            f"{s['p50_base_ms']:.1f} ms",
            f"{out['create_floor_ms']:.2f} ms (API RPC {out['rpc_api_p50_ms']:.2f} + agent RPC"
            f" {out['rpc_agent_p50_ms']:.2f} + define+start {out['libvirt_define_start_ms']:.3f})",
            f"{r:.1f}x",
            "<= 3x",
            r <= TARGETS["create_over_floor"],
        )
        if "create_floor_quorum_ms" in out:
            rq = s["p50_base_ms"] / out["create_floor_quorum_ms"]
            row(
                "1",
                "the same p50 over the floor on quorum queues (the product's queue type, issue 13)",
                f"{s['p50_base_ms']:.1f} ms",
                f"{out['create_floor_quorum_ms']:.2f} ms (API RPC {out['rpc_api_quorum_p50_ms']:.2f} + agent"
                f" RPC {out['rpc_agent_quorum_p50_ms']:.2f} + define+start {out['libvirt_define_start_ms']:.3f})",
                f"{rq:.1f}x",
                "(detail)",
                None,
            )
        row(
            "1",
            "outside reference: Nova mean boot, 1,000 simulated hosts",
            f"{NOVA_BOOT_S * 1000:.0f} ms",
            "",
            f"ours {s['p50_base_ms'] / (NOVA_BOOT_S * 1000):.4f}x",
            "",
            None,
        )
        g = s["p50_fill_ms"] / s["p50_base_ms"]
        row(
            "2",
            f"create p50 with {s['fill_vms']} VMs / with {s['base_vms']}",
            f"{s['p50_fill_ms']:.1f} ms",
            f"{s['p50_base_ms']:.1f} ms",
            f"{g:.2f}x",
            "<= 1.3x",
            g <= TARGETS["p50_growth"],
        )
    if b:
        row(
            "3",
            f"creates/s, {b['hosts']} hosts, {out['database']}, {b['outstanding']} outstanding,"
            f" {b['duration_s']:.0f} s",
            f"{b['creates_per_s']:.1f}/s",
            f"define+start alone {1000 / out['libvirt_define_start_ms']:.0f}/s; one raw RPC at a time"
            f" {1000 / out['rpc_api_p50_ms']:.0f}/s",
            f"p50 {b['p50_ms'] or 0:.0f} ms",
            ">= 500/s",
            b["creates_per_s"] >= TARGETS["creates_per_s"],
        )
        row(
            "4",
            f"hosts shown down during / after the burst (of {b['hosts']})",
            f"{b['down_max_during']} / {b['down_max_after']}",
            "",
            f"host.list answered {b['reads_answered']}/{b['reads_polled']} polls, p50"
            f" {b['read_p50_ms'] or 0:.0f} ms max {b['read_max_ms'] or 0:.0f} ms",
            "0",
            b["down_max_during"] == 0 and b["down_max_after"] == 0,
        )
    if ing:
        for what, interval in (("heartbeats", ing["heartbeat_s"]), ("reports", ing["report_s"])):
            d = ing[what]
            # The 2,000 heartbeats/s + 333 reports/s are 1,000 hosts at 0.5 s and 3 s.
            wanted = out["hosts"] / interval
            target = f"{wanted:,.0f}/s"
            reached = d["offered_per_s"] >= 0.95 * wanted
            grew = d["depth_end"] - d["depth_start"]
            row(
                "5",
                f"{what}/s absorbed, {out['hosts']} hosts (queue depth start -> end, max)",
                f"{d['absorbed_per_s']:.0f}/s",
                f"offered {d['offered_per_s']:.0f}/s" + ("" if reached else " (agent short of target)"),
                f"{d['depth_start']} -> {d['depth_end']}, max {d['depth_max']}",
                f"{target}, no growth",
                (grew <= max(50, 0.02 * d["offered_per_s"] * ing["window_s"])) if reached else None,
            )
    syn = out.get("synthetic")
    if syn:
        for what in ("heartbeats", "reports"):
            d = syn[what]
            reached = d["offered_per_s"] >= 0.95 * d["target_per_s"]
            grew = d["depth_end"] - d["depth_start"]
            ok = grew <= max(50, 0.02 * d["offered_per_s"] * syn["window_s"]) and d["depth_max"] < 9000
            row(
                "5s",
                f"{what}/s absorbed, {syn['hosts']:,} synthetic hosts, {syn['window_s']:.0f} s"
                f" ({syn['changed_share'] * 100:.0f} % of reports changed; queue depth start -> end, max)",
                f"{d['absorbed_per_s']:.0f}/s",
                f"offered {d['offered_per_s']:.0f}/s" + ("" if reached else " (generator short of target)"),
                f"{d['depth_start']} -> {d['depth_end']}, max {d['depth_max']}; controller CPU"
                f" {syn['controller_cpu_pct']:.0f} %",
                f"{d['target_per_s']:,.0f}/s, no growth",
                ok if reached else None,
            )
        vms = (
            f", {syn['vm_rows']:,} VM rows"
            if syn["vm_rows"]
            else f" ({syn['vms_per_host']} VMs each reported, no VM rows)"
        )
        row(
            "6s",
            f"controller VmRSS with {syn['hosts']:,} hosts{vms}, end of ingestion (peak)",
            f"{syn['rss_end_mib']:.0f} MiB ({syn['rss_peak_mib']:.0f})",
            f"{syn['rss_empty_mib']:.0f} MiB with no host",
            f"{syn['rss_hosts_mib']:.0f} MiB right after registration",
            "<= 1,024 MiB",
            syn["rss_peak_mib"] <= 1024,
        )
    runs = out.get("controllers") or []
    for run in runs:
        base = runs[0]["creates_per_s"]
        failed = sum(run["errors"].values()) + run["timeouts"]
        row(
            "7",
            f"creates/s with {run['controllers']} controller process(es) (choose_among {run['choose_among']}), {run['hosts']} hosts,"
            f" {run['outstanding']} outstanding, {run['duration_s']:.0f} s",
            f"{run['creates_per_s']:.1f}/s",
            f"{base:.1f}/s with {runs[0]['controllers']}",
            f"{run['creates_per_s'] / base if base else 0:.2f}x; {failed} errors; hosts over capacity"
            f" {len(run['over_capacity'])} of {run['hosts_with_vms']} (fullest {run['max_fill'] * 100:.0f} %)",
            "0 errors, 0 over",
            failed == 0 and not run["over_capacity"],
        )
    if b:
        row(
            "6",
            "controller VmRSS after the burst",
            f"{b['rss_after_mib']:.0f} MiB",
            f"{b['rss_before_mib']:.0f} MiB before it",
            f"{b['rss_after_mib'] / b['rss_before_mib']:.2f}x",
            "",
            None,
        )
    print("\n| # | figure | value | floor / reference | ratio / detail | target | verdict |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['fig']} | {r['what']} | {r['value']} | {r['floor']} | {r['ratio']} | {r['target']} | {r['verdict']} |"
        )
    return rows


def print_profile(path: Path, title: str, k: int = 10) -> list[tuple[str, float, float]]:
    """Top ``k`` functions by own and by total time."""
    if not path.exists():
        print(f"\n{title}: no file {path}")
        return []
    stacks = load_stacks(path)
    total = sum(stacks.values())
    print(f"\n=== {title}: {path} ({total} samples)")
    if not total:
        return []
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    pkg: Counter[str] = Counter()
    for stack, count in stacks.items():
        frames = stack[1:] if stack and stack[0].startswith(("thread", "process")) else stack
        if not frames:
            continue
        own[frames[-1]] += count
        pkg[package_of(frames[-1])] += count
        for f in set(frames):
            incl[f] += count
    top = [(name, own[name] / total * 100, incl[name] / total * 100) for name, _ in own.most_common(k)]
    print(f"top {k} by own time (own %, total %)")
    for name, o, t in top:
        print(f"  {o:5.1f}  {t:5.1f}  {name}")
    print(f"top {k} by total time")
    for name, count in incl.most_common(k):
        print(f"  {count / total * 100:5.1f}  {name}")
    print("own time by package")
    for name, count in pkg.most_common(8):
        print(f"  {count / total * 100:5.1f}  {name}")
    return top


# ------------------------------------------------------------------ main


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hosts", type=int, default=1000, help="simulated hosts of the burst and ingestion")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of the create burst")
    parser.add_argument("--outstanding", type=int, default=64, help="creates in flight (burst and fill)")
    parser.add_argument("--database", choices=["sqlite", "postgres"], default="postgres")
    parser.add_argument("--quick", action="store_true", help="a smoke run of about a minute")
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument("--small-hosts", type=int, default=5)
    parser.add_argument("--base", type=int, default=50, help="VMs in the small fleet for the first sample")
    parser.add_argument("--fill", type=int, default=2000, help="VMs in the small fleet for the second sample")
    parser.add_argument("--sample", type=int, default=50, help="sequential creates per sample")
    parser.add_argument("--ingest-window", type=float, default=20.0, help="seconds of ingestion measured")
    parser.add_argument("--ingest-heartbeat", type=float, default=0.5, help="agent heartbeat interval, s")
    parser.add_argument("--ingest-report", type=float, default=3.0, help="agent report interval, s")
    parser.add_argument(
        "--after", type=float, default=10.0, help="seconds of host.list polls after the burst"
    )
    parser.add_argument("--down-after", type=float, help="controller --down-after (default: the product's)")
    parser.add_argument(
        "--phases",
        help="comma-separated subset of small,ingest,burst,synthetic,controllers (default: small,ingest,burst;"
        " only synthetic and/or controllers when --ingest-synthetic / --controllers is given)",
    )
    parser.add_argument(
        "--ingest-synthetic",
        type=int,
        metavar="N",
        help="synthetic ingestion: N fake hosts (bench/loadgen.py), heartbeats N/5 per s + reports N/30 per s",
    )
    parser.add_argument(
        "--ingest-seconds", type=float, default=30.0, help="measured window of --ingest-synthetic"
    )
    parser.add_argument(
        "--synthetic-warmup", type=float, default=10.0, help="paced seconds before the window"
    )
    parser.add_argument("--synthetic-vms", type=int, default=10, help="VMs in each synthetic host's report")
    parser.add_argument("--synthetic-change", type=float, default=0.1, help="share of reports that change")
    parser.add_argument("--synthetic-publishers", type=int, default=1, help="load generator processes")
    parser.add_argument(
        "--no-synthetic-vm-rows",
        dest="synthetic_vm_rows",
        action="store_false",
        help="do not insert a VM row (+ allocations) per reported VM (PostgreSQL only)",
    )
    parser.add_argument(
        "--controllers", metavar="K,K,...", help="the burst with K controller processes each (e.g. 1,2,4)"
    )
    parser.add_argument(
        "--choose-among",
        type=int,
        help="controllers' choose_among (a --config TOML): pick at random among the best N (product default 1)",
    )
    parser.add_argument("--profile", type=Path, help="py-spy raw output of the controller during the burst")
    parser.add_argument(
        "--trace",
        type=Path,
        help="append each process's stage timestamps to this file (bench/stagetrace; read it with "
        "bench/stage_report.py); slows every create a little",
    )
    parser.add_argument("--profile-rate", type=int, default=100)
    parser.add_argument(
        "--small-profile-s",
        type=int,
        default=10,
        help="with --profile and the small phase: seconds of py-spy on the first sequential sample"
        " (FILE.small.SUFFIX; give a --sample that lasts longer)",
    )
    parser.add_argument("--rpc-calls", type=int, default=1000)
    parser.add_argument("--libvirt-cycles", type=int, default=500)
    parser.add_argument("--log-level", default="INFO", help="of the controller (the product default)")
    parser.add_argument("--call-timeout", type=float, default=120.0)
    parser.add_argument("--read-timeout", type=float, default=10.0, help="per api.host.list poll")
    parser.add_argument(
        "--startup-timeout", type=float, default=300.0, help="per fleet, until all hosts are up"
    )
    parser.add_argument("--deadline", type=float, default=900.0, help="seconds for the whole script")
    args = parser.parse_args()
    if args.quick:
        args.hosts = min(args.hosts, 100)
        args.duration = min(args.duration, 8.0)
        args.base, args.fill, args.sample = 20, 150, 15
        args.ingest_window, args.after = 6.0, 3.0
        args.rpc_calls, args.libvirt_cycles = 200, 100
        args.deadline = min(args.deadline, 300.0)
    if args.fill < args.base + args.sample:
        parser.error("--fill must be at least --base + --sample")
    if args.profile:
        if not PYSPY.exists():
            parser.error(f"--profile needs py-spy at {PYSPY} (pip install py-spy)")
        args.profile = args.profile.resolve()
    if args.phases is None:
        extra = {"synthetic"} if args.ingest_synthetic else set()
        extra |= {"controllers"} if args.controllers else set()
        args.phases = ",".join(sorted(extra)) or "small,ingest,burst"
    phases = set(args.phases.split(","))
    if "synthetic" in phases and not args.ingest_synthetic:
        parser.error("the synthetic phase needs --ingest-synthetic N")
    if "controllers" in phases and not args.controllers:
        parser.error("the controllers phase needs --controllers K,K,...")
    if args.controllers and args.database != "postgres":
        parser.error("--controllers needs --database postgres (the capacity check reads it)")

    def on_alarm(_sig: int, _frame: Any) -> None:
        raise BenchTimeout(f"the benchmark ran past --deadline {args.deadline:.0f} s")

    def on_term(_sig: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGALRM, on_alarm)
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored
    signal.setitimer(signal.ITIMER_REAL, args.deadline)
    out: dict[str, Any] = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "database": args.database,
        "hosts": args.hosts,
        "load_start": os.getloadavg()[0],
    }
    started = time.monotonic()
    stack = contextlib.ExitStack()
    try:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="vf-fleet-")))
        print(
            f"fleet benchmark: {args.hosts} hosts, {args.database}, {args.outstanding} outstanding,"
            f" {args.duration:g} s burst{' (quick)' if args.quick else ''}; {os.cpu_count()} CPUs,"
            f" load average {out['load_start']:.1f}",
            flush=True,
        )
        floors(args, out)
        if "small" in phases:
            small_fleet(args, tmp, out)
        if "ingest" in phases:
            ingestion(args, tmp, out)
        if "burst" in phases:
            burst_phase(args, tmp, out)
        if "synthetic" in phases:
            synthetic_ingestion(args, tmp, out)
        if "controllers" in phases:
            controllers_phase(args, tmp, out)
        out["wall_s"] = time.monotonic() - started
        out["load_end"] = os.getloadavg()[0]
        print(f"\nwall {out['wall_s']:.0f} s, load average {out['load_start']:.1f} -> {out['load_end']:.1f}")
        out["table"] = report(out)
        if args.profile and "burst" in phases:
            out["profile_top"] = {
                "gil": print_profile(gil_path(args.profile), "controller, thread holding the GIL (CPU)"),
                "active": print_profile(args.profile, "controller, every thread not sleeping"),
            }
        if args.profile and "small" in phases:
            spy = profile_path(args.profile, "small")
            out["profile_top_small"] = {
                "gil": print_profile(gil_path(spy), "controller, sequential creates, GIL (CPU)"),
                "active": print_profile(spy, "controller, sequential creates, every thread not sleeping"),
            }
        if args.profile and "synthetic" in phases:
            spy = profile_path(args.profile, "synthetic")
            out["profile_top_synthetic"] = {
                "gil": print_profile(gil_path(spy), "controller during synthetic ingestion, GIL (CPU)"),
                "active": print_profile(
                    spy, "controller during synthetic ingestion, every thread not sleeping"
                ),
            }
        if args.json:
            args.json.write_text(json.dumps(out, indent=1, default=str))
    except KeyboardInterrupt:
        signal.setitimer(signal.ITIMER_REAL, 0)
        with signals_held():
            stack.close()
        print("\ninterrupted; cleaned up", file=sys.stderr)
        return 130
    except BenchTimeout as exc:
        with signals_held():
            stack.close()
        print(f"\n{exc}; cleaned up", file=sys.stderr)
        return 124
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        with signals_held():
            stack.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
