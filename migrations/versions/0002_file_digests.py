"""SHA-256 digests of served files, keyed by path and the file's identity.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SCHEMA = "exporter"


def upgrade() -> None:
    op.create_table(
        "file_digests",
        sa.Column("path", sa.Text, primary_key=True),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("mtime_ns", sa.BigInteger, nullable=False),
        sa.Column("inode", sa.Numeric(20, 0), nullable=False),
        sa.Column("sha256", sa.LargeBinary, nullable=False),
        sa.Column("computed_at", sa.DateTime(timezone=True), nullable=False,
                  server_default=sa.func.now()),
        sa.CheckConstraint("octet_length(sha256) = 32", name="file_digests_sha256_check"),
        schema=SCHEMA,
    )


def downgrade() -> None:
    op.drop_table("file_digests", schema=SCHEMA)
