"""Initial metadata schema: projects, branches, endpoints, roles, databases, operations, keys, events.

Revision ID: 0001
Revises:
"""

from alembic import op

from argon.metadata import schema

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# The first revision creates the tables as schema.py declared them at release 0.1; later revisions
# must spell out their changes (op.add_column, ...) instead of importing the current schema.
_TABLES = ("projects", "branches", "endpoints", "roles", "databases", "operations", "api_keys", "events")


def upgrade() -> None:
    bind = op.get_bind()
    for name in _TABLES:
        schema.metadata.tables[name].create(bind)


def downgrade() -> None:
    bind = op.get_bind()
    for name in reversed(_TABLES):
        schema.metadata.tables[name].drop(bind)
