"""The database: one SQLAlchemy async engine, its pool, and the asyncpg connection below it."""

from __future__ import annotations

from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from exporter.config import Settings

# Every connection speaks the same dialect of dates and text, so an export's bytes
# do not depend on the server's or the role's defaults.
SESSION_SETTINGS = {
    "application_name": "exporter",
    "timezone": "UTC",
    "datestyle": "ISO, YMD",
    "intervalstyle": "postgres",
    "standard_conforming_strings": "on",
    "client_encoding": "UTF8",
    # Lets PostgreSQL notice a vanished client even while a query is still
    # working before its first row (milliseconds).
    "client_connection_check_interval": "500",
}


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


def create_engine(settings: Settings, url: str, *, instance: str | None = None) -> AsyncEngine:
    """`instance`: the server process's id, which every connection carries as the setting
    `exporter.instance` (the audit rows' default for their `instance` column)."""
    server_settings = dict(SESSION_SETTINGS)
    if instance is not None:
        server_settings["exporter.instance"] = instance
    return create_async_engine(
        sqlalchemy_url(url),
        pool_size=settings.pool_size,
        max_overflow=settings.pool_max_overflow,
        pool_timeout=settings.pool_timeout,
        pool_pre_ping=True,
        connect_args={"server_settings": server_settings},
    )


async def driver_connection(conn: AsyncConnection) -> object:
    """The asyncpg connection under a pooled SQLAlchemy connection (for COPY)."""
    raw = await conn.get_raw_connection()
    return raw.driver_connection
