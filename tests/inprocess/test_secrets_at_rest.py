"""Secrets at rest: no VNC password in the database (the stored spec, the data migration that drops
old ones) and a database file only its owner reads. On SQLite and PostgreSQL (marker ``db``)."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import sqlalchemy as sa
from alembic import command

from common.messages.vm import GraphicsSpec, VmSpec
from controller.db.engine import alembic_config, make_engine, migrate
from controller.db.models import SpecJson, without_secrets


def test_a_stored_spec_keeps_the_graphics_but_not_the_password() -> None:
    spec = VmSpec(
        uuid="u1", name="v", vcpus=1, memory_mib=256, graphics=GraphicsSpec(listen="0.0.0.0", password="pw1")
    )
    stored = SpecJson().process_bind_param(spec, sa.create_engine("sqlite://").dialect)
    assert "pw1" not in stored
    assert json.loads(stored)["graphics"]["listen"] == "0.0.0.0"
    plain = VmSpec(uuid="u2", name="w", vcpus=1, memory_mib=256)
    assert without_secrets(plain) is plain


def test_the_migration_drops_stored_vnc_passwords(engine: sa.Engine) -> None:
    cfg = alembic_config(engine)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0003")
    spec = {"name": "old", "graphics": {"listen": "0.0.0.0", "port": 5901, "password": "plain1"}}
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO vms (uuid, name, status, vcpus, max_vcpus, memory_mib, max_memory_mib,"
                " disk_gib, spec, created_at, updated_at)"
                " VALUES ('u1', 'old', 'active', 1, 1, 256, 256, 0, :spec, 0, 0)"
            ),
            {"spec": json.dumps(spec)},
        )
    migrate(engine)
    with engine.connect() as conn:
        stored = conn.execute(sa.text("SELECT spec FROM vms WHERE uuid = 'u1'")).scalar_one()
    assert "plain1" not in stored
    assert json.loads(stored)["graphics"] == {"listen": "0.0.0.0", "port": 5901, "password": None}


def test_the_sqlite_file_is_private(tmp_path: Path) -> None:
    path = tmp_path / "private.db"
    engine = make_engine(f"sqlite:///{path}")
    try:
        migrate(engine)
    finally:
        engine.dispose()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loose = tmp_path / "loose.db"
    loose.touch(mode=0o644)
    loose.chmod(0o644)
    make_engine(f"sqlite:///{loose}").dispose()
    assert stat.S_IMODE(loose.stat().st_mode) == 0o600
