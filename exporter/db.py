"""The database: one SQLAlchemy async engine, its pool, and the asyncpg connection below it."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from exporter.config import Settings

# The oldest PostgreSQL supported, as `server_version_num`: the oldest major version the
# PostgreSQL project still maintained when this was written. Older ones are refused at
# start rather than failing later, request by request, on SQL they lack.
OLDEST_SUPPORTED = 130000

# Every connection speaks the same dialect of dates and text, so an export's bytes
# do not depend on the server's or the role's defaults.
SESSION_SETTINGS = {
    "application_name": "exporter",
    "timezone": "UTC",
    "datestyle": "ISO, YMD",
    "intervalstyle": "postgres",
    "standard_conforming_strings": "on",
    "client_encoding": "UTF8",
}
# Lets PostgreSQL notice a vanished client even while a query is still working before
# its first row (milliseconds). New in PostgreSQL 14: in the startup packet PostgreSQL 13
# would refuse the whole connection, so it is set after connecting, where it exists.
CHECK_INTERVAL = "SET client_connection_check_interval = 500"
CHECK_INTERVAL_SINCE = 14


class UnsupportedServer(Exception):
    """The database is a PostgreSQL older than the oldest one supported."""


def version_refusal(version_num: int, version: str) -> str | None:
    """Why a server of this `server_version_num` (and `server_version`) is refused, in
    one line; None when it is supported."""
    if version_num >= OLDEST_SUPPORTED:
        return None
    return (f"PostgreSQL {version} is not supported: exporter needs PostgreSQL"
            f" {OLDEST_SUPPORTED // 10000} or newer")


async def check_server_version(conn: AsyncConnection) -> int:
    """The server's `server_version_num`; raises UnsupportedServer when it is too old."""
    row = (await conn.execute(text(
        "SELECT current_setting('server_version_num')::int, current_setting('server_version')"
    ))).one()
    refusal = version_refusal(int(row[0]), str(row[1]))
    if refusal is not None:
        raise UnsupportedServer(refusal)
    return int(row[0])


def require_supported_server(url: str) -> None:
    """For the commands: a server too old is one line on stderr and exit status 2."""

    async def check() -> None:
        engine = create_async_engine(sqlalchemy_url(url), poolclass=NullPool)
        try:
            async with engine.connect() as conn:
                await check_server_version(conn)
        finally:
            await engine.dispose()

    try:
        asyncio.run(check())
    except UnsupportedServer as error:
        print(f"exporter: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def sqlalchemy_url(url: str) -> str:
    """Accept a plain libpq URI (`postgresql://...`) and pick the asyncpg driver."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres", "postgresql+asyncpg"):
        parsed = parsed.set(drivername="postgresql+asyncpg")
    else:
        raise ValueError(f"not a PostgreSQL URL: {parsed.drivername}")
    return parsed.render_as_string(hide_password=False)


def libpq_url(url: str) -> str:
    """The same URL for libpq clients such as `psql`."""
    parsed = make_url(sqlalchemy_url(url)).set(drivername="postgresql")
    return parsed.render_as_string(hide_password=False)


def create_engine(settings: Settings, url: str) -> AsyncEngine:
    engine = create_async_engine(
        sqlalchemy_url(url),
        pool_size=settings.pool_size,
        max_overflow=settings.pool_max_overflow,
        pool_timeout=settings.pool_timeout,
        pool_pre_ping=True,
        connect_args={"server_settings": SESSION_SETTINGS},
    )
    event.listen(engine.sync_engine, "connect", _set_version_dependent_settings)
    return engine


def _set_version_dependent_settings(dbapi_connection: Any, record: object) -> None:
    if dbapi_connection.driver_connection.get_server_version().major >= CHECK_INTERVAL_SINCE:
        # Outside any transaction: a later rollback on the connection keeps it.
        dbapi_connection.run_async(lambda conn: conn.execute(CHECK_INTERVAL))


async def driver_connection(conn: AsyncConnection) -> object:
    """The asyncpg connection under a pooled SQLAlchemy connection (for COPY)."""
    raw = await conn.get_raw_connection()
    return raw.driver_connection
