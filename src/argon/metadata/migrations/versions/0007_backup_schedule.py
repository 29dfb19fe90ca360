"""A branch's backup schedule (Neon's `backup_schedule`, ADR 0032).

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # 0001 creates the tables from today's schema module: a new store has the column already.
    if "backup_schedule" not in {c["name"] for c in sa.inspect(op.get_bind()).get_columns("branches")}:
        with op.batch_alter_table("branches") as batch:
            batch.add_column(sa.Column("backup_schedule", sa.JSON, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("branches") as batch:
        batch.drop_column("backup_schedule")
