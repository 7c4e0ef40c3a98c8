"""The app's own tables (not the exported ones), kept in their own schema."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY, JSONB

APP_SCHEMA = "exporter"

metadata = sa.MetaData(schema=APP_SCHEMA)

downloads = sa.Table(
    "downloads",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("kind", sa.Text, nullable=False),  # export | file | stored (CHECK, 0009)
    sa.Column("target", sa.Text, nullable=False),  # dataset name or file path
    sa.Column("format", sa.Text),
    sa.Column("params", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
    sa.Column("range", sa.Text),
    sa.Column("client", sa.Text),
    sa.Column("status", sa.Text, nullable=False),  # running | complete | aborted | failed | proxied
    sa.Column("http_status", sa.Integer),
    sa.Column("rows", sa.BigInteger),
    sa.Column("bytes", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("error", sa.Text),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=False,
              server_default=sa.func.now()),
    sa.Column("ended_at", sa.DateTime(timezone=True)),
    # Who: "token NAME", "link by NAME", or "anonymous"; never a secret.
    sa.Column("principal", sa.Text),
    sa.Column("link_expires", sa.DateTime(timezone=True)),
    # The server process that served it (instances.id, no foreign key: the instance row
    # goes, the history stays). A server default from the connection's `exporter.instance`
    # setting, so that no INSERT has to name it.
    sa.Column("instance", sa.Text,
              server_default=sa.text("nullif(current_setting('exporter.instance', true), '')")),
    sa.Index("downloads_started_at_idx", "started_at"),
    # `exporter downloads --principal` (migration 0003 made it; `alembic check` found it
    # missing here).
    sa.Index("downloads_principal_idx", "principal"),
    sa.Index("downloads_running_idx", "instance", postgresql_where=sa.text("status = 'running'")),
)

# SHA-256 of served files, valid only while the file keeps this size, mtime and inode.
file_digests = sa.Table(
    "file_digests",
    metadata,
    sa.Column("path", sa.Text, primary_key=True),  # relative to the files root
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("mtime_ns", sa.BigInteger, nullable=False),
    sa.Column("inode", sa.Numeric(20, 0), nullable=False),  # inodes are unsigned 64-bit
    sa.Column("sha256", sa.LargeBinary, nullable=False),
    sa.Column("computed_at", sa.DateTime(timezone=True), nullable=False,
              server_default=sa.func.now()),
)

tokens = sa.Table(
    "tokens",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("secret_hash", sa.LargeBinary, nullable=False, unique=True),  # SHA-256
    sa.Column("scopes", ARRAY(sa.Text), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False,
              server_default=sa.func.now()),
    sa.Column("expires_at", sa.DateTime(timezone=True)),
    sa.Column("last_used_at", sa.DateTime(timezone=True)),
    sa.Column("revoked_at", sa.DateTime(timezone=True)),
    sa.Index("tokens_active_name_idx", "name", unique=True,
             postgresql_where=sa.text("revoked_at IS NULL")),
)

# Server-side secrets shared by every process, such as the link signing key.
secrets = sa.Table(
    "secrets",
    metadata,
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("value", sa.LargeBinary, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False,
              server_default=sa.func.now()),
)

# Server processes, each alive while its lease (`expires_at`, renewed by a heartbeat) runs.
instances = sa.Table(
    "instances",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("host", sa.Text, nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=False,
              server_default=sa.func.now()),
    sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
)

# Downloads in progress in the whole deployment, by what caps them: a principal
# ("principal token NAME #ID") or the export cap ("exports"). A slot counts while its
# instance's lease runs, so a process that dies frees its slots within a lease.
slots = sa.Table(
    "slots",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("key", sa.Text, nullable=False),
    sa.Column("instance", sa.Text, sa.ForeignKey("exporter.instances.id", ondelete="CASCADE"),
              nullable=False),
    sa.Column("taken_at", sa.DateTime(timezone=True), nullable=False,
              server_default=sa.func.now()),
    sa.Index("slots_key_idx", "key"),
    sa.Index("slots_instance_idx", "instance"),
    prefixes=["UNLOGGED"],  # see migrations/versions/0005_deployment.py
)

# Exports run to completion into a file (POST /exports, `Prefer: respond-async`: kind
# `async`), and the stored copies of streamed exports (kind `streamed`). The file is in
# the storage (exporter/stored/storage.py) under `storage_key`; this row says what it is.
stored_exports = sa.Table(
    "stored_exports",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),  # secrets.token_urlsafe(16)
    # Who may read it (see exporter/stored/owners.py): "token ID" for a token and the
    # links it made, else the principal's limit key ("anonymous ADDRESS", an operator
    # link's own key).
    sa.Column("owner", sa.Text, nullable=False),
    sa.Column("principal", sa.Text, nullable=False),  # its label, as in the audit trail
    sa.Column("kind", sa.Text, nullable=False),  # async | streamed
    sa.Column("url", sa.Text, nullable=False),  # path and query, no link parameters
    sa.Column("dataset", sa.Text, nullable=False),
    sa.Column("format", sa.Text, nullable=False),
    sa.Column("coding", sa.Text),  # None (identity), gzip or zstd
    sa.Column("content_type", sa.Text, nullable=False),
    sa.Column("filename", sa.Text, nullable=False),
    sa.Column("status", sa.Text, nullable=False),  # running | complete | failed | cancelled
    sa.Column("rows", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("bytes", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("estimated_rows", sa.BigInteger),
    sa.Column("sha256", sa.LargeBinary),
    sa.Column("error", sa.Text),
    sa.Column("storage_key", sa.Text, nullable=False),
    sa.Column("instance", sa.Text),  # the server process that runs (or ran) it
    sa.Column("created", sa.DateTime(timezone=True), nullable=False,
              server_default=sa.func.now()),
    sa.Column("snapshot_time", sa.DateTime(timezone=True)),
    sa.Column("finished", sa.DateTime(timezone=True)),
    sa.Column("expires", sa.DateTime(timezone=True)),
    sa.Column("heartbeat", sa.DateTime(timezone=True), nullable=False,
              server_default=sa.func.now()),
    # A streamed export's copy: the most bytes a response from it sent (None while the
    # first one runs). A resume asks for no more than that (exporter/stored/resume_copies.py).
    sa.Column("delivered", sa.BigInteger),
    # The Export-Cursor of its snapshot (a table's export), for a later `since`.
    sa.Column("cursor", sa.Text),
    sa.Index("stored_exports_owner_idx", "owner", "created"),
    sa.Index("stored_exports_created_idx", "created"),
    sa.Index("stored_exports_expires_idx", "expires"),
    sa.Index("stored_exports_running_idx", "heartbeat",
             postgresql_where=sa.text("status = 'running'")),
    sa.Index("stored_exports_copies_idx", "owner", "url", "created",
             postgresql_where=sa.text("kind = 'streamed'")),
)
