"""VM specs no longer hold the VNC password: drop it from every stored spec.

The password travels to the agent in the create command and lives in libvirt's definition of the
domain (``vm export --secure``, admins only); the controller's database never keeps it. This
data migration removes the plain-text passwords that earlier releases stored in ``vms.spec``.
There is no way back: the downgrade leaves the specs without passwords.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04
"""

from __future__ import annotations

import json

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_VMS = sa.table("vms", sa.column("uuid", sa.String), sa.column("spec", sa.Text))


def upgrade() -> None:
    conn = op.get_bind()
    # Only the rows that may hold one: a JSON text search, then an exact check on the decoded spec.
    rows = conn.execute(sa.select(_VMS.c.uuid, _VMS.c.spec).where(_VMS.c.spec.like('%"password"%'))).all()
    for uuid, text in rows:
        spec = json.loads(text or "{}")
        graphics = spec.get("graphics") if isinstance(spec, dict) else None
        if not isinstance(graphics, dict) or graphics.get("password") is None:
            continue
        graphics["password"] = None
        conn.execute(sa.update(_VMS).where(_VMS.c.uuid == uuid).values(spec=json.dumps(spec, sort_keys=True)))


def downgrade() -> None:
    """Nothing to restore: the passwords are gone from the database by design."""
