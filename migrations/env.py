"""Alembic environment: the app's own tables live in the `exporter` schema."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from alembic import context
from sqlalchemy import text
from sqlalchemy.engine import Connection

from exporter.db import create_single_engine
from exporter.tables import APP_SCHEMA, metadata

config = context.config

# Instances started together (several hosts, a rolling deploy) all run `serve`, which
# migrates: one transaction-scoped advisory lock makes them take turns, and the later
# ones find the schema at head. The key is arbitrary but fixed: "exporter" in ASCII.
MIGRATION_LOCK = 0x6578706F72746572


def database_url() -> str:
    url = config.attributes.get("database_url") or os.environ.get("EXPORTER_DATABASE_URL")
    if not url:
        raise SystemExit("set EXPORTER_DATABASE_URL, or run `exporter migrate`")
    return str(url)


def include_name(name: str | None, type_: str, parent_names: Any) -> bool:
    # Only the app's schema is ours: `alembic check` must not offer to drop the datasets.
    if type_ == "schema":
        return name == APP_SCHEMA
    return True


def run(connection: Connection) -> None:
    connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
    connection.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{APP_SCHEMA}"'))
    context.configure(
        connection=connection,
        target_metadata=metadata,
        version_table_schema=APP_SCHEMA,
        include_schemas=True,
        include_name=include_name,
    )
    with context.begin_transaction():
        context.run_migrations()


async def run_online() -> None:
    engine = create_single_engine(database_url())
    try:
        async with engine.begin() as connection:
            await connection.run_sync(run)
    finally:
        await engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline migrations are not supported")
asyncio.run(run_online())
