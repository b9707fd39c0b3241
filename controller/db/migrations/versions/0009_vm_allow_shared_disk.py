"""VMs remember that their create allowed a disk in use by other guests, so that recovery re-sends
the build as it was asked for.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("vms") as batch:
        batch.add_column(
            sa.Column("allow_shared_disk", sa.Boolean, nullable=False, server_default=sa.false())
        )


def downgrade() -> None:
    with op.batch_alter_table("vms") as batch:
        batch.drop_column("allow_shared_disk")
