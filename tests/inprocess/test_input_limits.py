"""Values out of range at the edge (issue 13, item 4): each is refused with exit 2 and an
InvalidRequest naming the field and its bound, and nothing is written (no VM record, no claim)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from inproc import HostShape, InProcessFleet, inprocess_fleet
from sqlalchemy import func, select

from controller.db.engine import make_engine
from controller.db.models import Allocation, Vm


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessFleet]:
    with inprocess_fleet(tmp_path_factory.mktemp("limits"), {"small": HostShape("small")}) as f:
        yield f


def rows_written(fleet: InProcessFleet) -> tuple[int, int]:
    """(VM rows, allocation rows) in the controller's database."""
    engine = make_engine(fleet.database_url)
    try:
        with engine.connect() as conn:
            vms = conn.execute(select(func.count()).select_from(Vm)).scalar_one()
            claims = conn.execute(select(func.count()).select_from(Allocation)).scalar_one()
    finally:
        engine.dispose()
    return vms, claims


@pytest.mark.parametrize(
    ("extra", "field", "bound"),
    [
        (("--memory", "99999999999999999999"), "body.memory_mib", "at most 16777216"),
        (("--memory", str(2**63)), "body.memory_mib", "at most 16777216"),
        (("--memory", "256", "--vcpus", "5000"), "body.vcpus", "at most 4096"),
        (("--memory", "256", "--idempotency-key", "k" * 129), "body.idempotency_key", "at most 128"),
        (("--memory", "256", "--idempotency-key", "k" * 10_000), "body.idempotency_key", "at most 128"),
        (("--memory", "256", "--cpuset", "0-99999999999"), "cpuset", "16383"),
    ],
)
def test_an_out_of_range_value_is_refused_naming_the_field_and_nothing_is_written(
    fleet: InProcessFleet, extra: tuple[str, ...], field: str, bound: str
) -> None:
    before = rows_written(fleet)
    done = fleet.cli("vm", "create", "big", "--disk", "1", *extra)
    assert done.code == 2, done.stdout + done.stderr
    error = done.json["error"]
    assert error["type"] == "InvalidRequest", error
    assert field in error["message"] and bound in error["message"], error["message"]
    assert "Traceback" not in done.stderr
    assert rows_written(fleet) == before


def test_a_cpuset_beyond_the_hosts_cpus_is_refused_before_any_record(fleet: InProcessFleet) -> None:
    cpus = fleet.cli_ok("host", "show", "small")["cpus"]
    before = rows_written(fleet)
    done = fleet.cli("vm", "create", "pinned", "--memory", "256", "--disk", "1", "--cpuset", f"0-{cpus}")
    assert done.code == 2, done.stdout + done.stderr
    error = done.json["error"]
    assert error["type"] == "InvalidRequest" and "cpuset" in error["message"], error
    assert rows_written(fleet) == before
    assert "pinned" not in {v["name"] for v in fleet.cli_ok("vm", "list", "--all")["vms"]}


def test_values_at_the_bounds_still_pass(fleet: InProcessFleet) -> None:
    cpus = fleet.cli_ok("host", "show", "small")["cpus"]
    created = fleet.cli_ok(
        "vm",
        "create",
        "edge",
        "--memory",
        "256",
        "--disk",
        "1",
        "--cpuset",
        f"0-{cpus - 1}",
        "--idempotency-key",
        "k" * 128,
    )
    assert created["vm"]["status"] == "active"
    fleet.cli_ok("vm", "delete", "edge", "--delete-disks")


def test_a_cpuset_only_a_disabled_host_has_is_refused_by_placement(tmp_path: Path) -> None:
    # The large host has the CPUs but is disabled: the small one lacks them, so no host can take
    # the VM, and the refusal says why for each (it used to be placed on the small host and
    # refused by its claim, as an InvalidRequest naming only that host). Nothing is written.
    hosts = {"small": HostShape("small"), "large": HostShape("large")}
    with inprocess_fleet(tmp_path, hosts) as f:
        small, large = (f.cli_ok("host", "show", h)["cpus"] for h in ("small", "large"))
        assert large > small
        f.cli_ok("host", "disable", "large")
        done = f.cli("vm", "create", "wide", "--memory", "256", "--disk", "1", "--cpuset", f"0-{large - 1}")
        assert done.code == 4, done.stdout + done.stderr
        error = done.json["error"]
        assert error["type"] == "NoValidHost", error
        assert {(r["host"], r["rule"]) for r in error["details"]["reasons"]} == {
            ("large", "disabled"),
            ("small", "cpuset"),
        }
        assert rows_written(f) == (0, 0)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("vm", "pin", "pinme", "--vcpu", "0", "--cpus", "0-99999999999"), "above the limit 16383"),
        (("vm", "pin", "pinme", "--vcpu", str(2**64), "--cpus", "0"), "body.vcpu: must be at most 4096"),
        (("host", "taskset", "small", str(2**63), "--cpus", "0"), "body.pid: must be at most 4194304"),
    ],
)
def test_pin_and_taskset_refuse_out_of_range_values(
    fleet: InProcessFleet, args: tuple[str, ...], fragment: str
) -> None:
    if not any(v["name"] == "pinme" for v in fleet.cli_ok("vm", "list", "--all")["vms"]):
        fleet.cli_ok("vm", "create", "pinme", "--memory", "256", "--disk", "1")
    before = rows_written(fleet)
    done = fleet.cli(*args)
    assert done.code == 2, done.stdout + done.stderr
    error = done.json["error"]
    assert error["type"] == "InvalidRequest" and fragment in error["message"], error
    assert rows_written(fleet) == before
