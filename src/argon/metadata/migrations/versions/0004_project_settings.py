"""Project settings the platform acts on: the proxy's IP allow-list and logical replication.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # 0001 creates the tables from today's schema module: a new store has the column already.
    if "settings" in {c["name"] for c in sa.inspect(op.get_bind()).get_columns("projects")}:
        return
    with op.batch_alter_table("projects") as batch:
        batch.add_column(sa.Column("settings", sa.JSON, nullable=False, server_default="{}"))


def downgrade() -> None:
    with op.batch_alter_table("projects") as batch:
        batch.drop_column("settings")
