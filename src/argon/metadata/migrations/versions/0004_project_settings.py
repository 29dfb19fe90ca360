"""Project settings the platform acts on (the proxy's IP allow-list, logical replication), and API
keys scoped to one project.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def _columns(table: str) -> set[str]:
    return {c["name"] for c in sa.inspect(op.get_bind()).get_columns(table)}


def upgrade() -> None:
    # 0001 creates the tables from today's schema module: a new store has the columns already.
    if "settings" not in _columns("projects"):
        with op.batch_alter_table("projects") as batch:
            batch.add_column(sa.Column("settings", sa.JSON, nullable=False, server_default="{}"))
    if "project_id" not in _columns("api_keys"):
        with op.batch_alter_table("api_keys") as batch:
            batch.add_column(sa.Column("project_id", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("projects") as batch:
        batch.drop_column("settings")
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("project_id")
