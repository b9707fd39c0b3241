"""Chaos scenarios against a live fleet: what each fault does to a create load, counted from outside.

Run as root from the repository root (needs RabbitMQ on 127.0.0.1:5672 and rabbitmqctl; the broker
scenarios start a private RabbitMQ node of their own on a loopback port and never touch the shared
one)::

    .venv/bin/python bench/chaos.py --list
    .venv/bin/python bench/chaos.py [--scenario NAME ...] [--creates N]

Per scenario it prints the commands sent / completed / duplicated / lost (tests/chaoskit.py's
audit: what each client was told against what the controller and the agents' reports show), the
errors by type, the requests not answered, and the time to recover: seconds from the end of the
fault until the first create answered ok afterwards. Each scenario is bounded (every wait has a
timeout) and self-cleaning (its processes, vhost, database and broker node are removed at its end,
also when it fails).

A scenario is one function taking a :class:`Run` and returning a :class:`Result`, listed once in
:data:`SCENARIOS`: the controller-crash, database-restart and broker-node-loss ones are added the
same way.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from chaoskit import (  # noqa: E402
    OK,
    Audit,
    DeadLetterTap,
    Load,
    RabbitNode,
    audit,
    create_body,
    first_ok_after,
    fleet_serves,
    freeze,
    frozen,
    kill9,
    names,
    private_rabbit,
    publish_raw,
    queue_messages,
    set_aside,
    settled_view,
    start_creates,
    thaw,
)
from pgserver import private_postgres  # noqa: E402
from vfsupport import (  # noqa: E402
    SHORT_DOWN_AFTER_S,
    Fleet,
    fresh_database,
    node_uri,
    private_fleet,
    private_vhost,
    wait_until,
)

from common.transport.topology import API_EXCHANGE, API_QUEUE, REPORTS_EXCHANGE, agent_queue  # noqa: E402


@dataclass(frozen=True)
class Run:
    """What a scenario is given: a scratch directory (removed afterwards) and the load size."""

    work: Path
    creates: int


@dataclass(frozen=True)
class Result:
    audit: Audit
    #: seconds from the end of the fault to the first create answered ok (None: none was)
    recover_s: float | None
    note: str = ""


@dataclass(frozen=True)
class Scenario:
    name: str
    run: Callable[[Run], Result]
    doc: str


def _recovered_by_probe(fleet: Fleet, since: float, host: str | None = None) -> float | None:
    """Seconds from ``since`` (monotonic) until a fresh create is answered ok (one try, bounded)."""
    probe = fleet_serves(fleet.amqp_url, names("probe", 1)[0], host=host, timeout=120)
    return time.monotonic() - since if probe.result == OK else None


# ------------------------------------------------------------------ scenarios


def agent_kill(run: Run) -> Result:
    """An agent frozen with creates in flight, killed (-9) and restarted 2 s later."""
    with private_fleet(run.work) as fleet:
        fleet.start_controller(down_after=SHORT_DOWN_AFTER_S)
        agent = fleet.start_agent("victim", node_uri("medium"))
        fleet.start_agent("spare", node_uri("large"))
        fleet.wait_hosts({"victim", "spare"})
        freeze(agent)
        load = start_creates(
            fleet.amqp_url, [create_body(n, host="victim") for n in names("kill", run.creates)]
        )
        wait_until(
            lambda: queue_messages(fleet.amqp_url, agent_queue("victim").name) >= run.creates,
            60,
            "the commands in flight",
        )
        kill9(agent)
        set_aside(fleet, agent)
        time.sleep(2.0)
        fleet.start_agent("victim", node_uri("medium"))
        back = time.monotonic()
        outcomes = load.wait(240)
        recover = first_ok_after(outcomes, back - load.started)
        return Result(audit(outcomes, settled_view(fleet.amqp_url)), recover)


@contextlib.contextmanager
def _private_broker_fleet(run: Run) -> Iterator[tuple[Fleet, RabbitNode]]:
    """A controller and two agents on a private RabbitMQ node (never the shared one)."""
    with (
        private_rabbit(run.work / "rabbit") as node,
        fresh_database(run.work) as db,
        Fleet(run.work, node.url, db) as fleet,
    ):
        fleet.start_controller(down_after=30)
        for host in ("small", "medium"):
            fleet.start_agent(host, node_uri(host))
        fleet.wait_hosts({"small", "medium"})
        yield fleet, node


def _after_node_restart(fleet: Fleet, load: Load, took: float) -> Result:
    """The audit of a broker scenario whose node came back ``took`` s after it was stopped."""
    back = time.monotonic()
    outcomes = load.wait(240)
    fleet.wait_hosts({"small", "medium"}, timeout=60)
    recover = first_ok_after(outcomes, back - load.started) or _recovered_by_probe(fleet, back)
    return Result(audit(outcomes, settled_view(fleet.amqp_url)), recover, f"node down and up in {took:.1f} s")


def broker_restart(run: Run) -> Result:
    """The (private) broker node stopped and started again in the middle of a spaced create load."""
    with _private_broker_fleet(run) as (fleet, node):
        bodies = [create_body(n) for n in names("brk", run.creates)]
        load = start_creates(fleet.amqp_url, bodies, client_timeout=60, spacing_s=0.5)
        time.sleep(2.0)
        took = node.restart()
        return _after_node_restart(fleet, load, took)


def broker_restart_waiting(run: Run) -> Result:
    """The broker node restarted while the controller waits on a frozen agent for every create."""
    with _private_broker_fleet(run) as (fleet, node):
        agent = next(p for p in fleet.procs if p.name == "agent-small")
        bodies = [create_body(n, host="small") for n in names("brkw", run.creates)]
        with frozen(agent):
            load = start_creates(fleet.amqp_url, bodies, client_timeout=60)
            wait_until(
                lambda: node.queue_messages(agent_queue("small").name) >= len(bodies),
                60,
                "the commands queued for the frozen agent",
            )
            took = node.restart()
        return _after_node_restart(fleet, load, took)


def wedged_agent(run: Run) -> Result:
    """An agent SIGSTOPped with creates sent to it (HostDown expected), continued afterwards."""
    with private_fleet(run.work) as fleet:
        fleet.start_controller(down_after=SHORT_DOWN_AFTER_S)
        agent = fleet.start_agent("wedged", node_uri("medium"))
        fleet.start_agent("spare", node_uri("large"))
        fleet.wait_hosts({"wedged", "spare"})
        with frozen(agent):
            load = start_creates(
                fleet.amqp_url,
                [create_body(n, host="wedged") for n in names("wedge", run.creates)],
                client_timeout=120,
            )
            outcomes = load.wait(240)
        thaw(agent)
        back = time.monotonic()
        fleet.wait_hosts({"wedged"}, timeout=60)
        recover = _recovered_by_probe(fleet, back, host="wedged")
        slowest = max(o.at for o in outcomes)
        return Result(
            audit(outcomes, settled_view(fleet.amqp_url)),
            recover,
            f"last answer {slowest:.1f} s after its request (down_after {SHORT_DOWN_AFTER_S:g} s)",
        )


def malformed(run: Run) -> Result:
    """Garbage and an oversize message on the API queue, garbage on the reports queue, then creates."""
    with private_fleet(run.work) as fleet:
        fleet.start_controller()
        fleet.start_agent("small", node_uri("small"))
        fleet.start_agent("medium", node_uri("medium"))
        fleet.wait_hosts({"small", "medium"})
        garbage = [b"\xc1 not msgpack " + n.encode() for n in names("junk", 3)]
        oversize = [b"\x00" * (16 * 1024 * 1024 + 1)]
        tap = DeadLetterTap(fleet.amqp_url)
        try:
            publish_raw(fleet.amqp_url, API_EXCHANGE.name, API_QUEUE.name, [*garbage, *oversize])
            publish_raw(fleet.amqp_url, REPORTS_EXCHANGE.name, "host.report.small", garbage)
            tap.wait_for([*garbage, *oversize])
            dead = len(tap.seen)
        finally:
            tap.close()
        after = time.monotonic()
        load = start_creates(fleet.amqp_url, [create_body(n) for n in names("after", run.creates)])
        outcomes = load.wait(240)
        recover = first_ok_after(outcomes, after - load.started)
        return Result(
            audit(outcomes, settled_view(fleet.amqp_url)), recover, f"{dead} messages dead-lettered"
        )


def controller_kill(run: Run) -> Result:
    """The controller killed (-9) while every create waits on a (frozen) agent, another started at once."""
    config = run.work / "controller.toml"
    # A dead controller's work is taken over 3 s after its last liveness heartbeat.
    config.write_text(
        "instance_heartbeat_s = 1.0\ninstance_expiry_s = 3.0\nlease_ttl_s = 3.0\nrecovery_interval_s = 1.0\n"
    )
    with private_fleet(run.work) as fleet:
        controller = fleet.start_controller("controller", "--config", str(config))
        agents = [fleet.start_agent(h, node_uri(h)) for h in ("medium", "large")]
        fleet.wait_hosts({"medium", "large"})
        for agent in agents:
            freeze(agent)
        try:
            load = start_creates(fleet.amqp_url, [create_body(n) for n in names("ctl", run.creates)])
            wait_until(
                lambda: (
                    sum(queue_messages(fleet.amqp_url, agent_queue(h).name) for h in ("medium", "large"))
                    >= run.creates
                ),
                60,
                "every create's command queued for its frozen agent",
            )
            kill9(controller)
            set_aside(fleet, controller)
        finally:
            for agent in agents:
                thaw(agent)
        fleet.start_controller("controller", "--config", str(config))
        back = time.monotonic()
        outcomes = load.wait(240)
        recover = first_ok_after(outcomes, back - load.started) or _recovered_by_probe(fleet, back)
        return Result(audit(outcomes, settled_view(fleet.amqp_url)), recover, "restarted at once")


def database_restart(run: Run) -> Result:
    """A private PostgreSQL restarted (pg_ctl -m fast: every session cut) under a create load on two controllers."""
    with (
        private_postgres() as postgres,
        private_vhost() as url,
        Fleet(run.work, url, postgres.url) as fleet,
    ):
        fleet.start_controller("controller-a", down_after=60)
        fleet.start_controller("controller-b", down_after=60)
        for host in ("small", "medium", "large"):
            fleet.start_agent(host, node_uri(host), heartbeat=2.0)
        fleet.wait_hosts({"small", "medium", "large"}, timeout=120)
        load = start_creates(
            fleet.amqp_url, [create_body(n) for n in names("pgr", run.creates)], spacing_s=0.1
        )
        time.sleep(1.0)
        started = time.monotonic()
        postgres.restart()
        back = time.monotonic()
        outcomes = load.wait(240)
        recover = first_ok_after(outcomes, back - load.started) or _recovered_by_probe(fleet, back)
        return Result(
            audit(outcomes, settled_view(fleet.amqp_url)),
            recover,
            f"server down and up in {back - started:.1f} s",
        )


def controllers_race(run: Run) -> Result:
    """Two controllers on one database (VIRTFLEET_DATABASE_URL: PostgreSQL), creates for twice the room."""
    with private_fleet(run.work) as fleet:
        fleet.start_controller("controller-a", down_after=30)
        fleet.start_controller("controller-b", down_after=30)
        fleet.start_agent("small", node_uri("small"), heartbeat=2.0)
        fleet.wait_hosts({"small"})
        fleet.wait_api_consumers(2, timeout=60)
        room = 15872 // 2048  # small.xml's memory at ratio 1.0 less 512 MiB reserved, 2 GiB VMs
        bodies = [create_body(n, memory_mib=2048) for n in names("race", max(run.creates, 2 * room))]
        outcomes = start_creates(fleet.amqp_url, bodies, workers=len(bodies)).wait(240)
        return Result(audit(outcomes, settled_view(fleet.amqp_url)), 0.0, f"room for {room}")


SCENARIOS: tuple[Scenario, ...] = tuple(
    Scenario(f.__name__.replace("_", "-"), f, (f.__doc__ or "").strip())
    for f in (
        agent_kill,
        broker_restart,
        broker_restart_waiting,
        wedged_agent,
        malformed,
        controllers_race,
        controller_kill,
        database_restart,
    )
)


# ------------------------------------------------------------------ main


def report(name: str, result: Result, took: float) -> None:
    a = result.audit
    errors = ", ".join(f"{k} {v}" for k, v in sorted(a.errors.items())) or "none"
    unanswered = ", ".join(f"{k} {v}" for k, v in sorted(a.unanswered.items())) or "none"
    recover = "never" if result.recover_s is None else f"{result.recover_s:.1f} s"
    print(f"{name}: sent {a.sent}  completed {a.completed}  duplicated {a.duplicated}  lost {a.lost}")
    print(f"    errors by type: {errors}; not answered: {unanswered}")
    print(
        f"    stuck building {len(a.stuck)}, past capacity {len(a.over_capacity)}, "
        f"leaked MiB {sum(a.leaked_mib.values())}; recovered in {recover}; scenario took {took:.0f} s"
    )
    for line in [result.note, *a.notes, *a.drift]:
        if line:
            print(f"    {line}")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    parser.add_argument("--scenario", action="append", metavar="NAME", help="run only NAME (repeatable)")
    parser.add_argument("--creates", type=int, default=8, help="creates per scenario (default 8)")
    args = parser.parse_args()
    # The clients' reconnect warnings during a fault would drown the figures (the fleet's own
    # logs are kept in each scenario's directory while it runs).
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("pika").setLevel(logging.CRITICAL)
    known = {s.name: s for s in SCENARIOS}
    if args.list:
        for s in SCENARIOS:
            print(f"{s.name:24} {s.doc}")
        return 0
    unknown = sorted(set(args.scenario or ()) - set(known))
    if unknown or args.creates < 1:
        parser.error(
            f"unknown scenario {unknown} (see --list)" if unknown else "--creates must be at least 1"
        )
    failed = 0
    for name in args.scenario or list(known):
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix=f"vfchaos-{name}-") as tmp:
            try:
                result = known[name].run(Run(Path(tmp), args.creates))
            except Exception:  # one scenario's failure must not hide the others' figures
                failed += 1
                print(f"{name}: FAILED after {time.monotonic() - started:.0f} s\n{traceback.format_exc()}")
                continue
        report(name, result, time.monotonic() - started)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
