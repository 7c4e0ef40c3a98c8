"""The audit trail: one row per download, written when it starts and when it ends."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from exporter.tables import downloads

log = logging.getLogger(__name__)

COMPLETE, ABORTED, FAILED = "complete", "aborted", "failed"
# A file handed to the reverse proxy (X-Accel-Redirect): it sends the bytes, so the row
# ends when the app's part does, with no byte count.
PROXIED = "proxied"
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
