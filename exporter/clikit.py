"""What every `exporter` command shares: settings, the database it runs against, the
schema check, one-line refusals and plain tables.

Core: the features' command modules import this, never `exporter.cli` (which imports
them, and which `python -m exporter.cli` runs as `__main__`, a second copy)."""

from __future__ import annotations

import asyncio
import logging
import logging.config
import os
import re
import sys
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from exporter import __version__
from exporter.config import Settings
from exporter.server.logs import log_config

if TYPE_CHECKING:
    from alembic.config import Config
    from pydantic import ValidationError
    from pydantic_settings import SettingsError
    from sqlalchemy.ext.asyncio import AsyncEngine

T = TypeVar("T")



def _migrations() -> Path:
    """Alembic's folder: in an installed wheel, `exporter/migrations` (pyproject.toml maps
    the checkout's top-level folder there); in a checkout, `migrations/` beside the
    package and alembic.ini. The package's own comes first: a folder beside an installed
    package would be another distribution's."""
    package = Path(__file__).resolve().parent
    installed = package / "migrations"
    if (installed / "env.py").is_file():
        return installed
    return package.parent / "migrations"


MIGRATIONS = _migrations()

# SQLSTATEs of a refused connection: classes 08 (connection exception), 28 (bad
# authorisation) and 3D (no such database), too many clients, and the server starting
# or shutting down (57P01-57P03; not 57014, a cancelled query).
REFUSED = ("08", "28", "3D", "53300", "57P")

# Set by `exporter.cli.main`: logging is the process's, so only a process of its own
# configures it (a test's in-process runner keeps pytest's).
_own_process = False


def own_process() -> None:
    global _own_process
    _own_process = True


def fail(message: str, status: int = 2) -> NoReturn:
    """Bad input: one line on stderr and exit status 2 by default; no traceback."""
    print(message, file=sys.stderr)
    raise SystemExit(status)


def start(options: Mapping[str, tuple[str, str | None]] | None = None) -> Settings:
    """A command's first step: the settings (one line per mistake, status 2), and logging.

    `options` are the command's options that stand for a setting, by the setting's name:
    (the option, its value as typed or None when not given). A given one is checked
    exactly as its EXPORTER_ variable is (one line naming the option) and overrides it."""
    settings = load_settings(options or {})
    if _own_process:
        logging.config.dictConfig(log_config(settings.log_format))
    return settings


def load_settings(options: Mapping[str, tuple[str, str | None]] | None = None) -> Settings:
    """The settings, or one line per mistake naming its variable (or option) and exit
    status 2."""
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    given: dict[str, Any] = {name: value for name, (_, value) in (options or {}).items()
                             if value is not None}
    flags = {name: flag for name, (flag, value) in (options or {}).items() if value is not None}
    try:
        # Given as text, as the environment gives them: the same parsing, the same checks.
        return Settings(**given)
    except (ValidationError, SettingsError) as error:
        for line in settings_errors(error, flags):
            print(f"exporter: {line}", file=sys.stderr)
        raise SystemExit(2) from None


def settings_errors(error: ValidationError | SettingsError,
                    flags: Mapping[str, str] | None = None) -> list[str]:
    """One line per mistake, naming the variable, or the option (`flags`, by setting) that
    gave the value."""
    from pydantic import ValidationError

    if not isinstance(error, ValidationError):
        # pydantic-settings could not decode a value (a JSON list): its message names the
        # field, e.g. 'error parsing value for field "cors_origins" from source ...'.
        field = re.search(r'field "(\w+)"', str(error))
        name = f"EXPORTER_{field[1].upper()}" if field else "an EXPORTER_ variable"
        return [f"{name}: not valid JSON (a list such as [\"a\", \"b\"])"]
    lines = []
    for problem in error.errors(include_url=False, include_input=False):
        where = str(problem["loc"][0]) if problem["loc"] else ""
        name = (flags or {}).get(where) or (where if where.startswith("EXPORTER_") else (
            f"EXPORTER_{where.upper()}" if where else ""))
        message = str(problem["msg"]).removeprefix("Value error, ")
        lines.append(f"{name}: {message}" if name else message)
    return lines


def connection_failure(error: BaseException) -> str | None:
    """Why the database could not be used, if that is what `error` says; else None."""
    seen: BaseException | None = error
    while seen is not None:
        sqlstate = getattr(seen, "sqlstate", None)
        if isinstance(sqlstate, str) and sqlstate.startswith(REFUSED):
            return str(seen).splitlines()[0] if str(seen) else type(seen).__name__
        # Socket errors and time-outs count only when the driver raised them: an
        # OSError of the files root is not the database's.
        if isinstance(seen, OSError | TimeoutError) and _raised_by_driver(seen):
            return str(seen) or type(seen).__name__
        seen = seen.__cause__ or getattr(seen, "orig", None)
    return None


def _raised_by_driver(error: BaseException) -> bool:
    trace = error.__traceback__
    while trace is not None:
        if f"{os.sep}asyncpg{os.sep}" in trace.tb_frame.f_code.co_filename:
            return True
        trace = trace.tb_next
    return False


@contextmanager
def database(settings: Settings, command: str) -> Iterator[str]:
    """The configured database URL, or the embedded server's while it runs; a database
    that cannot be used stops `exporter COMMAND` with one line and status 1."""
    from exporter.db import DatabaseUnavailable

    try:
        with _database(settings) as url:
            yield url
    except DatabaseUnavailable as error:
        fail(f"exporter {command}: {error}", 1)


@contextmanager
def _database(settings: Settings) -> Iterator[str]:
    if settings.database_url:
        with _explained(settings.database_url):
            yield settings.database_url
        return
    from exporter.embedded import EmbeddedPostgres

    embedded = EmbeddedPostgres(settings.pgdata)
    try:
        url = embedded.start()
        with _explained(url):
            yield url
    finally:
        embedded.stop()


@contextmanager
def _explained(url: str) -> Iterator[None]:
    try:
        yield
    except Exception as error:
        reason = connection_failure(error)
        if reason is None:
            raise
        from sqlalchemy.engine import make_url

        from exporter.db import DatabaseUnavailable, safe_url

        password = make_url(url).password
        if password:
            reason = reason.replace(str(password), "***")
        raise DatabaseUnavailable(f"cannot use the database {safe_url(url)}: {reason}") from None


def alembic_config(url: str) -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["database_url"] = url
    return config


def migrate(url: str) -> None:
    """Upgrade to head; instances that start together take turns (see migrations/env.py)."""
    from alembic import command

    from exporter.db import require_supported_server

    require_supported_server(url)
    command.upgrade(alembic_config(url), "head")


def schema_revisions(url: str) -> tuple[set[str], set[str]]:
    """The database's revisions and the migrations' heads."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory
    from sqlalchemy.engine import Connection

    from exporter.db import create_single_engine
    from exporter.tables import APP_SCHEMA

    heads = set(ScriptDirectory.from_config(alembic_config(url)).get_heads())

    def current(conn: Connection) -> set[str]:
        context = MigrationContext.configure(conn, opts={"version_table_schema": APP_SCHEMA})
        return set(context.get_current_heads())

    async def read() -> set[str]:
        engine = create_single_engine(url)
        try:
            async with engine.connect() as conn:
                return await conn.run_sync(current)
        finally:
            await engine.dispose()

    # A read-only look: Alembic's "Context impl PostgresqlImpl" lines would only be noise.
    chatty = logging.getLogger("alembic.runtime.migration")
    level = chatty.level
    chatty.setLevel(logging.WARNING)
    try:
        return asyncio.run(read()), heads
    finally:
        chatty.setLevel(level)


def require_schema_at_head(url: str, command: str) -> None:
    """The commands other than serve, migrate and demo never migrate: they stop here,
    with status 2, when the schema is not the one this version of exporter expects."""
    from alembic.script import ScriptDirectory

    from exporter.db import require_supported_server

    require_supported_server(url)
    revisions, heads = schema_revisions(url)
    if revisions == heads:
        return
    known = {s.revision for s in ScriptDirectory.from_config(alembic_config(url)).walk_revisions()}
    at = ", ".join(sorted(revisions)) or "none"
    if revisions - known:
        fail(f"exporter {command}: the database schema is at revision {at}, newer than this"
             f" exporter {__version__} knows (head {', '.join(sorted(heads))}): upgrade exporter")
    fail(f"exporter {command}: the database schema is behind (revision {at}, head"
         f" {', '.join(sorted(heads))}): run exporter migrate")


def with_engine(settings: Settings, command: str,
                work: Callable[[AsyncEngine], Awaitable[T]]) -> T:
    """`work` on an engine of the database, whose schema must be at head already."""
    from exporter.db import create_engine

    with database(settings, command) as url:
        # Never migrates: an operator's command must not change the schema behind a
        # running server's back (`exporter migrate` and `serve` do, under a lock).
        require_schema_at_head(url, command)

        async def run() -> T:
            engine = create_engine(settings, url)
            try:
                return await work(engine)
            finally:
                await engine.dispose()

        return asyncio.run(run())


def when(moment: datetime | None) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ") if moment else "-"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for i, row in enumerate(cells):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
