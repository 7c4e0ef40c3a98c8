"""`exporter downloads`, and the demo dataset that `exporter demo` and `serve` load."""

from __future__ import annotations

import enum
import logging
from datetime import UTC, datetime
from typing import Annotated, Any

import sqlalchemy as sa
import typer
from sqlalchemy.ext.asyncio import AsyncEngine

from exporter.access.durations import parse_duration
from exporter.clikit import fail, print_table, start, when, with_engine
from exporter.config import Settings
from exporter.tables import downloads as downloads_table

log = logging.getLogger(__name__)


class Status(enum.StrEnum):
    running = "running"
    complete = "complete"
    aborted = "aborted"
    failed = "failed"
    proxied = "proxied"


def downloads(
    since: Annotated[str | None, typer.Option(
        "--since", metavar="WHEN", help="a duration (1h, 7d) or an ISO date")] = None,
    principal: Annotated[str | None, typer.Option(
        "--principal", metavar="PRINCIPAL",
        help='e.g. "token alice", "link by alice", "anonymous"')] = None,
    status: Annotated[Status | None, typer.Option("--status")] = None,
    limit: Annotated[int, typer.Option("--limit", metavar="N", min=0)] = 50,
) -> None:
    settings = start()
    d = downloads_table.c
    query = sa.select(d.id, d.started_at, d.principal, d.kind, d.target, d.format, d.range,
                      d.status, d.http_status, d.rows, d.bytes, d.client)
    if since:
        try:
            start_at = datetime.now(UTC) - parse_duration(since)
        except ValueError:
            try:
                start_at = datetime.fromisoformat(since)
            except ValueError:
                fail(f"exporter downloads: --since {since!r} is neither a duration"
                     " (1h, 7d) nor an ISO date (2026-11-24, 2026-11-24T10:00Z)")
        query = query.where(d.started_at >= start_at)
    if principal:
        query = query.where(d.principal == principal)
    if status:
        query = query.where(d.status == status.value)
    query = query.order_by(d.id.desc()).limit(limit)

    async def read(engine: AsyncEngine) -> list[Any]:
        async with engine.connect() as conn:
            return list((await conn.execute(query)).all())

    rows = with_engine(settings, "downloads", read)
    print_table(
        ["id", "started", "principal", "kind", "target", "format", "range", "status", "http",
         "rows", "bytes", "client"],
        [[r.id, when(r.started_at), r.principal or "-", r.kind, r.target, r.format or "-",
          r.range or "-", r.status, r.http_status or "-", "-" if r.rows is None else r.rows,
          r.bytes, r.client or "-"] for r in rows],
    )


async def load_demo(settings: Settings, url: str, rows: int, *, only_if_empty: bool) -> bool:
    """(Re)load the demo dataset; with `only_if_empty`, only into a schema without any."""
    from exporter.db import create_engine
    from exporter.exports import demo

    engine = create_engine(settings, url)
    try:
        if only_if_empty:
            if await demo.has_datasets(engine, settings.dataset_schema):
                return False
            # A first start: the only time it waits for this.
            log.info("loading %d demo rows into %s.orders", rows, settings.dataset_schema)
        await demo.load(engine, settings.dataset_schema, rows)
        return True
    finally:
        await engine.dispose()


def register(app: typer.Typer) -> None:
    app.command("downloads", help="the recent downloads, from the audit trail")(downloads)
