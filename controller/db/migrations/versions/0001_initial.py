"""Initial schema: hosts, vms, allocations.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "hosts",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("hostname", sa.String(255), nullable=False, server_default=""),
        sa.Column("enabled", sa.Boolean, nullable=False, server_default=sa.true()),
        sa.Column("maintenance", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("hypervisor_type", sa.String(32), nullable=False, server_default=""),
        sa.Column("hypervisor_version", sa.String(32), nullable=False, server_default=""),
        sa.Column("libvirt_uri", sa.String(255), nullable=False, server_default=""),
        sa.Column("agent_version", sa.String(32), nullable=False, server_default=""),
        sa.Column("hw_virt", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("cpus", sa.Integer, nullable=False, server_default="0"),
        sa.Column("sockets", sa.Integer, nullable=False, server_default="0"),
        sa.Column("cores", sa.Integer, nullable=False, server_default="0"),
        sa.Column("threads", sa.Integer, nullable=False, server_default="0"),
        sa.Column("numa_cells", sa.Integer, nullable=False, server_default="0"),
        sa.Column("memory_mib", sa.Integer, nullable=False, server_default="0"),
        sa.Column("memory_free_mib", sa.Integer, nullable=False, server_default="0"),
        sa.Column("disk_gib", sa.Integer, nullable=False, server_default="0"),
        sa.Column("disk_free_gib", sa.Integer, nullable=False, server_default="0"),
        sa.Column("networks", sa.Text, nullable=False, server_default="[]"),
        sa.Column("bridges", sa.Text, nullable=False, server_default="[]"),
        sa.Column("reported_vms", sa.Text, nullable=False, server_default="[]"),
        sa.Column("cpu_ratio", sa.Float, nullable=True),
        sa.Column("ram_ratio", sa.Float, nullable=True),
        sa.Column("disk_ratio", sa.Float, nullable=True),
        sa.Column("reserved_memory_mib", sa.Integer, nullable=True),
        sa.Column("reserved_cpus", sa.Integer, nullable=True),
        sa.Column("reserved_disk_gib", sa.Integer, nullable=True),
        sa.Column("max_vms", sa.Integer, nullable=True),
        sa.Column("generation", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("agent_started_at", sa.Float, nullable=True),
        sa.Column("report_seq", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("last_heartbeat", sa.Float, nullable=True),
        sa.Column("last_report", sa.Float, nullable=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    op.create_table(
        "vms",
        sa.Column("uuid", sa.String(36), primary_key=True),
        sa.Column("name", sa.String(64), nullable=False, unique=True),
        sa.Column("host_id", sa.String(64), sa.ForeignKey("hosts.id"), nullable=True, index=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("task", sa.String(32), nullable=True),
        sa.Column("desired_power", sa.String(16), nullable=False, server_default="running"),
        sa.Column("power_state", sa.String(16), nullable=False, server_default="nostate"),
        sa.Column("vcpus", sa.Integer, nullable=False),
        sa.Column("max_vcpus", sa.Integer, nullable=False),
        sa.Column("memory_mib", sa.Integer, nullable=False),
        sa.Column("max_memory_mib", sa.Integer, nullable=False),
        sa.Column("disk_gib", sa.Integer, nullable=False),
        sa.Column("autostart", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("persistent", sa.Boolean, nullable=False, server_default=sa.true()),
        sa.Column("cpu_time_ns", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("spec", sa.Text, nullable=False),
        sa.Column("idempotency_key", sa.String(128), nullable=True, unique=True),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.Column("reported_at", sa.Float, nullable=True),
    )
    op.create_table(
        "allocations",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column(
            "vm_uuid",
            sa.String(36),
            sa.ForeignKey("vms.uuid", ondelete="CASCADE"),
            nullable=False,
            index=True,
        ),
        sa.Column("host_id", sa.String(64), sa.ForeignKey("hosts.id"), nullable=False, index=True),
        sa.Column("resource", sa.String(32), nullable=False),
        sa.Column("amount", sa.BigInteger, nullable=False),
        sa.UniqueConstraint("vm_uuid", "resource", name="uq_allocation_vm_resource"),
    )


def downgrade() -> None:
    op.drop_table("allocations")
    op.drop_table("vms")
    op.drop_table("hosts")
