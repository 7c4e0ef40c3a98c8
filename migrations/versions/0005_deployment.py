"""Deployment-wide download slots, leased per server process; which process wrote an
audit row.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-25
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SCHEMA = "exporter"


def upgrade() -> None:
    op.create_table(
        "instances",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("host", sa.Text, nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False,
                  server_default=sa.func.now()),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        schema=SCHEMA,
    )
    op.create_table(
        "slots",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("key", sa.Text, nullable=False),
        sa.Column("instance", sa.Text,
                  sa.ForeignKey(f"{SCHEMA}.instances.id", ondelete="CASCADE"), nullable=False),
        sa.Column("taken_at", sa.DateTime(timezone=True), nullable=False,
                  server_default=sa.func.now()),
        schema=SCHEMA,
        # Not written to the WAL: a slot's commit waits for no disk flush (20 ms under
        # load here, bench/slots.py), and after a database crash no slot is left anyway.
        prefixes=["UNLOGGED"],
    )
    op.create_index("slots_key_idx", "slots", ["key"], schema=SCHEMA)
    op.create_index("slots_instance_idx", "slots", ["instance"], schema=SCHEMA)
    # Filled from the connection's `exporter.instance` setting (see exporter/db.py).
    op.add_column("downloads", sa.Column(
        "instance", sa.Text,
        server_default=sa.text("nullif(current_setting('exporter.instance', true), '')")),
        schema=SCHEMA)
    op.create_index("downloads_running_idx", "downloads", ["instance"], schema=SCHEMA,
                    postgresql_where=sa.text("status = 'running'"))


def downgrade() -> None:
    op.drop_index("downloads_running_idx", "downloads", schema=SCHEMA)
    op.drop_column("downloads", "instance", schema=SCHEMA)
    op.drop_table("slots", schema=SCHEMA)
    op.drop_table("instances", schema=SCHEMA)
