"""A database error in a request is answered as a typed error, on SQLite and PostgreSQL: never an
InternalError carrying SQL text (issue 13, item 4); a transient one is first retried, and a claim
whose COMMIT went through unseen is found, not written twice (issue 13, item 6)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from inproc import HostShape, InProcessFleet, database_is_postgres, inprocess_fleet
from sqlalchemy import Engine, event
from sqlalchemy import exc as sa

from common.errors import InvalidRequest
from common.messages.api import VmCreate
from controller.db import repository as repo

RETRY_S = 1.0


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessFleet]:
    # Transient failures are retried for RETRY_S before the client hears of them.
    with inprocess_fleet(
        tmp_path_factory.mktemp("dberrors"), {"small": HostShape("small")}, db_retry_s=RETRY_S
    ) as f:
        yield f


def controller_engine(fleet: InProcessFleet) -> Engine:
    assert fleet.controller is not None
    return fleet.controller.engine


class ConnectionKilled:
    """Makes every INSERT into ``vms`` (the first ``times`` only, when given) fail as a connection
    the server terminated would."""

    def __init__(self, engine: Engine, times: int | None = None) -> None:
        self.engine = engine
        self.refused = 0
        self.times = times

    def __enter__(self) -> ConnectionKilled:
        event.listen(self.engine, "before_cursor_execute", self._refuse)
        return self

    def __exit__(self, *_exc: object) -> None:
        event.remove(self.engine, "before_cursor_execute", self._refuse)

    def _refuse(self, _conn: Any, _cursor: Any, statement: str, parameters: Any, *_rest: Any) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO VMS") and (
            self.times is None or self.refused < self.times
        ):
            self.refused += 1
            raise sa.OperationalError(statement, parameters, Exception("terminating connection (injected)"))


def test_a_lost_connection_is_a_retryable_store_unavailable_and_nothing_is_written(
    fleet: InProcessFleet,
) -> None:
    with ConnectionKilled(controller_engine(fleet)) as killed:
        done = fleet.cli("vm", "create", "lost", "--memory", "256", "--disk", "1")
    assert killed.refused >= 2  # retried for RETRY_S first
    assert done.code == 5, done.stdout + done.stderr
    error = done.json["error"]
    assert error["type"] == "StoreUnavailable" and error["retryable"] is True, error
    assert "INSERT" not in error["message"] and "injected" not in error["message"]
    assert fleet.cli_ok("vm", "list", "--all")["vms"] == []
    # and the host's capacity is whole again: the same create goes through now
    assert fleet.cli_ok("vm", "create", "lost", "--memory", "256", "--disk", "1")["vm"]["status"] == "active"
    fleet.cli_ok("vm", "delete", "lost", "--delete-disks")


class CommitAnswerLost:
    """The first COMMIT of a transaction that inserted into ``vms`` goes through, and then its
    connection "dies" before the answer: the outcome a client of the database cannot see."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.lost = 0
        self._inserted: set[int] = set()

    def __enter__(self) -> CommitAnswerLost:
        event.listen(self.engine, "before_cursor_execute", self._note)
        event.listen(self.engine, "commit", self._commit_then_fail)
        return self

    def __exit__(self, *_exc: object) -> None:
        event.remove(self.engine, "before_cursor_execute", self._note)
        event.remove(self.engine, "commit", self._commit_then_fail)

    def _note(self, conn: Any, _cursor: Any, statement: str, *_rest: Any) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO VMS"):
            self._inserted.add(id(conn))

    def _commit_then_fail(self, conn: Any) -> None:
        if id(conn) not in self._inserted:
            return
        self._inserted.discard(id(conn))
        if self.lost:
            return
        self.lost += 1
        conn.connection.dbapi_connection.commit()
        raise sa.OperationalError(
            "COMMIT", {}, Exception("server closed the connection unexpectedly (injected)")
        )


@pytest.mark.parametrize("forced", [False, True], ids=["batched", "alone"])
def test_a_transient_failure_of_the_claim_is_retried_and_the_vm_made_once(
    fleet: InProcessFleet, forced: bool
) -> None:
    where = ["--host", "small"] if forced else []
    with ConnectionKilled(controller_engine(fleet), times=2) as killed:
        made = fleet.cli_ok("vm", "create", "again", "--memory", "256", "--disk", "1", *where)
    assert killed.refused == 2
    assert made["vm"]["status"] == "active" and made["vm"]["host"] == "small"
    assert [v["name"] for v in fleet.cli_ok("vm", "list", "--all")["vms"]] == ["again"]
    fleet.cli_ok("vm", "delete", "again", "--delete-disks")


@pytest.mark.parametrize("forced", [False, True], ids=["batched", "alone"])
def test_a_claim_committed_unseen_is_found_not_claimed_twice(fleet: InProcessFleet, forced: bool) -> None:
    assert fleet.controller is not None
    where = ["--host", "small"] if forced else []
    with CommitAnswerLost(controller_engine(fleet)) as lost:
        made = fleet.cli_ok("vm", "create", "unseen", "--memory", "256", "--disk", "1", *where)
    assert lost.lost == 1
    assert made["vm"]["status"] == "active", made
    assert [v["name"] for v in fleet.cli_ok("vm", "list", "--all")["vms"]] == ["unseen"]
    with fleet.controller.service.tx() as s:
        vm = repo.get_vm(s, "unseen")
        assert repo.allocations_of(s, vm.uuid)["MEMORY_MIB"] == 256
        assert repo.host_usage(s, "small")["MEMORY_MIB"] == 256  # claimed once
    fleet.cli_ok("vm", "delete", "unseen", "--delete-disks")
    with fleet.controller.service.tx() as s:
        assert repo.host_usage(s, "small") == {}  # and released whole


@pytest.mark.skipif(not database_is_postgres(), reason="SQLite enforces no VARCHAR length")
def test_a_value_longer_than_its_column_is_an_invalid_request_on_postgresql(fleet: InProcessFleet) -> None:
    # Built in code, a message skips its decoding bounds: this is the database's own refusal.
    assert fleet.controller is not None
    req = VmCreate(name="longkey", vcpus=1, memory_mib=256, disk_gib=1, idempotency_key="k" * 200)
    with pytest.raises(InvalidRequest) as refused:
        fleet.controller.service.create_vm(req)
    assert "character varying" not in refused.value.message and "SELECT" not in refused.value.message
    assert fleet.cli_ok("vm", "list", "--all")["vms"] == []
