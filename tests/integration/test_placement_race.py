"""Two real controller processes against one database and broker: 200 concurrent creates on a
fleet that fits exactly 100 VMs. Exactly 100 succeed and no host exceeds its capacity.

Runs on SQLite here and again on PostgreSQL (marker ``db``, see deploy/test.sh)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from vfsupport import Fleet, node_uri, private_fleet

from common.errors import NoValidHost, VirtfleetError
from common.messages import api
from common.messages import placement as pmsg
from common.transport.amqp import AmqpTransport
from controller.cli.client import ApiClient

pytestmark = [pytest.mark.broker, pytest.mark.db]

HOSTS = ("small", "medium", "large")
# Memory capacity (total - 512 MiB reserved): 15872, 65024, 130560 MiB. At 2080 MiB a VM
# that is 7 + 31 + 62 = 100 VMs; vCPU (ratio 4) and disk have room for more.
VM_MEMORY_MIB = 2080
FITS = 100


@pytest.fixture
def two_controllers(tmp_path: Path) -> Iterator[Fleet]:
    with private_fleet(tmp_path) as fleet:
        fleet.start_controller("controller-a", down_after=30)
        fleet.start_controller("controller-b", down_after=30)
        for name in HOSTS:
            fleet.start_agent(name, node_uri(name), heartbeat=2.0)
        fleet.wait_hosts(set(HOSTS))
        fleet.wait_api_consumers(2, timeout=30)
        yield fleet


def test_200_concurrent_creates_on_a_fleet_for_100_give_exactly_100(two_controllers: Fleet) -> None:
    fleet = two_controllers
    # One transport for every thread: each thread gets its own connection, so the 40 clients
    # really do call at once.
    transport = AmqpTransport(fleet.amqp_url, "test-placement-race")
    client = ApiClient(transport, timeout=300)

    def create(i: int) -> str:
        body = api.VmCreate(name=f"race-{i:03d}", vcpus=1, memory_mib=VM_MEMORY_MIB, disk_gib=1)
        try:
            client.call(api.API_VM_CREATE, body)
        except NoValidHost:
            return "refused"
        except VirtfleetError as exc:
            return f"{type(exc).__name__}: {exc.message}"
        return "created"

    try:
        with ThreadPoolExecutor(max_workers=40) as pool:
            outcomes = Counter(pool.map(create, range(200)))
    finally:
        client.close()
    assert outcomes == Counter({"created": FITS, "refused": 200 - FITS}), fleet.logs()

    checker = ApiClient(AmqpTransport(fleet.amqp_url, "test-placement-check"))
    try:
        report = checker.call(pmsg.API_HOST_CAPACITY, pmsg.CapacityRequest())
        per_host = {}
        for h in report.hosts:
            for r in h.resources:
                assert r.used <= r.capacity, f"{h.host} {r.resource} over capacity: {r}"
            per_host[h.host] = {r.resource: r.used for r in h.resources}["MEMORY_MIB"] // VM_MEMORY_MIB
        assert per_host == {"small": 7, "medium": 31, "large": 62}
        vms = checker.call(api.API_VM_LIST, api.VmListRequest()).vms
        assert len(vms) == FITS
        assert all(v.status == "active" for v in vms)
    finally:
        checker.close()
