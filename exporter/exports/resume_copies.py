"""Stored copies of streamed exports, as this feature sees them: what lets a broken
download resume without splicing two snapshots.

A streamed export (identity bytes only) writes every chunk it sends into a copy first;
if its client leaves, the COPY goes on into the copy to the end (at COPY speed, within
the storage quota and the export's time limit): exports/resume_writer.py. A later
`Range` request for the same URL is answered from that copy when it provably continues
it (exporter.stored decides and serves; this feature only asks). The store sits above
this feature and is reached through `State.resume_copies`.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from fastapi import Request, Response

    from exporter.access.principal import Principal


class ResumeCopyStopped(Exception):
    """The copy cannot go on (over the storage quota, deleted): the export goes on
    without it."""


class ResumeCopy(Protocol):
    id: str  # also the strong ETag of the export it copies, and its stored file's

    async def write(self, chunk: bytes) -> None:
        """Append `chunk`; ResumeCopyStopped if the copy cannot go on (it is then dropped)."""

    async def left(self, delivered: int) -> None:
        """The response ended (whole or cut) after sending `delivered` bytes."""

    async def finish(self, rows: int | None) -> None:
        """The COPY ran out: the copy is whole."""

    async def fail(self, reason: str) -> None:
        """No whole copy will come (a failure, a shutdown): drop it, say why."""


class ResumeCopies(Protocol):
    def begin(self, principal: Principal, *, url: str, dataset: str,
              format: str, content_type: str, filename: str,
              snapshot_time: datetime, cursor: str | None = None) -> ResumeCopy:
        """A copy of the export of `url` (its representation's canonical URL,
        exports/request.py) as the principal streams it, its id known at once: what it
        needs (room in the quota, a row, a file) is made while the first chunk leaves,
        and a copy that cannot have them stops at its first write. `cursor`: its
        Export-Cursor, if any."""

    async def resume(self, request: Request, principal: Principal, url: str
                     ) -> Response | None:
        """The answer to this `Range` request from a copy of `url` it provably
        continues, or None (then the export is streamed whole, from a new snapshot, as a
        200)."""

    def location(self, request: Request, copy: ResumeCopy) -> str:
        """The copy's own URL (Content-Location)."""
