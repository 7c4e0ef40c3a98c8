"""Stored copies of streamed exports, as this feature sees them: what lets a broken
download resume without splicing two snapshots.

A streamed export (identity bytes only) writes every chunk it sends into a copy first;
if its client leaves, the COPY goes on into the copy to the end (at COPY speed, within
the storage quota and the export's time limit): exports/resume_writer.py. A later
`Range` request for the same URL is answered from that copy when it provably continues
it (exporter.stored decides and serves; this feature only asks). The store sits above
this feature and is reached through `Exports.resume_copies` (exports/context.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from exporter.access.principal import Principal
    from exporter.streaming import Client


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


@dataclass(frozen=True)
class Continuation:
    """The copy a `Range` request provably continues: served from `offset` (None: the
    If-Range answer the copy's file gives), to `principal`."""

    copy_id: str
    offset: int | None
    principal: Principal


class ResumeCopies(Protocol):
    def begin(self, principal: Principal, *, url: str, dataset: str,
              format: str, content_type: str, filename: str,
              snapshot_time: datetime, cursor: str | None = None) -> ResumeCopy:
        """A copy of the export of `url` (its representation's canonical URL,
        exports/request.py) as the principal streams it, its id known at once: what it
        needs (room in the quota, a row, a file) is made while the first chunk leaves,
        and a copy that cannot have them stops at its first write. `cursor`: its
        Export-Cursor, if any."""

    async def find(self, client: Client, principal: Principal, url: str, byte_range: str,
                   if_range: str | None) -> Continuation | None:
        """The copy of `url` this `Range` request (`byte_range`, and its If-Range)
        provably continues, or None (then the export is streamed whole, from a new
        snapshot, as a 200); ClientLeft if the client left while it was looked for."""

    def location(self, copy: ResumeCopy) -> str:
        """The copy's own path (Content-Location, below the server's prefix)."""
