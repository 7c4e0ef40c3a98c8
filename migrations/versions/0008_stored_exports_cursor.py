"""Stored exports: the change cursor of their snapshot (exporter/exports/cursor.py).

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-26
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SCHEMA = "exporter"


def upgrade() -> None:
    op.add_column("stored_exports", sa.Column("cursor", sa.Text), schema=SCHEMA)


def downgrade() -> None:
    op.drop_column("stored_exports", "cursor", schema=SCHEMA)
