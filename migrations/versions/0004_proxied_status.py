"""Downloads may end as `proxied`: a file handed to nginx with X-Accel-Redirect.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SCHEMA = "exporter"


def upgrade() -> None:
    op.drop_constraint("downloads_status_check", "downloads", schema=SCHEMA)
    op.create_check_constraint(
        "downloads_status_check", "downloads",
        "status IN ('running', 'complete', 'aborted', 'failed', 'proxied')", schema=SCHEMA,
    )


def downgrade() -> None:
    op.execute(f"UPDATE {SCHEMA}.downloads SET status = 'complete' WHERE status = 'proxied'")
    op.drop_constraint("downloads_status_check", "downloads", schema=SCHEMA)
    op.create_check_constraint(
        "downloads_status_check", "downloads",
        "status IN ('running', 'complete', 'aborted', 'failed')", schema=SCHEMA,
    )
