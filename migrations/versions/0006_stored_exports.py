"""Stored exports: exports run to completion into a file, and copies of streamed ones.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SCHEMA = "exporter"


def upgrade() -> None:
    op.create_table(
        "stored_exports",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("owner", sa.Text, nullable=False),
        sa.Column("principal", sa.Text, nullable=False),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("url", sa.Text, nullable=False),
        sa.Column("dataset", sa.Text, nullable=False),
        sa.Column("format", sa.Text, nullable=False),
        sa.Column("coding", sa.Text),
        sa.Column("content_type", sa.Text, nullable=False),
        sa.Column("filename", sa.Text, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("rows", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("bytes", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("estimated_rows", sa.BigInteger),
        sa.Column("sha256", sa.LargeBinary),
        sa.Column("error", sa.Text),
        sa.Column("storage_key", sa.Text, nullable=False),
        sa.Column("instance", sa.Text),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False,
                  server_default=sa.func.now()),
        sa.Column("snapshot_time", sa.DateTime(timezone=True)),
        sa.Column("finished", sa.DateTime(timezone=True)),
        sa.Column("expires", sa.DateTime(timezone=True)),
        sa.Column("heartbeat", sa.DateTime(timezone=True), nullable=False,
                  server_default=sa.func.now()),
        schema=SCHEMA,
    )
    # GET /exports: the caller's, newest first.
    op.create_index("stored_exports_owner_idx", "stored_exports", ["owner", "created"],
                    schema=SCHEMA)
    # GET /exports for admins, `exporter exports`.
    op.create_index("stored_exports_created_idx", "stored_exports", ["created"], schema=SCHEMA)
    # The clean-up: expired ones, and running ones whose runner stopped beating.
    op.create_index("stored_exports_expires_idx", "stored_exports", ["expires"], schema=SCHEMA)
    op.create_index("stored_exports_running_idx", "stored_exports", ["heartbeat"],
                    schema=SCHEMA, postgresql_where=sa.text("status = 'running'"))


def downgrade() -> None:
    op.drop_table("stored_exports", schema=SCHEMA)
