"""The stored copies of streamed exports (exports/resume_copies.py's interface), and the rule
that decides when a `Range` request on an export URL continues one.

Why it works this way: docs/internals.md, section `stored/resume_copies.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncGenerator, AsyncIterator
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from exporter.access.durations import parse_duration
from exporter.access.principal import Principal
from exporter.errors import ApiError, without_paths
from exporter.exports.resume_copies import Continuation, ResumeCopyStopped
from exporter.stored.service import StoredService
from exporter.stored.store import (
    COMPLETE,
    EXPIRED,
    RUNNING,
    STREAMED,
    Promised,
    Writer,
    WriterStopped,
    owner_of,
)
from exporter.streaming import Client, run_detached, unless_disconnected
from exporter.tables import stored_exports as t

log = logging.getLogger(__name__)

OPEN_RANGE = re.compile(r"bytes=(\d{1,19})-")
STRONG_ETAG = re.compile(r'"([A-Za-z0-9_-]{1,64})"')
# How long a resume waits for the copy it continues: for the cut response to record how
# far it got, then for the copy's completion (at COPY speed, usually seconds).
LEFT_WAIT = 10.0
COMPLETE_WAIT = 120.0
CANDIDATES = 100
COMPARE_CHUNK = 1024 * 1024


def _may_hold(row: Any, offset: int) -> bool:
    """Whether the client's first `offset` bytes may be this response's: it sent at least
    that many. Sent whole counts too: sent is written to the socket, not received, and a
    client killed with the rest in its buffers holds a part of a response sent whole."""
    return row.delivered is not None and row.delivered >= offset


class StoredResumeCopy:
    """A copy whose id (its ETag) is known at once; its row and file are made when first
    needed (the first write, once the first chunk is on its way), and every method waits
    for them."""

    def __init__(self, copies: StoredResumeCopies, promised: Promised, dataset: str,
                 snapshot_time: datetime, cursor: str | None = None) -> None:
        self.id = promised.id
        self._copies = copies
        self._promised = promised
        self._dataset = dataset
        self._snapshot_time = snapshot_time
        self._cursor = cursor
        self._told = False  # why there is no copy, logged once

    async def _writer(self) -> Writer | None:
        """The copy's writer, once its row and file exist; None if they could not be
        made (the export goes on without a copy)."""
        try:
            # Shielded: a client that leaves meanwhile does not leave a row half made.
            return await asyncio.shield(self._promised.task())
        except ApiError as error:  # the quota is full, the storage or database refuses
            reason = error.message
        except Exception as error:
            reason = f"{type(error).__name__}: {error}"
        if not self._told:
            self._told = True
            log.info("a streamed export of %s goes without a copy: %s", self._dataset, reason)
        return None

    async def write(self, chunk: bytes) -> None:
        writer = await self._writer()
        if writer is None:
            raise ResumeCopyStopped("the copy could not be begun")
        try:
            await writer.write(chunk)
        except WriterStopped as stop:
            raise ResumeCopyStopped(str(stop)) from None
        except OSError as error:
            # A full or failing disk costs the export its copy (resuming), never the
            # download itself.
            raise ResumeCopyStopped(f"the copy could not be written: {without_paths(error)}"
                              ) from None

    async def left(self, delivered: int) -> None:
        if await self._writer() is not None:
            await self._copies.record_delivered(self.id, delivered)

    async def finish(self, rows: int | None) -> None:
        writer = await self._writer()
        if writer is None:
            return
        try:
            await writer.finish(rows, self._snapshot_time, self._cursor)
        except WriterStopped as stop:
            log.info("copy %s: %s", self.id, stop)
            return
        except OSError as error:
            # Its file could not be made durable: no copy to resume from, the export
            # itself is done.
            log.warning("copy %s could not be kept: %s", self.id, error)
            with contextlib.suppress(Exception):
                await writer.fail(f"the copy could not be kept: {without_paths(error)}")
            return
        await self._copies.keep_for_resuming(self.id)

    async def fail(self, reason: str) -> None:
        writer = await self._writer()
        if writer is not None:
            await writer.fail(reason)


class StoredResumeCopies:
    """What the exports feature asks of the stored exports for resuming."""

    def __init__(self, service: StoredService) -> None:
        self._service = service
        settings = service.settings
        self._retention = parse_duration(settings.exports_resume_retention)
        self._whole_retention = parse_duration(settings.exports_resume_complete_retention)

    def begin(self, principal: Principal, *, url: str, dataset: str,
              format: str, content_type: str, filename: str,
              snapshot_time: datetime, cursor: str | None = None) -> StoredResumeCopy:
        # Its row and file are made once the export's first chunk is on its way (its
        # first write): a quota check, an insert and a file are no part of the time to
        # the first byte.
        promised = self._service.begin_soon(
            principal, url=url, dataset=dataset, format=format, coding=None,
            content_type=content_type, filename=filename, kind=STREAMED)
        return StoredResumeCopy(self, promised, dataset, snapshot_time, cursor)

    def location(self, copy: Any) -> str:
        return f"/exports/{copy.id}/file"

    async def record_delivered(self, copy_id: str, delivered: int) -> None:
        most = sa.func.greatest(sa.func.coalesce(t.c.delivered, 0), delivered)
        # Sent whole at last (a resume that ran to the end): kept only briefly from now.
        brief = sa.func.least(t.c.expires, sa.func.now() + self._whole_retention)
        try:
            async with self._service.engine.begin() as conn:
                await conn.execute(
                    sa.update(t).where(t.c.id == copy_id)
                    .values(delivered=most, expires=sa.case(
                        ((t.c.status == COMPLETE) & (most >= t.c.bytes), brief),
                        else_=t.c.expires)))
        except Exception as error:
            # Without it the copy is not offered for a resume: a 200, never a splice.
            log.warning("copy %s: could not record how far its response got: %s",
                        copy_id, error)

    async def keep_for_resuming(self, copy_id: str) -> None:
        """A cut download's copy is kept EXPORTER_EXPORTS_RESUME_RETENTION; that of one
        sent whole (no resume is likely) EXPORTER_EXPORTS_RESUME_COMPLETE_RETENTION."""
        whole = sa.func.coalesce(t.c.delivered, 0) >= t.c.bytes
        with contextlib.suppress(Exception):
            async with self._service.engine.begin() as conn:
                await conn.execute(sa.update(t).where(t.c.id == copy_id).values(
                    expires=t.c.finished + sa.case((whole, self._whole_retention),
                                                   else_=self._retention)))

    # --- resuming --------------------------------------------------------------------------

    async def find(self, client: Client, principal: Principal, url: str, byte_range: str,
                   if_range: str | None) -> Continuation | None:
        chosen = await unless_disconnected(self._choose(principal, url, byte_range, if_range),
                                           client.receive)
        if chosen is None:
            return None
        copy_id, offset = chosen
        return Continuation(copy_id, offset, principal)

    async def _choose(self, principal: Principal, url: str, byte_range: str,
                      if_range: str | None) -> tuple[str, int | None] | None:
        """The copy to answer from, and the offset asked (None: an If-Range answer)."""
        owner = owner_of(principal)
        # A copy of this URL promised here a moment ago has its row once this returns.
        await self._service.started(owner=owner, url=url)
        if if_range is not None:
            match = STRONG_ETAG.fullmatch(if_range.strip())
            if match is None:
                return None
            rows = await self._rows(t.c.id == match[1], t.c.owner == owner, t.c.url == url)
            if not rows or rows[0].status not in (RUNNING, COMPLETE) or (
                    not await self._completed(rows[0].id)):
                return None
            return rows[0].id, None
        match = OPEN_RANGE.fullmatch(byte_range.strip())
        if match is None:
            return None
        offset = int(match[1])
        rows = await self._rows(t.c.owner == owner, t.c.url == url)
        if any(r.delivered is None for r in rows):
            # A response of this URL still running, or just cut and not yet recorded
            # (wget retries within a second): a moment for it to say how far it got.
            rows = await self._settled_rows(owner, url)
            if any(r.delivered is None for r in rows):
                # The client's bytes may be that response's, which said nothing yet: no
                # proof either way, so the whole export (never a splice).
                return None
        if len(rows) == CANDIDATES:
            return None  # more responses of this URL than are compared: no proof
        # The responses that sent at least `offset` bytes: the client's partial file can
        # only be one of theirs.
        held = [r for r in rows if _may_hold(r, offset)]
        # A copy whose file expired, of the same bytes as one still here, proves nothing
        # either way: that one stands for it.
        here = {bytes(r.sha256) for r in held if r.status == COMPLETE and r.sha256}
        candidates = [r.id for r in held
                      if not (r.error == EXPIRED and r.sha256 and bytes(r.sha256) in here)]
        if not candidates or not all([await self._completed(c) for c in candidates]):
            return None  # one failed, or is not done: nothing to prove against
        rows = [r for r in await self._rows(t.c.id.in_(candidates)) if _may_hold(r, offset)]
        if len(rows) != len(candidates):
            return None
        if len(rows) > 1 and not await self._same_prefix([r.storage_key for r in rows],
                                                         offset):
            log.info("a resume of %s at %d: %d copies differ before it: whole export",
                     url, offset, len(rows))
            return None
        return rows[0].id, offset

    async def _rows(self, *where: Any) -> list[Any]:
        """This URL's copies, newest first, whatever their status."""
        async with self._service.engine.connect() as conn:
            result = await conn.execute(
                sa.select(t.c.id, t.c.status, t.c.error, t.c.delivered, t.c.bytes,
                          t.c.storage_key, t.c.sha256)
                .where(t.c.kind == STREAMED, *where)
                .order_by(t.c.created.desc()).limit(CANDIDATES))
            return list(result)

    async def _settled_rows(self, owner: str, url: str) -> list[Any]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + LEFT_WAIT
        while True:
            rows = await self._rows(t.c.owner == owner, t.c.url == url)
            if all(r.delivered is not None for r in rows) or loop.time() > deadline:
                return rows
            await asyncio.sleep(0.1)

    async def _completed(self, copy_id: str) -> bool:
        """Whether the copy is (or, within COMPLETE_WAIT, becomes) complete."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + COMPLETE_WAIT
        pause = 0.05
        while True:
            async with self._service.engine.connect() as conn:
                status = await conn.scalar(sa.select(t.c.status).where(t.c.id == copy_id))
            if status != RUNNING or loop.time() > deadline:
                return bool(status == COMPLETE)
            await asyncio.sleep(pause)
            pause = min(pause * 2, 1.0)

    async def _same_prefix(self, keys: list[str], length: int) -> bool:
        """Whether the stored files under `keys` all begin with the same `length` bytes
        (read a chunk at a time, in worker threads)."""
        storage = self._service.storage
        files = []
        try:
            for key in keys:
                f, _ = await storage.open(key)
                files.append(f)
            left = length
            while left > 0:
                size = min(COMPARE_CHUNK, left)
                parts = [await f.read(size) for f in files]
                if any(p != parts[0] for p in parts) or len(parts[0]) < size:
                    return False
                left -= size
            return True
        except OSError:  # gone, or the storage fails now: no proof, the whole export
            return False
        finally:
            for f in files:
                with contextlib.suppress(Exception):
                    await f.close()

    async def counting(self, body: AsyncIterator[bytes], copy_id: str,
                        offset: int) -> AsyncGenerator[bytes, None]:
        """The resumed body, recording how far the copy's responses got when it ends (a
        resume of this resume may then ask for no more than that)."""
        sent = 0
        try:
            async for chunk in body:
                yield chunk
                sent += len(chunk)
        finally:
            run_detached(self.record_delivered(copy_id, offset + sent))
