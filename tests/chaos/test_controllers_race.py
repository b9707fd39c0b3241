"""Two controller processes racing creates on one database (issue 13, a row that already holds):
a SQLite file here, and a PostgreSQL database in deploy/test.sh's PostgreSQL pass (marker ``db``).
The same name asked of both at once is created once; creates past the host's capacity are refused,
never placed; nothing is lost (tests/integration/test_placement_race.py checks the counts of 200
creates on three hosts; this audits the fleet from outside after a race on one small host)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from chaoskit import OK, audit, create_body, names, run_creates, settled_view
from vfsupport import Fleet, node_uri, private_fleet

pytestmark = [pytest.mark.chaos, pytest.mark.broker, pytest.mark.db]

#: small.xml: 16384 MiB - 512 reserved = 15872 MiB at ratio 1.0
CAPACITY_MIB = 15872
PAIRS, PAIR_MIB = 4, 512
RACE, RACE_MIB = 14, 2048
FITS = (CAPACITY_MIB - PAIRS * PAIR_MIB) // RACE_MIB  # 6


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    with private_fleet(tmp_path) as f:
        f.start_controller("controller-a", down_after=30)
        f.start_controller("controller-b", down_after=30)
        f.start_agent("small", node_uri("small"), heartbeat=2.0)
        f.wait_hosts({"small"})
        f.wait_api_consumers(2, timeout=60)
        yield f


def test_two_controllers_racing_never_pass_capacity_nor_create_a_name_twice(fleet: Fleet) -> None:
    pair_names = names("pair", PAIRS)
    pairs = run_creates(
        fleet.amqp_url, [create_body(n, PAIR_MIB) for n in pair_names for _ in range(2)], workers=2 * PAIRS
    )
    by_name: dict[str, Counter[str]] = {}
    for out in pairs:
        by_name.setdefault(out.name, Counter())[out.result] += 1
    print(f"same name asked twice at once, {PAIRS} names: {by_name}")
    assert all(c == Counter({OK: 1, "AlreadyExists": 1}) for c in by_name.values()), by_name

    outcomes = run_creates(
        fleet.amqp_url, [create_body(n, RACE_MIB) for n in names("race", RACE)], workers=RACE
    )
    view = settled_view(fleet.amqp_url)
    report = audit(outcomes, view)
    print(f"two controllers, {RACE} creates for room for {FITS}: {report.summary()}")
    assert report.clean, report.explain() + fleet.logs()
    assert (report.completed, report.errors) == (FITS, {"NoValidHost": RACE - FITS}), report.explain()
    records = view.by_name()
    assert all(len(records[n]) == 1 for n in pair_names)
    assert len(view.vms) == PAIRS + FITS
