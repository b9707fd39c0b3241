"""PostgreSQL restarted while creates run (issue 13, item 6 and the table's PostgreSQL row).

Two real controller processes and three simulated hosts (libvirt's test driver) on a private
PostgreSQL server, which is restarted (``pg_ctl restart -m fast``: every session terminated, as a
failover or an operator's restart does) while 40 creates run. Every client must get its VM or a
retryable typed error; no VM may stay ``building``; no claim may be lost or made twice; and the
controllers must go on serving without being restarted.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import sqlalchemy as sa
from pgserver import PostgresServer, private_postgres, server_bin
from vfsupport import Fleet, free_port, node_uri, private_vhost, wait_until

from common.errors import VirtfleetError
from common.messages import api
from common.messages.vm import Lifecycle
from common.transport.amqp import AmqpTransport
from controller.cli.client import ApiClient
from controller.db.engine import make_engine, migrate

pytestmark = [
    pytest.mark.chaos,
    pytest.mark.broker,
    pytest.mark.skipif(
        server_bin() is None,
        reason="PostgreSQL's server binaries (initdb, pg_ctl) are not installed: the restart of a PostgreSQL under a create load and the multi-host URL went untested",
    ),
]

HOSTS = ("small", "medium", "large")
CREATES = 40
VM_MEMORY_MIB = 256
#: every wait's bound: a hang fails the test instead of stalling CI
BOUND_S = 120.0


@pytest.fixture
def postgres() -> Iterator[PostgresServer]:
    with private_postgres() as server:
        yield server


@pytest.fixture
def fleet(tmp_path: Path, postgres: PostgresServer) -> Iterator[Fleet]:
    with private_vhost() as url, Fleet(tmp_path, url, postgres.url) as f:
        f.start_controller("controller-a", down_after=60)
        f.start_controller("controller-b", down_after=60)
        for name in HOSTS:
            f.start_agent(name, node_uri(name), heartbeat=2.0)
        f.wait_hosts(set(HOSTS), timeout=BOUND_S)
        f.wait_api_consumers(2, timeout=60)
        yield f


def test_a_database_restart_during_40_creates_loses_nothing_and_leaves_nothing_stuck(
    fleet: Fleet, postgres: PostgresServer
) -> None:
    transport = AmqpTransport(fleet.amqp_url, "test-database-restart")
    client = ApiClient(transport, timeout=BOUND_S)
    answered = threading.Semaphore(0)

    def create(i: int) -> str:
        body = api.VmCreate(name=f"pgr-{i:02d}", vcpus=1, memory_mib=VM_MEMORY_MIB, disk_gib=1)
        try:
            made = client.call(api.API_VM_CREATE, body)
            assert made.vm is not None
            return f"ok:{made.vm.status.value}"
        except VirtfleetError as exc:
            return f"{type(exc).__name__}:{'retryable' if exc.retryable else 'final'}"
        finally:
            answered.release()

    try:
        with ThreadPoolExecutor(max_workers=20) as pool:
            futures = [pool.submit(create, i) for i in range(CREATES)]
            for _ in range(5):  # restart once the load is well under way
                assert answered.acquire(timeout=BOUND_S), "no create answered before the restart"
            postgres.restart()
            outcomes = [f.result(timeout=BOUND_S) for f in futures]
    finally:
        transport.close()

    # Every client got its VM, or a typed error it may retry (nothing was done for it).
    wrong = [o for o in outcomes if o != "ok:active" and not o.endswith(":retryable")]
    assert not wrong, (outcomes, fleet.logs())
    made = {f"pgr-{i:02d}" for i, o in enumerate(outcomes) if o == "ok:active"}

    # Nothing stuck: no VM stays building; the controllers answer without a restart.
    def settled() -> list[dict[str, object]] | None:
        vms = fleet.cli_ok("vm", "list", "--all")["vms"]
        return None if any(v["status"] == Lifecycle.BUILDING.value for v in vms) else vms

    vms = wait_until(settled, 60, "no VM building")
    by_name = {str(v["name"]): v for v in vms}
    # Each VM whose client was told it is made exists, active, once; no other VM is active
    # (a retryable error means nothing was made for that request).
    assert made <= set(by_name), (made - set(by_name), outcomes)
    assert {n for n, v in by_name.items() if v["status"] == Lifecycle.ACTIVE.value} == made, (
        by_name,
        outcomes,
    )
    # No claim lost or made twice: each host's used memory is its VMs' memory, exactly.
    for host in HOSTS:
        on_host = [v for v in vms if v["host"] == host]
        assert fleet.used(host)["MEMORY_MIB"] == VM_MEMORY_MIB * len(on_host), (host, on_host)
    # And the fleet still takes a create.
    assert (
        fleet.cli_ok("vm", "create", "after-restart", "--memory", "256", "--disk", "1")["vm"]["status"]
        == "active"
    )
    assert len(made) >= CREATES // 2, outcomes  # most got through: the retries did their job


def test_a_multi_host_database_url_reaches_the_server_that_takes_writes(postgres: PostgresServer) -> None:
    """docs/operations.md's PostgreSQL HA: libpq's host list with target_session_attrs=read-write,
    the first host dead (a lost primary), the second alive."""
    dead = free_port()
    url = (
        f"postgresql://postgres@/virtfleet?host=127.0.0.1:{dead}&host=127.0.0.1:{postgres.port}"
        "&target_session_attrs=read-write"
    )
    engine = make_engine(url)
    try:
        migrate(engine)
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT inet_server_port()")).scalar() == postgres.port
            assert conn.execute(sa.text("SELECT count(*) FROM hosts")).scalar() == 0
    finally:
        engine.dispose()
