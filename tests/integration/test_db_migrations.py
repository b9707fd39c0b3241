"""The alembic migrations build exactly the schema the models describe, and undo cleanly.

Run on SQLite and, by deploy/test.sh, again on PostgreSQL (marker ``db``).
"""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory

from controller.db.engine import alembic_config, make_engine, migrate
from controller.db.models import Base

pytestmark = pytest.mark.db


def _diff(engine: sa.Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(compare_metadata(MigrationContext.configure(conn), Base.metadata))


def test_head_matches_the_models(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        migrate(engine)
        assert _diff(engine) == []
        heads = ScriptDirectory.from_config(alembic_config(engine)).get_heads()
        with engine.connect() as conn:
            assert MigrationContext.configure(conn).get_current_heads() == tuple(heads)
        migrate(engine)  # a second controller start finds nothing to do
        assert _diff(engine) == []
    finally:
        engine.dispose()


def test_downgrade_to_base_and_up_again(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        migrate(engine)
        cfg = alembic_config(engine)
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, "base")
        tables = set(sa.inspect(engine).get_table_names()) - {"alembic_version"}
        assert tables == set()
        migrate(engine)
        assert _diff(engine) == []
    finally:
        engine.dispose()
