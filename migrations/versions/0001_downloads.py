"""The audit trail of downloads.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SCHEMA = "exporter"


def upgrade() -> None:
    op.create_table(
        "downloads",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("target", sa.Text, nullable=False),
        sa.Column("format", sa.Text),
        sa.Column("params", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("range", sa.Text),
        sa.Column("client", sa.Text),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("http_status", sa.Integer),
        sa.Column("rows", sa.BigInteger),
        sa.Column("bytes", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("error", sa.Text),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False,
                  server_default=sa.func.now()),
        sa.Column("ended_at", sa.DateTime(timezone=True)),
        sa.CheckConstraint("kind IN ('export', 'file')", name="downloads_kind_check"),
        sa.CheckConstraint("status IN ('running', 'complete', 'aborted', 'failed')",
                           name="downloads_status_check"),
        schema=SCHEMA,
    )
    op.create_index("downloads_started_at_idx", "downloads", ["started_at"], schema=SCHEMA)


def downgrade() -> None:
    op.drop_table("downloads", schema=SCHEMA)
