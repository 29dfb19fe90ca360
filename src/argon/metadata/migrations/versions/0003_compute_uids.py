"""Every OS uid ever given to a project's computes, so that none is given twice.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "compute_uids",
        sa.Column("uid", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("project_id", sa.String(64), nullable=False),
        sa.Column("allocated_at", sa.String(32), nullable=False),  # UTC ISO text, as schema.UTCDateTime writes it
        sa.Column("released_at", sa.String(32)),
    )
    # The uids of the projects that exist now; those of projects deleted before this revision are not
    # known (the allocator skips every uid a project holds and never goes below the highest one).
    op.execute("INSERT INTO compute_uids (uid, project_id, allocated_at) "
               "SELECT os_uid, id, created_at FROM projects WHERE os_uid IS NOT NULL")


def downgrade() -> None:
    op.drop_table("compute_uids")
