"""Stored copies of streamed exports: how far their response got, for resuming them.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-26
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SCHEMA = "exporter"


def upgrade() -> None:
    op.add_column("stored_exports", sa.Column("delivered", sa.BigInteger), schema=SCHEMA)
    # A Range request looks for the copies of its URL by its principal.
    op.create_index("stored_exports_copies_idx", "stored_exports", ["owner", "url", "created"],
                    schema=SCHEMA, postgresql_where=sa.text("kind = 'streamed'"))


def downgrade() -> None:
    op.drop_index("stored_exports_copies_idx", "stored_exports", schema=SCHEMA)
    op.drop_column("stored_exports", "delivered", schema=SCHEMA)
