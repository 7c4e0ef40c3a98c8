"""The database: SQLAlchemy async engines (the primary, and a read replica for exports if
configured), their pools, and the asyncpg connection below them."""

from __future__ import annotations

import asyncio
import functools
import shlex
import ssl
import sys
import weakref
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from sqlalchemy import event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool
from sqlalchemy.util.concurrency import await_

if TYPE_CHECKING:
    # Annotations only: config.py checks URLs with this module's parser at run time.
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
        engine = create_single_engine(url)
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


class DatabaseUnavailable(Exception):
    """The database could not be reached or refused us: one line, no traceback.
    (Here, not in exporter.cli, which also runs as __main__ under `python -m`.)"""


# libpq's URL parameters that asyncpg.connect() does not take under these names;
# SQLAlchemy would hand them over as they are, and asyncpg would fail with a TypeError.
LIBPQ_PARAMETERS = ("sslmode", "sslrootcert", "sslcert", "sslkey", "application_name",
                    "connect_timeout", "options")
SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


def _parse(url: str) -> URL:
    try:
        parsed = make_url(url)
    except Exception as error:  # SQLAlchemy's ArgumentError, or a ValueError of a bad port
        raise ValueError("not a URL such as postgresql://user:password@host:5432/db") from error
    if parsed.drivername not in ("postgresql", "postgres", "postgresql+asyncpg"):
        raise ValueError(f"not a PostgreSQL URL: {parsed.drivername}")
    if parsed.port is not None and not 1 <= parsed.port <= 65535:
        raise ValueError(f"port {parsed.port} is not between 1 and 65535")
    return parsed.set(drivername="postgresql+asyncpg")


def sqlalchemy_url(url: str) -> str:
    """Accept a plain libpq URI (`postgresql://...`) and pick the asyncpg driver."""
    return _parse(url).render_as_string(hide_password=False)


def safe_url(url: str) -> str:
    """The URL for messages and logs: the password masked."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "(not a URL)"


@functools.cache  # asked by every export (exports/parallel.py), of one URL or two
def on_this_host(url: str | None) -> bool:
    """Whether the database of `url` runs on this machine (None: the embedded one): a unix
    socket, or a loopback address. Its backends then share this machine's cores."""
    if url is None:
        return True
    try:
        parsed = _parse(url)
    except ValueError:
        return False
    host = _query_value(parsed, "host") or parsed.host or ""
    return host == "" or host.startswith("/") or host in ("localhost", "127.0.0.1", "::1")


def _query_value(parsed: URL, name: str) -> str | None:
    value = parsed.query.get(name)
    if isinstance(value, tuple):  # repeated: libpq keeps the last one
        value = value[-1]
    return value


def _options(text: str) -> dict[str, str]:
    """libpq's `options` (`-c name=value --other=value`) as server settings."""
    settings: dict[str, str] = {}
    words = iter(shlex.split(text))
    for word in words:
        if word == "-c":
            word = next(words, "")
        elif word.startswith("-c") or word.startswith("--"):
            word = word[2:]
        else:
            raise ValueError(f"options: only -c name=value is supported, not {word!r}")
        name, equals, value = word.partition("=")
        if not equals or not name:
            raise ValueError(f"options: expected -c name=value, not {word!r}")
        settings[name.replace("-", "_")] = value
    return settings


def _ssl(mode: str | None, rootcert: str | None, cert: str | None,
         key: str | None) -> ssl.SSLContext | str | None:
    if mode is not None and mode not in SSL_MODES:
        raise ValueError(f"sslmode: one of {', '.join(SSL_MODES)}, not {mode!r}")
    if rootcert is None and cert is None:
        return mode
    if mode in ("disable", "allow", "prefer"):
        return mode
    # libpq verifies the server against sslrootcert once it is given, even with `require`;
    # it checks the host name only with verify-full.
    context = ssl.create_default_context(cafile=rootcert)
    context.check_hostname = mode == "verify-full"
    if cert is not None:
        context.load_cert_chain(cert, key)
    return context


def connect_arguments(url: str) -> tuple[str, dict[str, Any]]:
    """The SQLAlchemy URL without libpq's own parameters, and those parameters as
    asyncpg.connect() takes them: `sslmode`/`sslrootcert`/`sslcert`/`sslkey` as `ssl`,
    `connect_timeout` as `timeout`, `application_name` and `options` as server settings.
    A bad value is a ValueError that names the parameter."""
    parsed = _parse(url)
    server_settings = dict(SESSION_SETTINGS)
    arguments: dict[str, Any] = {}
    ssl_context = _ssl(*(_query_value(parsed, n) for n in
                         ("sslmode", "sslrootcert", "sslcert", "sslkey")))
    if ssl_context is not None:
        arguments["ssl"] = ssl_context
    timeout = _query_value(parsed, "connect_timeout")
    if timeout is not None:
        try:
            seconds = float(timeout)
        except ValueError:
            raise ValueError(f"connect_timeout: a number of seconds, not {timeout!r}") from None
        # libpq treats 0 (and less) as no timeout; asyncpg wants a positive number.
        if seconds > 0:
            arguments["timeout"] = max(seconds, 2.0)  # libpq's own minimum
    options = _query_value(parsed, "options")
    if options is not None:
        server_settings.update(_options(options))
    name = _query_value(parsed, "application_name")
    if name is not None:
        server_settings["application_name"] = name
    arguments["server_settings"] = server_settings
    rest = parsed.difference_update_query(LIBPQ_PARAMETERS)
    return rest.render_as_string(hide_password=False), arguments


def libpq_url(url: str) -> str:
    """The same URL for libpq clients such as `psql`."""
    parsed = make_url(sqlalchemy_url(url)).set(drivername="postgresql")
    return parsed.render_as_string(hide_password=False)


# Each engine's URL as libpq takes it, with its libpq parameters (sslmode, options...),
# which the engine's own URL has lost to asyncpg's arguments.
_libpq_urls: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


def libpq_url_of(engine: AsyncEngine) -> str:
    """The URL a libpq client (the ADBC driver of Arrow exports) reaches `engine`'s
    database with, as `exporter` by default in pg_stat_activity."""
    url = _libpq_urls.get(engine.sync_engine)
    if url is None:
        url = libpq_url(engine.url.render_as_string(hide_password=False))
    if "application_name=" not in url:
        separator = "&" if "?" in url else "?"
        url += f"{separator}application_name={quote(SESSION_SETTINGS['application_name'])}"
    return url


def create_engine(settings: Settings, url: str, *, instance: str | None = None) -> AsyncEngine:
    """`instance`: the server process's id, which every connection carries as the setting
    `exporter.instance` (the audit rows' default for their `instance` column)."""
    target, arguments = connect_arguments(url)
    if instance is not None:
        arguments["server_settings"]["exporter.instance"] = instance
    engine = create_async_engine(
        target,
        pool_size=settings.pool_size,
        max_overflow=settings.pool_max_overflow,
        pool_timeout=settings.pool_timeout,
        pool_pre_ping=True,
        connect_args=arguments,
    )
    event.listen(engine.sync_engine, "connect", _set_version_dependent_settings)
    _libpq_urls[engine.sync_engine] = libpq_url(url)
    # SQLAlchemy's asyncpg ping is BEGIN, `;`, ROLLBACK (for pgbouncer's transaction
    # mode): three round trips at every check-out, several on each export's way to its
    # first byte. One is enough to find a connection the server closed.
    setattr(engine.dialect, "do_ping", _ping)  # noqa: B010
    return engine


def _ping(dbapi_connection: Any) -> bool:
    try:
        await_(dbapi_connection.driver_connection.fetchrow(";"))
    except Exception as error:
        # As the adapter's own ping: the DBAPI error that tells the pool to reconnect.
        dbapi_connection._handle_exception(error)
    return True


def _set_version_dependent_settings(dbapi_connection: Any, record: object) -> None:
    if dbapi_connection.driver_connection.get_server_version().major >= CHECK_INTERVAL_SINCE:
        # Outside any transaction: a later rollback on the connection keeps it.
        dbapi_connection.run_async(lambda conn: conn.execute(CHECK_INTERVAL))


def create_single_engine(url: str) -> AsyncEngine:
    """An engine for one short job (migrations, the schema check): no pool kept."""
    target, arguments = connect_arguments(url)
    return create_async_engine(target, poolclass=NullPool, connect_args=arguments)


def create_replica_engine(settings: Settings) -> AsyncEngine | None:
    """The engine of the hot standby that exports read from, if one is configured.

    Only read-only transactions ever run on it (a standby refuses anything else), so
    an export's load, and its snapshot held for hours, stay off the primary.
    """
    if settings.replica_url is None:
        return None
    return create_engine(settings, settings.replica_url)


async def driver_connection(conn: AsyncConnection) -> object:
    """The asyncpg connection under a pooled SQLAlchemy connection (for COPY)."""
    raw = await conn.get_raw_connection()
    return raw.driver_connection
