"""Host groups, server groups, per-host inventory overrides, network/tuning facts, VM CPU policy.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "host_groups",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("cpu_ratio", sa.Float, nullable=True),
        sa.Column("ram_ratio", sa.Float, nullable=True),
        sa.Column("disk_ratio", sa.Float, nullable=True),
        sa.Column("reserved_memory_mib", sa.Integer, nullable=True),
        sa.Column("reserved_cpus", sa.Integer, nullable=True),
        sa.Column("reserved_disk_gib", sa.Integer, nullable=True),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_table(
        "server_groups",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("policy", sa.String(32), nullable=False),
        sa.Column("max_per_host", sa.Integer, nullable=False, server_default="1"),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    with op.batch_alter_table("hosts") as batch:
        batch.add_column(sa.Column("group_name", sa.String(64), nullable=True))
        batch.add_column(sa.Column("inventory_overrides", sa.Text, nullable=False, server_default="{}"))
        batch.add_column(sa.Column("network_facts", sa.Text, nullable=False, server_default="null"))
        batch.add_column(sa.Column("tuning_facts", sa.Text, nullable=False, server_default="null"))
    with op.batch_alter_table("vms") as batch:
        batch.add_column(sa.Column("server_group", sa.String(64), nullable=True))
        batch.add_column(sa.Column("cpu_policy", sa.String(16), nullable=False, server_default="shared"))
        batch.add_column(sa.Column("pcpus", sa.Text, nullable=False, server_default="[]"))
        batch.add_column(sa.Column("hugepage_size_kib", sa.Integer, nullable=True))
        batch.add_column(sa.Column("needs_hw_virt", sa.Boolean, nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("vms") as batch:
        for col in ("needs_hw_virt", "hugepage_size_kib", "pcpus", "cpu_policy", "server_group"):
            batch.drop_column(col)
    with op.batch_alter_table("hosts") as batch:
        for col in ("tuning_facts", "network_facts", "inventory_overrides", "group_name"):
            batch.drop_column(col)
    op.drop_table("server_groups")
    op.drop_table("host_groups")
