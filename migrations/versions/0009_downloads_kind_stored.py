"""The audit trail: downloads of stored exports' files (kind `stored`), refused until now.

`GET /exports/ID/file` and a resumed 206 (served from a stored copy) write a row of kind
`stored`; the CHECK of 0001 allowed `export` and `file` only, so every such row was
refused and dropped.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-05
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SCHEMA = "exporter"
NAME = "downloads_kind_check"


def upgrade() -> None:
    op.drop_constraint(NAME, "downloads", schema=SCHEMA, type_="check")
    op.create_check_constraint(NAME, "downloads", "kind IN ('export', 'file', 'stored')",
                               schema=SCHEMA)


def downgrade() -> None:
    # The rows of stored files go first: the old CHECK would refuse them.
    op.execute(f"DELETE FROM {SCHEMA}.downloads WHERE kind = 'stored'")
    op.drop_constraint(NAME, "downloads", schema=SCHEMA, type_="check")
    op.create_check_constraint(NAME, "downloads", "kind IN ('export', 'file')", schema=SCHEMA)
