"""API tokens, the link signing key, and who downloaded what.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import ARRAY

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SCHEMA = "exporter"


def upgrade() -> None:
    op.create_table(
        "tokens",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("secret_hash", sa.LargeBinary, nullable=False, unique=True),
        sa.Column("scopes", ARRAY(sa.Text), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False,
                  server_default=sa.func.now()),
        sa.Column("expires_at", sa.DateTime(timezone=True)),
        sa.Column("last_used_at", sa.DateTime(timezone=True)),
        sa.Column("revoked_at", sa.DateTime(timezone=True)),
        schema=SCHEMA,
    )
    # A name is unique among the tokens in use; a revoked one frees it.
    op.create_index("tokens_active_name_idx", "tokens", ["name"], unique=True, schema=SCHEMA,
                    postgresql_where=sa.text("revoked_at IS NULL"))
    op.create_table(
        "secrets",
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("value", sa.LargeBinary, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False,
                  server_default=sa.func.now()),
        schema=SCHEMA,
    )
    op.add_column("downloads", sa.Column("principal", sa.Text), schema=SCHEMA)
    op.add_column("downloads", sa.Column("link_expires", sa.DateTime(timezone=True)),
                  schema=SCHEMA)
    op.create_index("downloads_principal_idx", "downloads", ["principal"], schema=SCHEMA)


def downgrade() -> None:
    op.drop_index("downloads_principal_idx", "downloads", schema=SCHEMA)
    op.drop_column("downloads", "link_expires", schema=SCHEMA)
    op.drop_column("downloads", "principal", schema=SCHEMA)
    op.drop_table("secrets", schema=SCHEMA)
    op.drop_table("tokens", schema=SCHEMA)
