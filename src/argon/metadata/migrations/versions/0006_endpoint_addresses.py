"""Each endpoint's own loopback address (ADR 0031), given to the endpoints that exist now.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def _address(slot: int) -> str:
    # argon.control.addresses.address_of as of this revision (stored addresses never change meaning)
    return f"127.1.{slot // 254}.{slot % 254 + 1}"


def upgrade() -> None:
    bind = op.get_bind()
    inspector = sa.inspect(bind)
    # 0001 creates the tables from today's schema module: a new store has the column and index already.
    if "address" not in {c["name"] for c in inspector.get_columns("endpoints")}:
        with op.batch_alter_table("endpoints") as batch:
            batch.add_column(sa.Column("address", sa.String(15), nullable=True))
    if "ix_endpoints_address" not in {i["name"] for i in sa.inspect(bind).get_indexes("endpoints")}:
        op.create_index("ix_endpoints_address", "endpoints", ["address"], unique=True)
    rows = bind.execute(sa.text("SELECT id FROM endpoints WHERE address IS NULL ORDER BY created_at, id")).all()
    taken = {r[0] for r in bind.execute(sa.text("SELECT address FROM endpoints WHERE address IS NOT NULL"))}
    slot = 0
    for (endpoint_id,) in rows:
        while _address(slot) in taken:
            slot += 1
        bind.execute(sa.text("UPDATE endpoints SET address = :a WHERE id = :i"), {"a": _address(slot), "i": endpoint_id})
        slot += 1


def downgrade() -> None:
    op.drop_index("ix_endpoints_address", "endpoints")
    with op.batch_alter_table("endpoints") as batch:
        batch.drop_column("address")
