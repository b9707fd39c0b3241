"""Fleet benchmark (issue 11, item 9): creates, reads, ingestion and memory of one controller on
real RabbitMQ + a real database + simulated hosts, each figure next to a floor measured in the
same run (ratios, not absolute times: the machine is noisy).

Phases, each in a private RabbitMQ vhost with a fresh database (``--database sqlite`` or
``postgres``: a throw-away ``virtfleet_bench_<pid>_<phase>`` on 127.0.0.1:5432, dropped at the
end), one controller ``python -m controller.main`` and one multi-host agent ``python -m
agent.main --simulate N --node-template FILE``:

0. floors: the raw pika RPC round trip (bench/placement.py's ``raw_rpc``), transient as an API call
   and persistent as an agent command, and the libvirt test driver's defineXML + create;
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
    BenchTimeout,
    Proc,
    Processes,
    RawClient,
    cleanup_stack,
    cpu_seconds,
    create_body,
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

from common.messages.api import API_HOST_LIST, API_VM_CREATE  # noqa: E402

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
    """One phase's controller, agent and API client."""

    url: str
    procs: Processes
    controller: Proc
    agent: Proc
    client: RawClient
    hosts: int


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
) -> Fleet:
    """A vhost, a database, a controller and a ``--simulate hosts`` agent, every host up; all
    undone by ``stack``."""
    work = tmp / phase
    work.mkdir()
    url = stack.enter_context(private_vhost(f"vffleet-{phase}"))
    db = stack.enter_context(
        throwaway_database(args.database, work, f"virtfleet_bench_{os.getpid()}_{phase}")
    )
    procs = Processes()
    stack.callback(procs.stop_all)
    env = fleet_env(ROOT, url)
    argv = [sys.executable, "-m", "controller.main", "--database-url", db, "--log-level", args.log_level]
    if args.down_after:
        argv += ["--down-after", str(args.down_after)]
    controller = procs.spawn("controller", argv, env, work)
    argv = [sys.executable, "-m", "agent.main", "--simulate", str(hosts), "--node-template", str(template)]
    argv += ["--host-prefix", f"{phase}-", "--state-dir", str(work / "agent-state")]
    argv += ["--heartbeat-interval", str(heartbeat), "--report-interval", str(report)]
    agent = procs.spawn("agent", [*argv, "--log-level", "WARNING"], env, work)
    t0 = time.monotonic()
    client = connect(url, procs, timeout=60)
    stack.callback(client.close)
    fleet = Fleet(url, procs, controller, agent, client, hosts)
    wait_hosts_up(fleet, args.startup_timeout)
    print(
        f"  {phase}: controller + agent of {hosts} hosts ({template.name}, heartbeat {heartbeat:g} s,"
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
    lv = libvirt_cycles(args.libvirt_cycles, SMALL_TEMPLATE)
    out["rpc_api_p50_ms"] = statistics.median(api) * 1000
    out["rpc_api_p99_ms"] = pct(api, 0.99) * 1000
    out["rpc_agent_p50_ms"] = statistics.median(agent) * 1000
    out["libvirt_define_start_ms"] = statistics.median(a for a, _ in lv) * 1000
    out["create_floor_ms"] = out["rpc_api_p50_ms"] + out["rpc_agent_p50_ms"] + out["libvirt_define_start_ms"]
    print(
        f"  floors: raw pika RPC p50 {out['rpc_api_p50_ms']:.2f} ms transient (API call),"
        f" {out['rpc_agent_p50_ms']:.2f} ms persistent (agent command); test driver define+start"
        f" {out['libvirt_define_start_ms']:.3f} ms; create floor = sum {out['create_floor_ms']:.2f} ms",
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
        at_base = sequential(fleet.client, "s-base", args.sample)
        grown = burst(
            fleet.url,
            limited("fill", args.fill - args.base - args.sample),
            outstanding=args.outstanding,
            duration=None,
            call_timeout=args.call_timeout,
            procs=fleet.procs,
        )
        vms = args.base + args.sample + grown.done
        at_fill = sequential(fleet.client, "s-fill", args.sample)
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
        }
        s = out["small"]
        print(
            f"  small fleet: p50 {s['p50_base_ms']:.1f} ms with {args.base} VMs, {s['p50_fill_ms']:.1f} ms"
            f" with {vms} VMs ({args.sample} sequential creates each); filled at {grown.rate:.0f}"
            f" creates/s with {args.outstanding} outstanding, {failed} failed {dict(fill.errors + grown.errors)}",
            flush=True,
        )


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
    parser.add_argument("--phases", default="small,ingest,burst", help="comma-separated subset")
    parser.add_argument("--profile", type=Path, help="py-spy raw output of the controller during the burst")
    parser.add_argument("--profile-rate", type=int, default=100)
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
    phases = set(args.phases.split(","))

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
        out["wall_s"] = time.monotonic() - started
        out["load_end"] = os.getloadavg()[0]
        print(f"\nwall {out['wall_s']:.0f} s, load average {out['load_start']:.1f} -> {out['load_end']:.1f}")
        out["table"] = report(out)
        if args.profile:
            out["profile_top"] = {
                "gil": print_profile(gil_path(args.profile), "controller, thread holding the GIL (CPU)"),
                "active": print_profile(args.profile, "controller, every thread not sleeping"),
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
