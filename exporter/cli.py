"""The `exporter` command: serve, migrate, demo, digest."""

from __future__ import annotations

import argparse
import asyncio
import logging
import logging.config
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from exporter.access.cli import add_commands as add_access_commands
from exporter.config import Settings
from exporter.logs import log_config

log = logging.getLogger("exporter")

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DEMO_ROWS = 1_000_000
DEFAULT_DEMO_FILE_SIZE = "1G"


@contextmanager
def database(settings: Settings) -> Iterator[str]:
    """The configured database URL, or the embedded server's while it runs."""
    if settings.database_url:
        yield settings.database_url
        return
    from exporter.embedded import EmbeddedPostgres

    embedded = EmbeddedPostgres(settings.pgdata)
    try:
        yield embedded.start()
    finally:
        embedded.stop()


def migrate(url: str) -> None:
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(ROOT / "migrations"))
    config.attributes["database_url"] = url
    command.upgrade(config, "head")


async def _load_demo(settings: Settings, url: str, rows: int, only_if_empty: bool) -> bool:
    from exporter import demo
    from exporter.db import create_engine

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
            log.info("checking the demo data (first start loads %d rows)", DEFAULT_DEMO_ROWS)
            asyncio.run(_load_demo(settings, url, DEFAULT_DEMO_ROWS, only_if_empty=True))
            _demo_files(settings, DEFAULT_DEMO_FILE_SIZE, only_if_empty=True)
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
    """uvicorn's options for the bounds on clients (see exporter/guard.py)."""
    from exporter.guard import GuardedHttpToolsProtocol

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


def _demo_files(settings: Settings, size: str, *, only_if_empty: bool) -> None:
    from exporter.files import demo

    root = settings.files_root
    if only_if_empty and not demo.is_empty(root):
        return
    log.info("creating the demo files in %s (large file: %s)", root, size)
    demo.create(root, demo.parse_size(size))


def cmd_demo(args: argparse.Namespace, settings: Settings) -> None:
    with database(settings) as url:
        migrate(url)
        asyncio.run(_load_demo(settings, url, args.rows, only_if_empty=False))
        print(f"loaded {args.rows} rows into {settings.dataset_schema}.orders")
    _demo_files(settings, args.file_size, only_if_empty=False)
    print(f"created the demo files in {settings.files_root}")


def cmd_digest(args: argparse.Namespace, settings: Settings) -> None:
    from exporter.files.digest_cli import compute_missing

    with database(settings) as url:
        migrate(url)
        sys.exit(asyncio.run(compute_missing(settings, url, args.path)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="exporter",
        description="A download server for large files and PostgreSQL exports. "
        "Without EXPORTER_DATABASE_URL it runs an embedded PostgreSQL under ./var/.",
    )
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
    settings = Settings()
    logging.config.dictConfig(log_config(settings.log_format))
    args.func(args, settings)


if __name__ == "__main__":
    main(sys.argv[1:])
