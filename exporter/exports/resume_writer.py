"""The writer of a resume copy: a body wrapper around a streamed export's chunks, which
writes each chunk into the copy while it leaves and, when the client leaves, reads the
rest of the export into the copy."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Protocol

from exporter.access.limits import Lease
from exporter.audit import ABORTED, COMPLETE, Download
from exporter.exports.export import LEFT
from exporter.exports.resume_copies import ResumeCopy, ResumeCopyStopped
from exporter.streaming import run_detached

log = logging.getLogger(__name__)


class Source(Protocol):
    """What the writer reads (exports/export.py's `Export`)."""

    download: Download

    def chunks(self) -> AsyncGenerator[bytes, None]:
        """The chunks not taken yet; a later call goes on where an earlier one stopped."""

    @property
    def rows(self) -> int | None:
        """How many rows the export sent, once it ran out."""

    def why_stopped(self, error: BaseException) -> str:
        """Why reading the export stopped with `error`, in words."""


class ResumeWriter:
    """Writes `export`'s chunks into `copy` as they are sent; if the client leaves, goes
    on into the copy to the end, within `finish_within` seconds, holding the request's
    `lease` (its slots) meanwhile. Only for identity bodies: the copy holds the bytes
    the client holds. The export calls it as its `Tail` (exports/export.py)."""

    def __init__(self, copy: ResumeCopy, export: Source, lease: Lease,
                 finish_within: float) -> None:
        self._copy: ResumeCopy | None = copy
        self._export = export
        self._lease = lease
        self._finish_within = finish_within
        # The write of the chunk last sent, under way while it leaves.
        self._writing: asyncio.Future[None] | None = None
        # How the response ended, and whether the copy is completed after it.
        self._status: str | None = None
        self._error: str | None = None
        self._reads_on = False
        self._rest: ResumeCopy | None = None

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        """The export's chunks, each written into the copy while it is sent: a chunk is
        yielded once the previous one is in the copy, so the first leaves at once (the
        copy's row and file are made meanwhile) and the copy is never more than one
        chunk behind (`settle` waits for that one)."""
        async with aclosing(self._export.chunks()) as chunks:
            while True:
                # Before the next chunk is taken: a client that leaves during this wait
                # must not leave a chunk taken from the export and in neither place.
                await self._written()
                chunk = await anext(chunks, None)
                if chunk is None:
                    break
                if self._copy is not None:
                    self._writing = asyncio.ensure_future(self._copy.write(chunk))
                yield chunk

    async def _written(self) -> None:
        """The write under way, done: shielded, so a client that leaves never cuts a
        chunk in two; a copy that cannot go on is dropped, and the export goes on."""
        if self._writing is None:
            return
        try:
            await asyncio.shield(self._writing)
        except ResumeCopyStopped as stop:
            copy, self._copy, self._writing = self._copy, None, None
            if copy is not None:
                log.info("export %s goes on without its copy %s: %s",
                         self._export.download.id, copy.id, stop)
                run_detached(copy.fail(str(stop)))

    def ended(self, status: str, error: str | None) -> None:
        self._status, self._error = status, error
        if self._copy is not None and status == ABORTED and error in LEFT:
            # Its client left (not cut for stalling: that would let a hog hold a snapshot
            # on): the copy is completed. The lease is kept now, before the request's end
            # gives it back: it is still this client's work.
            self._lease.keep()
            self._reads_on = True

    async def settle(self, delivered: int) -> bool:
        """Once a write the client's leaving interrupted is done (a chunk is never cut in
        two), the copy is told how far the response got, then finished or failed;
        whether it is to be completed instead (`read_on`)."""
        copy, self._copy = self._copy, None
        writing, self._writing = self._writing, None
        if copy is None:
            return False
        try:
            if writing is not None:
                await writing
        except Exception as error:
            log.info("export %s goes on without its copy %s: %s", self._export.download.id,
                     copy.id, error)
            await copy.fail(str(error))
            return False
        await copy.left(delivered)
        if self._reads_on:
            self._rest = copy
            return True
        if self._status == COMPLETE:
            await copy.finish(self._export.rows)
        else:
            await copy.fail(self._error or self._status or ABORTED)
        return False

    async def read_on(self) -> bool:
        """The rest of the export into the copy, at COPY speed; whether it ran out."""
        copy, self._rest = self._rest, None
        assert copy is not None
        download = self._export.download
        limit = self._finish_within
        try:
            async with asyncio.timeout(limit), aclosing(self._export.chunks()) as rest:
                async for chunk in rest:
                    await copy.write(chunk)
        except TimeoutError:
            # A download given up early on a huge export: not worth the disk and the
            # database's time (EXPORTER_EXPORTS_RESUME_FINISH).
            await copy.fail(f"its client left, and the rest took more than {limit:g} s")
            return False
        except ResumeCopyStopped as stop:
            await copy.fail(str(stop))
            return False
        except (Exception, asyncio.CancelledError) as error:
            reason = self._export.why_stopped(error)
            log.warning("export %s: its copy %s is incomplete: %s", download.id, copy.id,
                        reason)
            await copy.fail(reason)
            return False
        await copy.finish(self._export.rows)
        log.info("export %s: its client left after %d bytes; its copy %s is complete",
                 download.id, download.bytes, copy.id)
        return True

    def done(self) -> None:
        if self._reads_on:
            self._lease.release()
