"""Snapshots (Neon's snapshots API, ADR 0028), and the restore fields of a branch.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def _columns(table: str) -> set[str]:
    return {c["name"] for c in sa.inspect(op.get_bind()).get_columns(table)}


def upgrade() -> None:
    # 0001 creates the tables from today's schema module: a new store has the columns already.
    missing = [name for name in ("restored_from", "restore_status", "restore_target") if name not in _columns("branches")]
    if missing:
        with op.batch_alter_table("branches") as batch:
            for name in missing:
                batch.add_column(sa.Column(name, sa.String(64), nullable=True))
    if not sa.inspect(op.get_bind()).has_table("snapshots"):
        op.create_table(
            "snapshots",
            sa.Column("id", sa.String(64), primary_key=True),
            sa.Column("project_id", sa.String(64), nullable=False, index=True),
            sa.Column("name", sa.String(256), nullable=False),
            sa.Column("created_at", sa.String(32), nullable=False),
            sa.Column("updated_at", sa.String(32), nullable=False),
            sa.Column("source_branch_id", sa.String(64)),
            sa.Column("lsn", sa.String(32)),
            sa.Column("timestamp", sa.String(32)),
            sa.Column("expires_at", sa.String(32)),
            sa.Column("manual", sa.Boolean, nullable=False),
            sa.Column("full_size", sa.BigInteger, nullable=False),
        )


def downgrade() -> None:
    op.drop_table("snapshots")
    with op.batch_alter_table("branches") as batch:
        for name in ("restored_from", "restore_status", "restore_target"):
            batch.drop_column(name)
