"""Losing a RabbitMQ node (issue 13, item 5): a 3-node cluster on loopback, quorum queues, a
controller and two simulated agents given all three URLs. During a load of creates, the node that
leads the API queue is killed (kill -9). Every request ends with its VM created once, and the API
answers again within seconds (the figure is printed).

The cluster (tests/rabbitcluster.py) starts once per module (about 30 s on a loaded 2-core box)
and every node is killed and its data removed at the end, also on failure.
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from rabbitcluster import RabbitCluster, rabbit_cluster
from vfsupport import Fleet, fresh_database, node_uri

from common.errors import AlreadyExists, VirtfleetError
from common.messages import api
from common.transport.amqp import AmqpTransport
from common.transport.topology import API_QUEUE
from controller.cli.client import ApiClient

pytestmark = [pytest.mark.chaos, pytest.mark.broker, pytest.mark.db]

HOSTS = ("small", "medium")
CREATES = 40
#: Creates done before the leader is killed (the rest are in flight or still to come).
KILL_AFTER = 10
#: How long a client goes on retrying a request that failed with a retryable error.
RETRY_FOR_S = 90.0


@pytest.fixture(scope="module")
def cluster() -> Iterator[RabbitCluster]:
    with rabbit_cluster(3) as started:
        yield started


@pytest.fixture
def fleet(cluster: RabbitCluster, tmp_path: Path) -> Iterator[Fleet]:
    with fresh_database(tmp_path) as db, Fleet(tmp_path, cluster.urls(), db) as running:
        running.start_controller()
        for host in HOSTS:
            running.start_agent(host, node_uri(host), heartbeat=1.0)
        running.wait_hosts(set(HOSTS), timeout=90)
        yield running


class Load:
    """``CREATES`` creates from 8 threads, each retried (same idempotency key) while it fails
    with a retryable error, as a careful client does."""

    def __init__(self, urls: str) -> None:
        self.transport = AmqpTransport(urls, "chaos-load")
        self.client = ApiClient(self.transport, timeout=60)
        self.done = 0
        self.retries: Counter[str] = Counter()
        self._lock = threading.Lock()
        self.enough = threading.Event()

    def create(self, i: int) -> str:
        body = api.VmCreate(
            name=f"ha-{i:03d}", vcpus=1, memory_mib=128, disk_gib=1, idempotency_key=f"ha-key-{i:03d}"
        )
        deadline = time.monotonic() + RETRY_FOR_S
        while True:
            try:
                self.client.call(api.API_VM_CREATE, body)
            except AlreadyExists:
                return "redelivered: AlreadyExists"
            except VirtfleetError as exc:
                if exc.retryable and time.monotonic() < deadline:
                    with self._lock:
                        self.retries[type(exc).__name__] += 1
                    time.sleep(0.5)
                    continue
                return f"{type(exc).__name__}: {exc.message}"
            with self._lock:
                self.done += 1
                if self.done >= KILL_AFTER:
                    self.enough.set()
            return "created"

    def close(self) -> None:
        self.client.close()


def _first_answer_after(urls: str, since: float) -> float:
    """Seconds from ``since`` until an API ping is answered (a fresh client, as an operator's);
    the test fails when none is within ``RETRY_FOR_S``."""
    transport = AmqpTransport(urls, "chaos-ping")
    client = ApiClient(transport, timeout=2)
    errors: Counter[str] = Counter()
    try:
        while time.monotonic() - since < RETRY_FOR_S:
            try:
                client.call(api.API_PING, api.Empty())
            except VirtfleetError as exc:
                errors[type(exc).__name__] += 1
                time.sleep(0.1)
                continue
            return time.monotonic() - since
    finally:
        client.close()
    raise AssertionError(f"no API answer within {RETRY_FOR_S} s of the kill; errors: {dict(errors)}")


def test_killing_the_node_that_leads_the_api_queue_loses_no_request(
    cluster: RabbitCluster, fleet: Fleet
) -> None:
    leader = cluster.leader(API_QUEUE.name)
    load = Load(cluster.urls())
    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            outcomes = pool.map(load.create, range(CREATES))
            assert load.enough.wait(120), "the creates before the kill never completed"
            killed_at = time.monotonic()
            cluster.kill(leader)
            back_after = _first_answer_after(cluster.urls(), killed_at)
            results = Counter(outcomes)
    finally:
        load.close()
    survivor = next(n for n in cluster.nodes if n.alive())
    new_leader = cluster.leader(API_QUEUE.name, via=survivor)
    print(
        f"\nkilled {leader.name} (leader of {API_QUEUE.name}); API answered again after {back_after:.1f} s; "
        f"new leader {new_leader.name}; retries by error: {dict(load.retries)}; outcomes: {dict(results)}"
    )
    assert new_leader is not leader

    # Every request is answered with its VM: a request redelivered to the controller after the kill
    # is answered by the request journal with the VM the first delivery made, never AlreadyExists
    # (before the journal: 2 runs in 14); no error a client could not retry.
    assert set(results) == {"created"}, (results, fleet.logs())
    checker = ApiClient(AmqpTransport(cluster.urls(), "chaos-check"), timeout=60)
    try:
        deadline = time.monotonic() + 60
        while True:
            vms = checker.call(api.API_VM_LIST, api.VmListRequest()).vms
            others = {v.name: (v.status, v.host) for v in vms if v.status != "active"}
            if not others or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    finally:
        checker.close()
    assert not others, f"VMs not active 60 s after the load: {others}\n{fleet.logs()}"
    # 0 lost: every request got its VM; 0 done twice: each VM exists once and was claimed once.
    names = Counter(v.name for v in vms)
    assert names == Counter({f"ha-{i:03d}": 1 for i in range(CREATES)})
    used = sum(fleet.used(host)["MEMORY_MIB"] for host in HOSTS)
    assert used == CREATES * 128
    # ... and each was defined by one agent, once (a redelivered command is answered from the
    # agent's journal, not run again).
    defined = Counter(
        match.group(1)
        for proc in fleet.procs
        if proc.name.startswith("agent-")
        for match in re.finditer(r"defined VM (ha-\d+) ", proc.log_path.read_text())
    )
    assert defined == names
