"""The issue 13 table's input rows against a live fleet (real controller and agent processes, the
real broker, the ``virtfleet`` CLI as operators run it), on SQLite and, in the PostgreSQL pass,
on PostgreSQL: each bad value is exit 2 with an ``InvalidRequest`` naming the field and its bound,
nothing is written, and the controller logs no crash. tests/inprocess/test_input_limits.py checks
every bound in-process; this is the same refusal through the processes and the wire."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from vfsupport import Fleet, node_uri, private_fleet

pytestmark = [pytest.mark.chaos, pytest.mark.broker, pytest.mark.db]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    with private_fleet(tmp_path_factory.mktemp("limits-live")) as f:
        f.start_controller()
        f.start_agent("small", node_uri("small"))
        f.wait_hosts({"small"})
        yield f


@pytest.mark.parametrize(
    ("extra", "field", "bound"),
    [
        (("--memory", "99999999999999999999"), "memory_mib", "at most 16777216"),
        (("--memory", "256", "--cpuset", "0-99999999999"), "cpuset", "16383"),
        (("--memory", "256", "--cpuset", "0-64"), "cpuset", "CPUs 0-7"),  # small.xml has 8
        (("--memory", "256", "--idempotency-key", "k" * 129), "idempotency_key", "at most 128"),
        (("--memory", "256", "--idempotency-key", "k" * 10_000), "idempotency_key", "at most 128"),
    ],
    ids=["memory-2^66", "cpuset-huge", "cpuset-beyond-host", "key-129", "key-10000"],
)
def test_a_bad_value_is_exit_2_naming_the_field_and_changes_nothing(
    fleet: Fleet, extra: tuple[str, ...], field: str, bound: str
) -> None:
    done = fleet.cli("vm", "create", "limits", "--disk", "1", *extra)
    assert done.code == 2, done.stdout + done.stderr
    error = done.json["error"]
    assert error["type"] == "InvalidRequest", error
    assert field in error["message"] and bound in error["message"], error["message"]
    assert "Traceback" not in done.stderr
    assert fleet.cli_ok("vm", "list", "--all")["vms"] == []  # no record, not even an error one
    assert fleet.used("small").get("MEMORY_MIB", 0) == 0  # no claim
    log = "\n".join(p.log(tail=400) for p in fleet.procs if p.name == "controller")
    assert "crashed (bug)" not in log and "InternalError" not in log, log
