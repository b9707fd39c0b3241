"""A database error in a request is answered as a typed error, on SQLite and PostgreSQL: never an
InternalError carrying SQL text (issue 13, item 4)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from inproc import HostShape, InProcessFleet, database_is_postgres, inprocess_fleet
from sqlalchemy import Engine, event
from sqlalchemy import exc as sa

from common.errors import InvalidRequest
from common.messages.api import VmCreate


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessFleet]:
    with inprocess_fleet(tmp_path_factory.mktemp("dberrors"), {"small": HostShape("small")}) as f:
        yield f


def controller_engine(fleet: InProcessFleet) -> Engine:
    assert fleet.controller is not None
    return fleet.controller.engine


class ConnectionKilled:
    """Makes every INSERT into ``vms`` fail as a connection the server terminated would."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.refused = 0

    def __enter__(self) -> ConnectionKilled:
        event.listen(self.engine, "before_cursor_execute", self._refuse)
        return self

    def __exit__(self, *_exc: object) -> None:
        event.remove(self.engine, "before_cursor_execute", self._refuse)

    def _refuse(self, _conn: Any, _cursor: Any, statement: str, parameters: Any, *_rest: Any) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO VMS"):
            self.refused += 1
            raise sa.OperationalError(statement, parameters, Exception("terminating connection (injected)"))


def test_a_lost_connection_is_a_retryable_store_unavailable_and_nothing_is_written(
    fleet: InProcessFleet,
) -> None:
    with ConnectionKilled(controller_engine(fleet)) as killed:
        done = fleet.cli("vm", "create", "lost", "--memory", "256", "--disk", "1")
    assert killed.refused >= 1
    assert done.code == 5, done.stdout + done.stderr
    error = done.json["error"]
    assert error["type"] == "StoreUnavailable" and error["retryable"] is True, error
    assert "INSERT" not in error["message"] and "injected" not in error["message"]
    assert fleet.cli_ok("vm", "list", "--all")["vms"] == []
    # and the host's capacity is whole again: the same create goes through now
    assert fleet.cli_ok("vm", "create", "lost", "--memory", "256", "--disk", "1")["vm"]["status"] == "active"
    fleet.cli_ok("vm", "delete", "lost", "--delete-disks")


@pytest.mark.skipif(not database_is_postgres(), reason="SQLite enforces no VARCHAR length")
def test_a_value_longer_than_its_column_is_an_invalid_request_on_postgresql(fleet: InProcessFleet) -> None:
    # Built in code, a message skips its decoding bounds: this is the database's own refusal.
    assert fleet.controller is not None
    req = VmCreate(name="longkey", vcpus=1, memory_mib=256, disk_gib=1, idempotency_key="k" * 200)
    with pytest.raises(InvalidRequest) as refused:
        fleet.controller.service.create_vm(req)
    assert "character varying" not in refused.value.message and "SELECT" not in refused.value.message
    assert fleet.cli_ok("vm", "list", "--all")["vms"] == []
