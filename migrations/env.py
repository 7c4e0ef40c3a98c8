"""Alembic environment: the app's own tables live in the `exporter` schema."""

from __future__ import annotations

import asyncio
import os

from alembic import context
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from exporter.db import sqlalchemy_url
from exporter.tables import APP_SCHEMA, metadata

config = context.config


def database_url() -> str:
    url = config.attributes.get("database_url") or os.environ.get("EXPORTER_DATABASE_URL")
    if not url:
        raise SystemExit("set EXPORTER_DATABASE_URL, or run `exporter migrate`")
    return sqlalchemy_url(str(url))


def run(connection: Connection) -> None:
    connection.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{APP_SCHEMA}"'))
    context.configure(
        connection=connection,
        target_metadata=metadata,
        version_table_schema=APP_SCHEMA,
        include_schemas=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def run_online() -> None:
    engine = create_async_engine(database_url())
    async with engine.begin() as connection:
        await connection.run_sync(run)
    await engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline migrations are not supported")
asyncio.run(run_online())
