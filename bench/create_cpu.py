"""Controller CPU per VM create, this tree against a previous release, with the floors and a profile.

For each tree (this one, and the one at ``--before REV``, default ``ead0cac``, the previous release,
extracted with ``git archive``) and each run:

* a private RabbitMQ vhost and a fresh SQLite database in a temporary directory;
* ``python -m controller.main --down-after 60`` and N agents ``python -m agent.main`` on the libvirt
  test driver (``tests/fixtures/nodes/large.xml``), with that tree on ``PYTHONPATH``;
* once ``api.host.list`` shows every host up: a few warm-up creates, the CPU of the idle fleet over a
  short window, then M sequential ``api.vm.create`` calls (optionally followed by M more from C
  concurrent clients, after the first M are deleted) sent by a raw client written against the wire
  protocol with pika + msgpack only, so the same client drives both trees;
* controller CPU = utime + stime (+ cutime + cstime) from ``/proc/<pid>/stat`` read before and after
  the burst, divided by the number of creates; the same summed over the agents; create latency
  p50/p99.

The floors, measured in the same run: the raw pika RPC round trip p50 (bench/placement.py's
``raw_rpc``: an echo server in another process, persistent confirmed requests), the test driver's
defineXML + create + destroy + undefine per VM (a subprocess opening the same node file), and one
SQLite WAL write transaction (fsync) in the same file system as the fleet's databases.

``--profile FILE`` adds one more pass of this tree (``--profile-tree before``: of the other one),
after the measured runs and not counted in their medians, with two ``py-spy record --nonblocking
--function --threads`` attached to the controller during the burst: every thread not sleeping
(``FILE``) and only the thread holding the GIL (``FILE`` with ``.gil`` before the suffix; the CPU
view: py-spy counts threads in disk sleep and in the run queue as active). ``FILE`` ending in
``.json`` gives speedscope files, anything else raw collapsed stacks. It prints, for both, the top
functions by own and by total time, own time by package and samples per thread.

Run as root from the repository root (RabbitMQ on 127.0.0.1:5672, rabbitmqctl on PATH)::

    .venv/bin/python bench/create_cpu.py [--agents 3] [--creates 200] [--runs 3] [--clients 0]
        [--before ead0cac | --no-before] [--profile /tmp/ctl.txt] [--json results.json]
    .venv/bin/python bench/create_cpu.py --merge a.json b.json ...   # one summary of several invocations

Everything is bounded (a per-call timeout, a deadline for the whole script) and cleaned up on any
exit, Ctrl-C included: processes stopped, vhosts deleted, temporary directories removed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pika
import pika.exceptions

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from fleetkit import (  # noqa: E402
    NODE_FILE,
    PYSPY,
    BenchTimeout,
    Proc,
    Processes,
    RawClient,
    cpu_seconds,
    create_body,
    enroll_keys,
    init_keys,
    libvirt_floor,
    load_stacks,
    package_of,
    pct,
    private_vhost,
)
from placement import raw_rpc  # noqa: E402

# The kinds' names only (the raw client, bench/fleetkit.py, speaks the wire protocol of docs/protocol.md, which
# both trees share); the descriptors are where they are spelled.
from common.messages.api import API_HOST_LIST, API_VM_CREATE, API_VM_DELETE  # noqa: E402

#: The previous release: messages converted by the reflective common/schema.py, wire byte-identical.
DEFAULT_BEFORE = "ead0cac"


def spread(values: list[float]) -> str:
    """'median [min-max]' of the runs."""
    if not values:
        return "-"
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:.2f}"
    return f"{med:.2f} [{min(values):.2f}-{max(values):.2f}]"


def sqlite_floor(directory: Path, commits: int) -> list[float]:
    """Seconds per SQLite write transaction as the controller runs them (WAL, synchronous FULL,
    BEGIN IMMEDIATE, one small INSERT, COMMIT) on the file system of the fleet's databases."""
    path = directory / "floor.db"
    db = sqlite3.connect(path, isolation_level=None, timeout=30)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, payload TEXT)")
        samples = []
        for i in range(commits + 10):
            t0 = time.perf_counter()
            db.execute("BEGIN IMMEDIATE")
            db.execute("INSERT INTO t (payload) VALUES (?)", ("x" * 200,))
            db.execute("COMMIT")
            if i >= 10:
                samples.append(time.perf_counter() - t0)
        return samples
    finally:
        db.close()
        for suffix in ("", "-wal", "-shm"):
            path.with_name(path.name + suffix).unlink(missing_ok=True)


# ------------------------------------------------------------------ one tree, one run


@dataclass
class TreeRun:
    """The figures of one tree in one run."""

    tree: str
    creates: int
    ctl_cpu_ms: float  # controller CPU per create (user + sys)
    ctl_user_ms: float
    ctl_sys_ms: float
    ctl_first_half_ms: float
    ctl_second_half_ms: float
    agents_cpu_ms: float  # sum over the agents, per create
    ctl_idle_ms_per_s: float  # controller CPU of the idle fleet, ms per second of wall time
    agents_idle_ms_per_s: float
    burst_s: float
    p50_ms: float
    p99_ms: float
    mean_ms: float
    conc_ctl_cpu_ms: float | None = None
    conc_agents_cpu_ms: float | None = None
    conc_rate: float | None = None
    conc_p50_ms: float | None = None
    profile: str | None = None


def fleet_env(tree: Path, url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTFLEET_", "PYTHON"))}
    env.update(VIRTFLEET_AMQP_URL=url, PYTHONPATH=str(tree), PYTHONUNBUFFERED="1")
    # The bench's one broker login (guest) is an admin, and its bursts are not rate limited;
    # every process (and the load generator's fake hosts) logs in as guest: development mode.
    env.update(
        VIRTFLEET_ACCESS_ROLES="guest=admin",
        VIRTFLEET_ACCESS_RATE_PER_S="0",
        VIRTFLEET_TRUST_BROKER_LOGINS="false",
    )
    return env


def wait_hosts_up(client: RawClient, procs: Processes, ids: set[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        procs.check_alive()
        try:
            hosts = client.call(API_HOST_LIST.kind, {}, timeout=10)["hosts"]
            last = {h["host_id"]: h["status"] for h in hosts}
            if all(last.get(i) == "up" for i in ids):
                return
        except (pika.exceptions.UnroutableError, TimeoutError):
            pass  # the controller has not declared virtfleet.api yet, or is still starting
        time.sleep(0.5)
    raise TimeoutError(f"hosts {sorted(ids)} not all up after {timeout:.0f} s; last seen {last}")


def fleet_cpu(procs: list[Proc]) -> float:
    return sum(sum(cpu_seconds(p.popen.pid)) for p in procs)


def gil_path(out: Path) -> Path:
    """Where the GIL-only recording of ``--profile FILE`` goes: FILE with ``.gil`` before the suffix."""
    return out.with_name(f"{out.stem}.gil{out.suffix}")


@contextlib.contextmanager
def pyspy(pid: int, out: Path, rate: int, tmp: Path, processes: Processes) -> Iterator[None]:
    """Two py-spy recorders attached to ``pid`` for the duration of the block: every sample of a
    thread that is not sleeping (``out``) and only those of the thread holding the GIL
    (:func:`gil_path`); SIGINT makes them write their files."""
    fmt = "speedscope" if out.suffix == ".json" else "raw"
    spies = []
    for name, path, extra in (("py-spy", out, []), ("py-spy-gil", gil_path(out), ["--gil"])):
        argv = [str(PYSPY), "record", "--pid", str(pid), "--rate", str(rate), "--format", fmt]
        argv += ["--output", str(path), "--nonblocking", "--function", "--threads", *extra]
        spies.append(processes.spawn(name, argv, dict(os.environ), tmp))
    deadline = time.monotonic() + 20
    for proc in spies:
        while "Sampling process" not in proc.log.read_text(errors="replace"):
            if proc.popen.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{proc.name} did not start:\n{proc.tail()}")
            time.sleep(0.1)
    try:
        yield
    finally:
        for proc in spies:
            proc.popen.send_signal(signal.SIGINT)
        for proc in spies:
            proc.stop(timeout=60, sig=signal.SIGINT)
            processes.procs.remove(proc)
            if proc.popen.returncode not in (0, -signal.SIGINT):
                print(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.tail()}", flush=True)


def run_tree(
    label: str, tree: Path, url: str, args: argparse.Namespace, profile: Path | None = None
) -> TreeRun:
    with tempfile.TemporaryDirectory(prefix=f"vf-createcpu-{label}-") as tmp_name:
        tmp = Path(tmp_name)
        env = fleet_env(tree, url)
        processes = Processes()
        client: RawClient | None = None
        try:
            db = f"sqlite:///{tmp / 'virtfleet.db'}"
            ids = {f"sim{i}" for i in range(args.agents)}
            # Signed, as a deployed fleet is (a tree without signing runs unsigned).
            env.update(init_keys(tmp, env))
            env.update(enroll_keys(tmp, env, sorted(ids)))
            argv = [sys.executable, "-m", "controller.main", "--database-url", db, "--down-after", "60"]
            controller = processes.spawn("controller", [*argv, "--log-level", args.log_level], env, tmp)
            agents = []
            for host in sorted(ids):
                state = tmp / f"agent-{host}"
                state.mkdir()
                argv = [sys.executable, "-m", "agent.main", "--host-id", host]
                argv += ["--libvirt-uri", f"test://{NODE_FILE}", "--state-dir", str(state)]
                argv += ["--heartbeat-interval", "5", "--report-interval", "30"]
                agents.append(processes.spawn(f"agent-{host}", argv, env, tmp))
            client = RawClient(url, timeout=args.call_timeout)
            wait_hosts_up(client, processes, ids, timeout=120)
            for i in range(args.warmup):
                client.call(API_VM_CREATE.kind, create_body(f"warm-{i}"))

            # The idle fleet: heartbeats, reports, the reconciler (subtracted nowhere; shown beside).
            c0, a0, t0 = fleet_cpu([controller]), fleet_cpu(agents), time.monotonic()
            time.sleep(args.idle)
            idle_s = time.monotonic() - t0
            ctl_idle = (fleet_cpu([controller]) - c0) / idle_s * 1000
            agents_idle = (fleet_cpu(agents) - a0) / idle_s * 1000

            spy = (
                pyspy(controller.popen.pid, profile, args.profile_rate, tmp, processes)
                if profile
                else contextlib.nullcontext()
            )
            latencies: list[float] = []
            with spy:
                u0, s0 = cpu_seconds(controller.popen.pid)
                a0, t0 = fleet_cpu(agents), time.perf_counter()
                half = 0.0
                for i in range(args.creates):
                    if i == args.creates // 2:
                        half = sum(cpu_seconds(controller.popen.pid))
                    c = time.perf_counter()
                    client.call(API_VM_CREATE.kind, create_body(f"seq-{i}"))
                    latencies.append(time.perf_counter() - c)
                burst = time.perf_counter() - t0
                u1, s1 = cpu_seconds(controller.popen.pid)
                a1 = fleet_cpu(agents)
            n = args.creates
            first, second = n // 2, n - n // 2
            result = TreeRun(
                tree=label,
                creates=n,
                ctl_cpu_ms=(u1 + s1 - u0 - s0) / n * 1000,
                ctl_user_ms=(u1 - u0) / n * 1000,
                ctl_sys_ms=(s1 - s0) / n * 1000,
                ctl_first_half_ms=(half - u0 - s0) / first * 1000,
                ctl_second_half_ms=(u1 + s1 - half) / second * 1000,
                agents_cpu_ms=(a1 - a0) / n * 1000,
                ctl_idle_ms_per_s=ctl_idle,
                agents_idle_ms_per_s=agents_idle,
                burst_s=burst,
                p50_ms=statistics.median(latencies) * 1000,
                p99_ms=pct(latencies, 0.99) * 1000,
                mean_ms=statistics.fmean(latencies) * 1000,
                profile=str(profile) if profile else None,
            )
            if args.clients and not profile:
                concurrent(client, url, controller, agents, args, result)
            processes.check_alive()
            return result
        except Exception:  # a failure (not Ctrl-C): show what the daemons said
            for proc in processes.procs:
                print(f"----- {label} {proc.name} (last lines)\n{proc.tail()}", file=sys.stderr)
            raise
        finally:
            if client:
                client.close()
            processes.stop_all()


def concurrent(
    client: RawClient, url: str, controller: Proc, agents: list[Proc], args: argparse.Namespace, out: TreeRun
) -> None:
    """M more creates from ``--clients`` threads, each with its own connection (after deleting the
    sequential burst's VMs, outside the measured window, so capacity is the same)."""
    for i in range(args.creates):
        client.call(API_VM_DELETE.kind, {"name": f"seq-{i}", "delete_disks": True})
    local = threading.local()
    clients: list[RawClient] = []
    lock = threading.Lock()

    def one(i: int) -> float:
        if not hasattr(local, "client"):
            local.client = RawClient(url, timeout=args.call_timeout)
            with lock:
                clients.append(local.client)
        t = time.perf_counter()
        local.client.call(API_VM_CREATE.kind, create_body(f"par-{i}"))
        return time.perf_counter() - t

    try:
        with ThreadPoolExecutor(args.clients) as pool:
            c0, a0, t0 = fleet_cpu([controller]), fleet_cpu(agents), time.perf_counter()
            latencies = list(pool.map(one, range(args.creates), timeout=args.call_timeout * 4))
            wall = time.perf_counter() - t0
            c1, a1 = fleet_cpu([controller]), fleet_cpu(agents)
    finally:
        for c in clients:
            c.close()
    out.conc_ctl_cpu_ms = (c1 - c0) / args.creates * 1000
    out.conc_agents_cpu_ms = (a1 - a0) / args.creates * 1000
    out.conc_rate = args.creates / wall
    out.conc_p50_ms = statistics.median(latencies) * 1000


# ------------------------------------------------------------------ the profile


def thread_kind(frame: str) -> str:
    """'thread (3555): controller:host:3485-api-worker_0' -> 'api-worker'."""
    name = frame.partition(": ")[2] or frame
    return re.sub(r"_\d+$", "", re.sub(r"^controller:[^:]*:\d+-", "", name))


def print_profile(path: Path, title: str, cpu_ms_per_create: float, cpu_s: float, rate: int) -> None:
    """Top functions by own and total time, own time by package, samples per thread."""
    stacks = load_stacks(path)
    total = sum(stacks.values())
    print(f"\n=== {title}: {path}")
    if not total:
        print("no samples")
        return
    print(
        f"{total} samples = {total / rate:.2f} s at {rate} Hz, against {cpu_s:.2f} s of controller CPU"
        f" in the burst (py-spy also samples from attach to the end of the burst)"
    )
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    pkg: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    for stack, n in stacks.items():
        thread, frames = stack[0], stack[1:]
        if not frames:
            continue
        threads[thread_kind(thread)] += n
        own[frames[-1]] += n
        pkg[package_of(frames[-1])] += n
        for f in set(frames):
            incl[f] += n

    def show(heading: str, counter: Counter[str], k: int) -> None:
        print(f"{heading}  (% of samples; 'ms' = share x {cpu_ms_per_create:.2f} ms CPU/create)")
        for name, n in counter.most_common(k):
            share = n / total
            print(f"  {share * 100:5.1f}%  {share * cpu_ms_per_create:6.2f} ms  {name}")

    show("top 15 functions by own time", own, 15)
    show("top 15 functions by total time", incl, 15)
    show("own time by package of the leaf frame", pkg, 10)
    show("samples per thread", threads, 10)


# ------------------------------------------------------------------ driving it


def extract(rev: str, into: Path) -> Path:
    tree = into / f"tree-{rev}"
    tree.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "agent", "common", "controller"],
        capture_output=True,
        check=True,
        timeout=60,
    )
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True, timeout=60)
    return tree


def line(r: TreeRun) -> str:
    s = (
        f"{r.tree:<8} ctl {r.ctl_cpu_ms:6.2f} ms/create (user {r.ctl_user_ms:.2f} sys {r.ctl_sys_ms:.2f};"
        f" halves {r.ctl_first_half_ms:.2f}/{r.ctl_second_half_ms:.2f})  agents {r.agents_cpu_ms:6.2f}"
        f"  idle ctl {r.ctl_idle_ms_per_s:.1f} ms/s agents {r.agents_idle_ms_per_s:.1f} ms/s"
        f"  p50 {r.p50_ms:.1f} p99 {r.p99_ms:.1f} ms  burst {r.burst_s:.1f} s"
    )
    if r.conc_ctl_cpu_ms is not None:
        s += (
            f"\n{'':<8} concurrent: ctl {r.conc_ctl_cpu_ms:6.2f} ms/create agents {r.conc_agents_cpu_ms:.2f}"
            f"  {r.conc_rate:.1f} creates/s  p50 {r.conc_p50_ms:.1f} ms"
        )
    return s


def summarize(runs: list[dict[str, Any]], trees: list[str], agents: int, creates: int) -> None:
    """Median [min-max] over the runs of every figure, its ratios to the floors and between trees."""
    print(
        f"\n== summary: {len(runs)} run(s), {agents} agents, {creates} sequential creates each;"
        " median [min-max] over runs"
    )
    floors = (
        ("raw pika RPC p50, ms", "rpc_p50_ms"),
        ("raw pika RPC p99, ms", "rpc_p99_ms"),
        ("libvirt test define+start+destroy+undefine, ms/VM", "libvirt_ms"),
        ("SQLite WAL commit (fsync) p50, ms", "sqlite_commit_ms"),
        ("load average (1 min) at the start of the run", "load"),
    )
    for title, key in floors:
        values = [r[key] for r in runs if key in r]
        if values:
            print(f"floor  {title:<52} {spread(values)}")
    per: dict[str, dict[str, list[float]]] = {}
    for r in runs:
        for t in r["trees"]:
            d = per.setdefault(t["tree"], {})
            for k, v in t.items():
                if isinstance(v, float):
                    d.setdefault(k, []).append(v)
            d.setdefault("p50_over_rpc", []).append(t["p50_ms"] / r["rpc_p50_ms"])
            d.setdefault("ctl_over_rpc", []).append(t["ctl_cpu_ms"] / r["rpc_p50_ms"])
            d.setdefault("ctl_over_libvirt", []).append(t["ctl_cpu_ms"] / r["libvirt_ms"])
            d.setdefault("agents_over_libvirt", []).append(t["agents_cpu_ms"] / r["libvirt_ms"])
            d.setdefault("growth", []).append(t["ctl_second_half_ms"] / t["ctl_first_half_ms"])
    rows: list[tuple[str, str]] = [
        ("controller CPU ms/create", "ctl_cpu_ms"),
        ("  user", "ctl_user_ms"),
        ("  sys", "ctl_sys_ms"),
        ("  first half of the burst", "ctl_first_half_ms"),
        ("  second half of the burst", "ctl_second_half_ms"),
        ("  second half / first half", "growth"),
        ("agents CPU ms/create (sum)", "agents_cpu_ms"),
        ("idle controller CPU ms/s", "ctl_idle_ms_per_s"),
        ("idle agents CPU ms/s", "agents_idle_ms_per_s"),
        ("create p50 ms", "p50_ms"),
        ("create p99 ms", "p99_ms"),
        ("controller CPU / RPC p50", "ctl_over_rpc"),
        ("controller CPU / libvirt floor", "ctl_over_libvirt"),
        ("agents CPU / libvirt floor", "agents_over_libvirt"),
        ("create p50 / RPC p50", "p50_over_rpc"),
        ("concurrent: controller CPU ms/create", "conc_ctl_cpu_ms"),
        ("concurrent: creates/s", "conc_rate"),
    ]
    print(f"{'':<38}" + "".join(f"{t:>28}" for t in trees))
    for title, key in rows:
        if not any(per[t].get(key) for t in trees):
            continue
        print(f"{title:<38}" + "".join(f"{spread(per[t].get(key, [])):>28}" for t in trees))
    if len(trees) == 2:
        before, after = trees
        pairs = [{t["tree"]: t for t in r["trees"]} for r in runs]
        for title, key in (
            ("controller CPU", "ctl_cpu_ms"),
            ("agents CPU", "agents_cpu_ms"),
            ("create p50", "p50_ms"),
        ):
            ratios = [p[before][key] / p[after][key] for p in pairs]
            print(f"{title} {before}/{after}, per run: {spread(ratios)}x")


def merge(files: list[Path]) -> None:
    """The summary of the runs saved by several ``--json`` files."""
    docs = [json.loads(f.read_text()) for f in files]
    runs = [r for d in docs for r in d["runs"]]
    trees = list(dict.fromkeys(t["tree"] for r in runs for t in r["trees"]))
    args = docs[0]["args"]
    summarize(runs, trees, int(args["agents"]), int(args["creates"]))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--agents", type=int, default=3)
    parser.add_argument("--creates", type=int, default=200, help="sequential creates per burst")
    parser.add_argument("--clients", type=int, default=0, help="also M creates from C concurrent clients")
    parser.add_argument("--runs", type=int, default=1, help="measured runs (tree order alternates; 0: none)")
    parser.add_argument("--warmup", type=int, default=5, help="creates before the measured burst")
    parser.add_argument("--idle", type=float, default=5.0, help="seconds of idle-fleet CPU measurement")
    parser.add_argument("--before", default=DEFAULT_BEFORE, help="git revision to compare with")
    parser.add_argument("--no-before", action="store_true", help="only this tree")
    parser.add_argument("--profile", type=Path, help="py-spy output of an extra, profiled pass")
    parser.add_argument("--profile-rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument(
        "--profile-tree", choices=["after", "before"], default="after", help="tree to profile"
    )
    parser.add_argument("--rpc-calls", type=int, default=1000)
    parser.add_argument("--libvirt-cycles", type=int, default=500)
    parser.add_argument("--sqlite-commits", type=int, default=200)
    parser.add_argument("--log-level", default="INFO", help="of the controller (the product default)")
    parser.add_argument("--call-timeout", type=float, default=120.0)
    parser.add_argument("--deadline", type=float, default=3600.0, help="seconds for the whole script")
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument("--merge", type=Path, nargs="+", help="only summarize these --json files")
    args = parser.parse_args()
    if args.merge:
        merge(args.merge)
        return 0
    if args.profile and args.profile_tree == "before" and args.no_before:
        parser.error("--profile-tree before needs a before tree")
    if args.profile and not PYSPY.exists():
        parser.error(f"--profile needs py-spy at {PYSPY} (pip install py-spy)")

    def on_alarm(_sig: int, _frame: Any) -> None:
        raise BenchTimeout(f"the benchmark ran past --deadline {args.deadline:.0f} s")

    def on_term(_sig: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGALRM, on_alarm)
    signal.signal(signal.SIGTERM, on_term)
    signal.setitimer(signal.ITIMER_REAL, args.deadline)
    try:
        with tempfile.TemporaryDirectory(prefix="vf-createcpu-") as tmp:
            trees = {"after": ROOT}
            if not args.no_before:
                trees = {"before": extract(args.before, Path(tmp)), "after": ROOT}
            order = list(trees)
            head = git("rev-parse", "--short", "HEAD") + (
                "+dirty" if git("status", "--porcelain", "--", "agent", "common", "controller") else ""
            )
            print(
                f"controller CPU per api.vm.create: after = this tree ({head})"
                + ("" if args.no_before else f", before = {args.before}")
                + f"; {args.agents} agents on {NODE_FILE.name}, {args.creates} sequential creates,"
                f" controller --log-level {args.log_level}; {os.cpu_count()} CPUs,"
                f" load average {os.getloadavg()[0]:.1f}",
                flush=True,
            )
            runs: list[dict[str, Any]] = []
            for run in range(args.runs):
                with private_vhost("vfcreatecpu") as url:
                    rpc = raw_rpc(url, args.rpc_calls)
                    lv = libvirt_floor(args.libvirt_cycles)
                    sq = sqlite_floor(Path(tmp), args.sqlite_commits)
                    rec: dict[str, Any] = {
                        "rpc_p50_ms": statistics.median(rpc) * 1000,
                        "rpc_p99_ms": pct(rpc, 0.99) * 1000,
                        "libvirt_ms": statistics.median(lv) * 1000,
                        "sqlite_commit_ms": statistics.median(sq) * 1000,
                        "load": os.getloadavg()[0],
                        "trees": [],
                    }
                    print(
                        f"\n-- run {run + 1}/{args.runs}: floors: raw pika RPC p50 {rec['rpc_p50_ms']:.2f} ms"
                        f" (p99 {rec['rpc_p99_ms']:.2f}); libvirt define+start+destroy+undefine"
                        f" {rec['libvirt_ms']:.3f} ms/VM; SQLite WAL commit p50 {rec['sqlite_commit_ms']:.2f} ms;"
                        f" load {rec['load']:.1f}",
                        flush=True,
                    )
                    for label in order if run % 2 == 0 else order[::-1]:
                        with private_vhost("vfcreatecpu") as tree_url:
                            r = run_tree(label, trees[label], tree_url, args)
                        rec["trees"].append(r.__dict__)
                        print(line(r), flush=True)
                    runs.append(rec)
            if runs:
                summarize(runs, order, args.agents, args.creates)
            profiled = None
            if args.profile:
                label = args.profile_tree
                print(f"\n== profiled pass of {label}: py-spy --nonblocking at {args.profile_rate} Hz")
                with private_vhost("vfcreatecpu") as url:
                    profiled = run_tree(label, trees[label], url, args, profile=args.profile.resolve())
                print(line(profiled) + "  (under py-spy; not in the medians)")
                cpu_s = profiled.ctl_cpu_ms * profiled.creates / 1000
                for path, title in (
                    (gil_path(args.profile), "samples of the thread holding the GIL (Python CPU)"),
                    (args.profile, "samples of every thread not sleeping (CPU + disk waits + run queue)"),
                ):
                    print_profile(path, title, profiled.ctl_cpu_ms, cpu_s, args.profile_rate)
            if args.json:
                doc: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs}
                doc["profiled"] = profiled.__dict__ if profiled else None
                args.json.write_text(json.dumps(doc, indent=1))
    except KeyboardInterrupt:
        print("\ninterrupted; cleaned up", file=sys.stderr)
        return 130
    except BenchTimeout as exc:
        print(f"\n{exc}; cleaned up", file=sys.stderr)
        return 124
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    return 0


def git(*argv: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(ROOT), *argv], capture_output=True, text=True, timeout=30, check=False
    )
    return done.stdout.strip()


if __name__ == "__main__":
    raise SystemExit(main())
