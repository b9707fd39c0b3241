"""Controller recovery: instances with a heartbeat, the reconciler's lease, and which instance
owns a VM's in-flight build or task.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

#: the lease the fleet-wide reconciliation pass runs under (controller.db.liveness.RECONCILER)
RECONCILER_LEASE = "reconciler"


def upgrade() -> None:
    op.create_table(
        "controller_instances",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("started_at", sa.Float, nullable=False),
        sa.Column("heartbeat_at", sa.Float, nullable=False),
    )
    leases = op.create_table(
        "controller_leases",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("holder", sa.String(64), nullable=True),
        sa.Column("expires_at", sa.Float, nullable=False),
    )
    # The row exists before any controller runs: acquiring is a compare-and-set UPDATE, never an
    # INSERT that two controllers could race on.
    op.bulk_insert(leases, [{"name": RECONCILER_LEASE, "holder": None, "expires_at": 0.0}])
    with op.batch_alter_table("vms") as batch:
        batch.add_column(sa.Column("owner", sa.String(64), nullable=True))
        batch.create_index("ix_vms_owner", ["owner"])
        # Recovery reads the VMs in flight (building, or with a task) by these two, every few seconds.
        batch.create_index("ix_vms_status", ["status"])
        batch.create_index("ix_vms_task", ["task"])


def downgrade() -> None:
    with op.batch_alter_table("vms") as batch:
        batch.drop_index("ix_vms_task")
        batch.drop_index("ix_vms_status")
        batch.drop_index("ix_vms_owner")
        batch.drop_column("owner")
    op.drop_table("controller_leases")
    op.drop_table("controller_instances")
