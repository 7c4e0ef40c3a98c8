"""Token changes notified: every server process caches the tokens it checked
(exporter/access/token_cache.py) and forgets them when a token is revoked, deleted,
renamed, re-scoped or given another expiry, however the change is made (the API, the
command line, or SQL by hand).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-05
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SCHEMA = "exporter"
# exporter/access/token_cache.py's CHANNEL.
CHANNEL = "exporter_tokens"


def upgrade() -> None:
    op.execute(f"""
        CREATE FUNCTION {SCHEMA}.notify_tokens_changed() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('{CHANNEL}', TG_OP);
            RETURN NULL;
        END $$""")
    # Per statement: one notification however many rows; not for last_used_at, which
    # every process writes once a minute per token.
    op.execute(f"""
        CREATE TRIGGER tokens_changed
        AFTER UPDATE OF name, secret_hash, scopes, expires_at, revoked_at OR DELETE OR TRUNCATE
        ON {SCHEMA}.tokens FOR EACH STATEMENT
        EXECUTE FUNCTION {SCHEMA}.notify_tokens_changed()""")


def downgrade() -> None:
    op.execute(f"DROP TRIGGER tokens_changed ON {SCHEMA}.tokens")
    op.execute(f"DROP FUNCTION {SCHEMA}.notify_tokens_changed()")
