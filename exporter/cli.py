"""The `exporter` command: serve, migrate, demo, digest."""

from __future__ import annotations

import argparse
import asyncio
import logging
import logging.config
import os
import re
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from exporter import __version__
from exporter.access.cli import add_commands as add_access_commands
from exporter.config import Settings
from exporter.server.logs import log_config

if TYPE_CHECKING:
    from alembic.config import Config
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

log = logging.getLogger("exporter")

# Inside the package, so that a wheel carries them (alembic.ini at the top points here too).
MIGRATIONS = Path(__file__).resolve().parent / "migrations"
DEFAULT_DEMO_ROWS = 1_000_000
DEFAULT_DEMO_FILE_SIZE = "1G"


# SQLSTATEs of a refused connection: classes 08 (connection exception), 28 (bad
# authorisation) and 3D (no such database), too many clients, and the server starting
# or shutting down (57P01-57P03; not 57014, a cancelled query).
REFUSED = ("08", "28", "3D", "53300", "57P")


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
def database(settings: Settings) -> Iterator[str]:
    """The configured database URL, or the embedded server's while it runs."""
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


def fail(message: str) -> NoReturn:
    print(message, file=sys.stderr)
    raise SystemExit(2)


async def _load_demo(settings: Settings, url: str, rows: int, only_if_empty: bool) -> bool:
    from exporter.db import create_engine
    from exporter.exports import demo

    engine = create_engine(settings, url)
    try:
        if only_if_empty and await demo.has_datasets(engine, settings.dataset_schema):
            return False
        await demo.load(engine, settings.dataset_schema, rows)
        return True
    finally:
        await engine.dispose()


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


async def _demo_token(settings: Settings, url: str) -> str:
    from exporter.access.cli import demo_token
    from exporter.db import create_engine

    engine = create_engine(settings, url)
    try:
        return await demo_token(engine, settings.data_dir / "demo-token")
    finally:
        await engine.dispose()


def cmd_serve(args: argparse.Namespace, settings: Settings) -> None:
    import uvicorn


    host = args.host or settings.host
    port = args.port or settings.port
    with database(settings) as url:
        migrate(url)
        if settings.embedded:
            log.info("checking the demo data (first start loads %d rows)", settings.demo_rows)
            asyncio.run(_load_demo(settings, url, settings.demo_rows, only_if_empty=True))
            if _default_files_root(settings):
                _demo_files(settings, settings.demo_file_size, only_if_empty=True)
            token = asyncio.run(_demo_token(settings, url))
        # Workers are separate processes: they find the database through the environment.
        os.environ["EXPORTER_DATABASE_URL"] = url
        base = f"http://{host}:{port}"
        print(f"\nexporter serves {base}  (Ctrl-C stops it)", flush=True)
        if settings.embedded:
            print(
                f"demo token (all datasets and files, admin), kept in"
                f" {settings.data_dir / 'demo-token'}:\n  {token}\n"
                f"  curl -fOJ -u demo:{token}"
                f" '{base}/datasets/orders.csv?paid=is.true&limit=1000'\n"
                f"  wget --content-disposition --user=demo --password={token}"
                f" '{base}/datasets/orders.ndjson?limit=1000'\n"
                f"  curl -s -H 'Authorization: Bearer {token}' {base}/datasets\n",
                flush=True,
            )
        else:
            print("make a token with `exporter token create --name NAME --scope datasets:*`\n",
                  flush=True)
        # uvicorn shuts down gracefully on SIGTERM and then raises it again; with the
        # default action that would kill us before the embedded database is stopped.
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
        uvicorn.run(
            "exporter.app:create_app", factory=True, host=host, port=port,
            workers=args.workers, log_level=args.log_level, access_log=args.access_log,
            log_config=log_config(settings.log_format, args.log_level),
            timeout_graceful_shutdown=settings.shutdown_grace, **server_limits(settings),
        )


def server_limits(settings: Settings) -> dict[str, Any]:
    """uvicorn's options for the bounds on clients (see exporter/server/guard.py)."""
    from exporter.server.guard import GuardedHttpToolsProtocol

    trusted = settings.forwarded_allow_ips.strip()
    return {
        "http": GuardedHttpToolsProtocol,
        # uvicorn answers 503 once `limit_concurrency` connections exist, the one asking
        # included: one more, so that the setting is the number served.
        "limit_concurrency": settings.max_connections + 1,
        "timeout_keep_alive": settings.keep_alive_timeout,
        # uvicorn believes 127.0.0.1 by default: a local process could pose as any client.
        "proxy_headers": bool(trusted),
        "forwarded_allow_ips": trusted or "",
    }


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> None:
    with database(settings) as url:
        migrate(url)


def _default_files_root(settings: Settings) -> bool:
    """The demo writes (a 1 GiB file, among others) only into its own folder: a files
    root that someone chose holds their files."""
    default: Path = Settings.model_fields["files_root"].default
    return settings.files_root == default


def _demo_files(settings: Settings, size: str, *, only_if_empty: bool) -> None:
    from exporter.files import demo

    root = settings.files_root
    if only_if_empty and not demo.is_empty(root):
        return
    log.info("creating the demo files in %s (large file: %s)", root, size)
    demo.create(root, demo.parse_size(size))


def cmd_demo(args: argparse.Namespace, settings: Settings) -> None:
    # The demo is the local setup command, like migrate: it may bring the schema to head.
    with database(settings) as url:
        migrate(url)
        asyncio.run(_load_demo(settings, url, args.rows, only_if_empty=False))
        print(f"loaded {args.rows} rows into {settings.dataset_schema}.orders")
    if not (args.files or _default_files_root(settings)):
        print(f"left EXPORTER_FILES_ROOT ({settings.files_root}) alone: pass --files to"
              " create the demo files there")
        return
    _demo_files(settings, args.file_size, only_if_empty=False)
    print(f"created the demo files in {settings.files_root}")


def cmd_digest(args: argparse.Namespace, settings: Settings) -> None:
    from exporter.files.digest_cli import compute_missing

    with database(settings) as url:
        require_schema_at_head(url, "digest")
        sys.exit(asyncio.run(compute_missing(settings, url, args.path)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="exporter",
        description="A download server for large files and PostgreSQL exports. "
        "Without EXPORTER_DATABASE_URL it runs an embedded PostgreSQL under ./var/.",
    )
    parser.add_argument("--version", action="version", version=f"exporter {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="migrate, load the demo data if empty, and serve")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default 8000)")
    serve.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    serve.add_argument("--log-level", default="info")
    serve.add_argument("--no-access-log", dest="access_log", action="store_false")
    serve.set_defaults(func=cmd_serve)

    mig = sub.add_parser("migrate", help="apply the database migrations")
    mig.set_defaults(func=cmd_migrate)

    demo = sub.add_parser("demo", help="(re)create the demo dataset")
    demo.add_argument("--rows", type=int, default=DEFAULT_DEMO_ROWS,
                      help=f"rows in exports.orders (default {DEFAULT_DEMO_ROWS:,})")
    demo.add_argument("--file-size", default=DEFAULT_DEMO_FILE_SIZE,
                      help="size of the large demo file, e.g. 256M or 2G "
                      f"(default {DEFAULT_DEMO_FILE_SIZE})")
    demo.add_argument("--files", action="store_true",
                      help="create the demo files even in a files root that is not the"
                      " default var/files (EXPORTER_FILES_ROOT)")
    demo.set_defaults(func=cmd_demo)

    digest = sub.add_parser("digest", help="compute the SHA-256 of files whose digest is "
                            "not known yet (or stale), with a progress bar")
    digest.add_argument("path", nargs="?", default="",
                        help="a file or folder under the files root (default: all of it)")
    digest.set_defaults(func=cmd_digest)
    add_access_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from exporter.db import DatabaseUnavailable

    settings = load_settings()
    logging.config.dictConfig(log_config(settings.log_format))
    try:
        args.func(args, settings)
    except DatabaseUnavailable as error:
        print(f"exporter {args.command}: {error}", file=sys.stderr)
        raise SystemExit(1) from None


def load_settings() -> Settings:
    """The settings, or one line per mistake naming its variable and exit status 2."""
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    try:
        return Settings()
    except (ValidationError, SettingsError) as error:
        for line in settings_errors(error):
            print(f"exporter: {line}", file=sys.stderr)
        raise SystemExit(2) from None


def settings_errors(error: ValidationError | SettingsError) -> list[str]:
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
        name = where if where.startswith("EXPORTER_") else (
            f"EXPORTER_{where.upper()}" if where else "")
        message = str(problem["msg"]).removeprefix("Value error, ")
        lines.append(f"{name}: {message}" if name else message)
    return lines


if __name__ == "__main__":
    main(sys.argv[1:])
