"""The audit trail: one row per download, written when it starts and when it ends."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from exporter.tables import downloads

log = logging.getLogger(__name__)

COMPLETE, ABORTED, FAILED = "complete", "aborted", "failed"
# Seconds between the tries to record a download's end.
FINISH_RETRIES = (0.5, 1.0, 2.0)


@dataclass
class Download:
    """What is known of one download while it runs."""

    kind: str  # export | file
    target: str
    client: str | None
    format: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    range: str | None = None
    id: int | None = None
    bytes: int = 0
    rows: int | None = None
    principal: str | None = None
    link_expires: datetime | None = None
    started: float = field(default_factory=time.monotonic)


class Audit:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def start(self, d: Download) -> None:
        async with self._engine.begin() as conn:
            d.id = await conn.scalar(
                sa.insert(downloads)
                .values(kind=d.kind, target=d.target, format=d.format, params=d.params,
                        range=d.range, client=d.client, status="running",
                        principal=d.principal, link_expires=d.link_expires)
                .returning(downloads.c.id)
            )

    async def finish(
        self, d: Download, status: str, *, http_status: int | None = None,
        error: str | None = None,
    ) -> None:
        if d.id is None:
            return
        log_finished(d, status, http_status)
        # Usually at once; when the pool or the database is briefly short, a few more
        # tries (this runs apart from any request), so that no row stays `running`.
        for wait in (*FINISH_RETRIES, None):
            try:
                async with self._engine.begin() as conn:
                    await conn.execute(
                        sa.update(downloads)
                        .where(downloads.c.id == d.id)
                        .values(status=status, http_status=http_status, rows=d.rows,
                                bytes=d.bytes, error=error, ended_at=sa.func.now())
                    )
                return
            except Exception:
                if wait is None:
                    # The download itself is over; losing its audit row must not break serving.
                    log.exception("could not record the end of download %s", d.id)
                    return
                log.warning("could not record the end of download %s yet; retrying", d.id)
                await asyncio.sleep(wait)


def log_finished(d: Download, status: str, http_status: int | None) -> None:
    """One log line per finished download; its fields also as `download` for JSON logs."""
    fields = {"id": d.id, "principal": d.principal or "anonymous", "kind": d.kind,
              "target": d.target, "bytes": d.bytes, "status": status,
              "http_status": http_status,
              "duration": round(time.monotonic() - d.started, 3)}
    log.info("download %(id)s %(status)s: %(principal)s %(kind)s %(target)s,"
             " %(bytes)d bytes in %(duration).3f s", fields, extra={"download": fields})


async def close_abandoned(engine: AsyncEngine) -> int:
    """At start: the rows left `running` by server processes whose lease ran out (killed,
    host lost) are closed as aborted; how many. Rows of live processes, and rows written
    before processes had ids, stay as they are."""
    async with engine.begin() as conn:
        result = await conn.execute(sa.text(
            "UPDATE exporter.downloads d SET status = :aborted, ended_at = now(),"
            " error = 'the server process ended during the download'"
            " WHERE d.status = 'running' AND d.instance IS NOT NULL"
            " AND NOT EXISTS (SELECT 1 FROM exporter.instances i"
            "                 WHERE i.id = d.instance AND i.expires_at > now())"),
            {"aborted": ABORTED})
    return int(result.rowcount)
