"""`exporter token`, `exporter link` and `exporter downloads`."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from exporter.access.durations import parse_duration
from exporter.access.links import OPERATOR, LinkKeys, sign, split_query
from exporter.access.principal import ADMIN, ALL_DATASETS, ALL_FILES, SCOPE_FORMS
from exporter.access.tokens import TokenStore
from exporter.config import Settings
from exporter.server.prefix import strip_root
from exporter.tables import downloads

DEMO_TOKEN_NAME = "demo"
DEMO_SCOPES = [ALL_DATASETS, ALL_FILES, ADMIN]


def _with_engine(settings: Settings, work: Callable[[AsyncEngine], Awaitable[Any]],
                 command: str) -> Any:
    from exporter.cli import database, require_schema_at_head
    from exporter.db import create_engine

    with database(settings) as url:
        # Never migrates: an operator's command must not change the schema behind a
        # running server's back (`exporter migrate` and `serve` do, under a lock).
        require_schema_at_head(url, command)

        async def run() -> Any:
            engine = create_engine(settings, url)
            try:
                return await work(engine)
            finally:
                await engine.dispose()

        return asyncio.run(run())


def usage_error(message: str) -> NoReturn:
    """Bad input: one line on stderr and exit status 2, as argparse does; no traceback."""
    print(message, file=sys.stderr)
    raise SystemExit(2)


def _duration(command: str, text: str) -> timedelta:
    try:
        return parse_duration(text)
    except ValueError as error:
        usage_error(f"{command}: {error}")


def _when(moment: datetime | None) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ") if moment else "-"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for i, row in enumerate(cells):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


def cmd_token(args: argparse.Namespace, settings: Settings) -> None:
    # Checked before the database starts: a typo costs nothing.
    expires = _duration("exporter token", args.expires) if getattr(args, "expires", None) else None

    async def work(engine: AsyncEngine) -> None:
        store = TokenStore(engine)
        if args.action == "create":
            secret = await store.create(args.name, args.scope, expires)
            print(secret)
            print(f"token {args.name!r} created; it is shown this once", file=sys.stderr)
        elif args.action == "revoke":
            if not await store.revoke(args.name):
                raise SystemExit(f"no active token named {args.name!r}")
            print(f"token {args.name!r} revoked", file=sys.stderr)
        else:
            rows = [(t.name, " ".join(t.scopes), _when(t.created_at), _when(t.expires_at),
                     _when(t.last_used_at), _when(t.revoked_at), t.state)
                    for t in await store.list()]
            print_table(["name", "scopes", "created", "expires", "last used", "revoked",
                         "state"], rows)

    try:
        _with_engine(settings, work, "token")
    except ValueError as error:  # a bad name or scope, or the name is taken
        usage_error(f"exporter token: {error}")


def cmd_link(args: argparse.Namespace, settings: Settings) -> None:
    if args.target == "rotate-key":
        if settings.link_secret:
            raise SystemExit("EXPORTER_LINK_SECRET is set: change it to rotate the key")
        _with_engine(settings, lambda engine: LinkKeys(engine, None).rotate(), "link")
        print("link signing key rotated: every link made before no longer works",
              file=sys.stderr)
        return
    try:
        url = urlsplit(args.target)
    except ValueError as error:
        usage_error(f"exporter link: not a URL: {error}")
    # A URL as users see it, behind a proxy, carries EXPORTER_ROOT_PATH: signed without it.
    path = strip_root(url.path, settings.root_path)
    if not path.startswith(("/datasets/", "/files/")):
        usage_error("exporter link: give a URL or path under /datasets/ or /files/")
    if split_query(url.query)[1]:
        usage_error("exporter link: the URL is already signed (or names a ~ parameter of"
                    " signed links)")
    base = f"{url.scheme}://{url.netloc}" if url.netloc else (
        f"http://{settings.host}:{settings.port}")
    expires_at = datetime.now(UTC) + _duration("exporter link", args.expires)

    async def work(engine: AsyncEngine) -> str:
        key = await LinkKeys(engine, settings.link_secret).key()
        return sign(key, path, url.query, expires_at, OPERATOR, OPERATOR)

    root = url.path[:len(url.path) - len(path)]  # the prefix, kept where it was given
    print(base + root + _with_engine(settings, work, "link"))
    print(f"valid until {_when(expires_at)}", file=sys.stderr)


def cmd_downloads(args: argparse.Namespace, settings: Settings) -> None:
    d = downloads.c
    query = sa.select(d.id, d.started_at, d.principal, d.kind, d.target, d.format, d.range,
                      d.status, d.http_status, d.rows, d.bytes, d.client)
    if args.since:
        try:
            since = datetime.now(UTC) - parse_duration(args.since)
        except ValueError:
            try:
                since = datetime.fromisoformat(args.since)
            except ValueError:
                usage_error(f"exporter downloads: --since {args.since!r} is neither a duration"
                            " (1h, 7d) nor an ISO date (2026-11-24, 2026-11-24T10:00Z)")
        query = query.where(d.started_at >= since)
    if args.principal:
        query = query.where(d.principal == args.principal)
    if args.status:
        query = query.where(d.status == args.status)
    query = query.order_by(d.id.desc()).limit(args.limit)

    async def work(engine: AsyncEngine) -> list[Any]:
        async with engine.connect() as conn:
            return list((await conn.execute(query)).all())

    rows = _with_engine(settings, work, "downloads")
    print_table(
        ["id", "started", "principal", "kind", "target", "format", "range", "status", "http",
         "rows", "bytes", "client"],
        [[r.id, _when(r.started_at), r.principal or "-", r.kind, r.target, r.format or "-",
          r.range or "-", r.status, r.http_status or "-", "-" if r.rows is None else r.rows,
          r.bytes, r.client or "-"] for r in rows],
    )


def add_commands(sub: Any) -> None:
    token = sub.add_parser("token", help="create, list and revoke API tokens")
    actions = token.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="print a new token (shown once)")
    create.add_argument("--name", required=True)
    create.add_argument("--scope", action="append", required=True,
                        help=f"{SCOPE_FORMS}; repeat for several")
    create.add_argument("--expires", help="lifetime such as 30d or 12h (default: none)")
    actions.add_parser("list", help="name, scopes, created, expires, last used, revoked")
    revoke = actions.add_parser("revoke", help="stop a token at once, everywhere")
    revoke.add_argument("name")
    token.set_defaults(func=cmd_token)

    link = sub.add_parser("link", help="print a signed, expiring URL; or `link rotate-key`")
    link.add_argument("target", metavar="URL|rotate-key",
                      help="a URL or path under /datasets/ or /files/, with its query")
    link.add_argument("--expires", default="15m", help="lifetime (default 15m)")
    link.set_defaults(func=cmd_link)

    recent = sub.add_parser("downloads", help="the recent downloads, from the audit trail")
    recent.add_argument("--since", help="a duration (1h, 7d) or an ISO date")
    recent.add_argument("--principal", help='e.g. "token alice", "link by alice", "anonymous"')
    recent.add_argument("--status", choices=["running", "complete", "aborted", "failed", "proxied"])
    recent.add_argument("--limit", type=int, default=50)
    recent.set_defaults(func=cmd_downloads)


async def demo_token(engine: AsyncEngine, path: Path) -> str:
    """The local demo's token, kept in the data folder beside the database it opens."""
    store = TokenStore(engine)
    kept = path.read_text().strip() if path.exists() else ""  # noqa: ASYNC240 - tiny, at start-up
    if kept and await store.principal(kept) is not None:
        return kept
    await store.revoke(DEMO_TOKEN_NAME)
    secret = await store.create(DEMO_TOKEN_NAME, DEMO_SCOPES, None)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(secret + "\n")
    return secret
