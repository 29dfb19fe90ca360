"""Monitoring samples: one table, written by the metrics sampler, pruned by age.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "metric_samples",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("at", sa.String(32), nullable=False),  # UTC ISO text, as schema.UTCDateTime writes it
        sa.Column("project_id", sa.String(64), nullable=False),
        sa.Column("branch_id", sa.String(64), nullable=False),
        sa.Column("endpoint_id", sa.String(64)),
        sa.Column("connections", sa.Integer),
        sa.Column("xacts", sa.BigInteger),
        sa.Column("qps", sa.Float),
        sa.Column("wal_lsn", sa.BigInteger),
        sa.Column("cpu_seconds", sa.Float),
        sa.Column("active_seconds", sa.Float),
        sa.Column("storage_bytes", sa.BigInteger),
        sa.Column("logical_bytes", sa.BigInteger),
    )
    op.create_index("ix_metric_samples_at", "metric_samples", ["at"])
    op.create_index("ix_metric_samples_project_id", "metric_samples", ["project_id"])
    op.create_index("ix_metric_samples_branch_at", "metric_samples", ["branch_id", "at"])


def downgrade() -> None:
    op.drop_table("metric_samples")
