"""One export: a read-only snapshot, its COPY statements, the stream, and its audit row."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime
from typing import Any, Protocol

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from exporter.access.admission import OVER_MAX_DURATION
from exporter.audit import ABORTED, COMPLETE, FAILED, Audit, Download
from exporter.compression import Coding, compressed
from exporter.config import Settings
from exporter.db import driver_connection, libpq_url_of
from exporter.errors import (
    DATABASE_ERRORS,
    ApiError,
    answered_with_error,
    database_error,
    postgres_message,
    sqlstate,
    unavailable,
)
from exporter.exports import arrow_source, cursor, pages, parallel, sql
from exporter.exports.copy import CopyStream, Output
from exporter.exports.filenames import filename
from exporter.exports.query import ExportQuery
from exporter.exports.renderers import CopyStatement, Renderer
from exporter.exports.renderers.base import copied_rows
from exporter.streaming import ResponseCut, audited, run_detached

log = logging.getLogger(__name__)

# What a hot standby answers while it lags behind the primary (the catalog, read on the
# primary, names a table or column it has not replayed yet), or when it cancelled the
# query to replay changes it conflicted with (max_standby_streaming_delay).
REPLICA_RETRY = {
    "42P01": "has not caught up with the primary yet",
    "42703": "has not caught up with the primary yet",
    "40001": "cancelled the query to replay changes from the primary",
    "40P01": "cancelled the query to replay changes from the primary",
}


def source_name(replica: bool) -> str:
    """How errors name the server an export reads from."""
    return "the read replica" if replica else "the database"


# Exports between their start and their recorded end, so a shutdown can end them all.
_running: set[Export] = set()
SHUTDOWN = "the server shut down"
# How an export whose client went away ends (its body closed, or never started).
CLIENT_LEFT = "client left"
LEFT = (None, CLIENT_LEFT)


def end_running_exports() -> int:
    """At shutdown: release and record as aborted every export not ended yet (uvicorn may
    have cancelled their requests too late for them to do it), and stop those still read
    on after their response (a resume copy being completed); how many there were."""
    running = list(_running)
    for job in running:
        job.shut_down()
    return len(running)


class Tail(Protocol):
    """What reads an export on after its response (a resume copy's writer,
    exports/resume_writer.py): told how the response ended; the export lets its snapshot
    and connection go only once it is done."""

    def ended(self, status: str, error: str | None) -> None:
        """How the response ended, told at once (in the request's task, before the
        request's lease is given back)."""

    async def settle(self, delivered: int) -> bool:
        """After the response, which sent `delivered` bytes: whether it reads on."""

    async def read_on(self) -> bool:
        """The rest of the export, once the download's end is recorded; whether it was
        read to its end (the connection is then clean)."""

    def done(self) -> None:
        """The snapshot and the connection are let go."""


class _Source:
    """The export's rows, on its connection (COPY) or in its snapshot (Arrow)."""

    def __init__(self, driver: Any, url: str, settings: Settings,
                 ranges: parallel.Ranges | None = None) -> None:
        self._driver = driver
        self._url = url
        self.settings = settings
        self._ranges = ranges

    async def copy(self, statement: CopyStatement, output: Output) -> str:
        status: str = await self._driver.copy_from_query(statement.query, output=output,
                                                         **statement.options)
        return status

    async def copy_rows(self, body: Callable[[str], CopyStatement], select: str,
                        output: Output) -> int | None:
        if self._ranges is not None:
            return await self._ranges.copy(body, output)
        return copied_rows(await self.copy(body(select), output))

    def arrow(self, select: str) -> AbstractAsyncContextManager[Any]:
        return arrow_source.reading(
            self._driver, self._url, select, max_duration=self.settings.export_max_duration,
            row_group_bytes=self.settings.parquet_row_group_bytes)


class Export:
    """Opened before the response starts, so failures up to the first row are clean HTTP errors."""

    def __init__(self, engine: AsyncEngine, audit: Audit, settings: Settings,
                 query: ExportQuery, renderer: Renderer, download: Download, *,
                 replica: bool = False, window: pages.Window | None = None,
                 url_query: str = "", head: bool = False,
                 take_slots: parallel.TakeSlots | None = None, per_principal: int = 1
                 ) -> None:
        # `engine` is where the export reads (the read replica's if `replica`); the audit
        # row is written through `audit`'s engine, the primary's. `url_query`: the URL's
        # canonical query, which the file's name tells apart (exports/filenames.py).
        # `take_slots`: more export slots for the request's lease, for the extra
        # backends of a parallel export (exports/parallel.py; None: one COPY), at most
        # `per_principal` in all.
        self._engine = engine
        self._replica = replica
        self._source = source_name(replica)
        self._audit = audit
        self._settings = settings
        self.query = query
        self.renderer = renderer
        self.download = download
        self.url_query = url_query
        self.snapshot_time = datetime.now(UTC)
        # The export's snapshot as a change cursor (tables only), once open.
        self.cursor: cursor.Cursor | None = None
        self._conn: AsyncConnection | None = None
        self._driver: Any = None  # the asyncpg connection under _conn
        self._pid: int | None = None  # its backend's (asyncpg forgets it once closed)
        self._stream: CopyStream | None = None
        # PostgreSQL refused a statement of this export (see `_release`).
        self._refused = False
        self._first: bytes | None = None
        self._ran_out = False  # the COPY's last chunk was taken
        self._deadline: float | None = None
        self._ending: asyncio.Task[None] | None = None
        # What holds the snapshot past the response (`hold`), if anything.
        self._tail: Tail | None = None
        self._shutting_down = False
        # A PostgREST Range or count (exports/pages.py), answered from this snapshot.
        self._window = window
        self.answer: pages.Answer | None = None
        # A HEAD: the checks and counts of the export, in its snapshot, and no COPY.
        self._head = head
        # Loop time by which the first row (a HEAD's answer) must be there.
        self._first_row_by = 0.0
        self._take_slots = take_slots
        self._per_principal = per_principal
        self._ranges: parallel.Ranges | None = None
        # How many backends read the export at once (1: one COPY), once it is open: what
        # a compressor may size its threads by.
        self.ranges = 1

    @property
    def filename(self) -> str:
        return filename(self.query.dataset.name, self.renderer, self.snapshot_time,
                        self.url_query)

    @property
    def deadline(self) -> float | None:
        """Loop time past which the export is cut (EXPORTER_EXPORT_MAX_DURATION), if any."""
        return self._deadline

    async def open(self) -> None:
        """Up to the first chunk (a HEAD: up to its answer, then recorded and let go).
        EXPORTER_STATEMENT_TIMEOUT bounds all of it: the checks, the counts and the wait
        for the first row, on the server (statement_timeout) and here."""
        now = asyncio.get_running_loop().time()
        limit = self._settings.export_max_duration
        if limit > 0:
            self._deadline = now + limit
        self._first_row_by = now + self._settings.statement_timeout
        _running.add(self)
        try:
            try:
                await self._audit.start(self.download)
            except DATABASE_ERRORS as error:
                raise unavailable(error) from error
            guard = asyncio.timeout_at(self._first_row_by)
            try:
                async with guard:
                    await self._open()
            except TimeoutError:
                if not guard.expired():
                    raise
                raise self._too_slow() from None
        # Each ending also covers a row written by a start that was cut short (the
        # INSERT done, its answer cancelled): no audit row stays `running`.
        except ApiError as error:
            await self._end(FAILED, error.message, http_status=error.status)
            raise
        except asyncio.CancelledError:
            with contextlib.suppress(asyncio.CancelledError):
                await self._end(ABORTED, "client left before first byte")
            raise
        except BaseException:
            await self._end(FAILED, "failed before first byte")
            raise
        if self._head:
            answer = self.answer
            await self._end(COMPLETE, None, http_status=answer.status if answer else 200)

    def _too_slow(self) -> ApiError:
        what = "answer" if self._head else "produce its first row"
        return ApiError(504, f"the export did not {what} within"
                        f" {self._settings.statement_timeout:g} s (EXPORTER_STATEMENT_TIMEOUT)")

    async def _open(self) -> None:
        try:
            conn = await self._engine.connect()
        except DATABASE_ERRORS as error:
            raise unavailable(error, self._source) from error
        self._conn = conn
        try:
            conn = await conn.execution_options(
                isolation_level="REPEATABLE READ", postgresql_readonly=True
            )
            # Early, so that a query cancelled by this request's end can be cut at once.
            self._driver = await driver_connection(conn)
            self._pid = self._driver.get_server_pid()
            # The first statement opens the transaction; now() is its start, the snapshot's
            # time. A table's export also reads the snapshot itself, its change cursor.
            # A HEAD gives no cursor: it reads the snapshot only to count changes `since`.
            # The server cancels the checks and counts that run past the timeout too,
            # should this process not: set by that first statement (a plain export has
            # no check: it sets none).
            timeout = self._settings.statement_timeout
            bounded = self._window is not None or sql.runs_checks(self.query)
            limit = sql.timeout_setting(timeout) if bounded else None
            snapshot = None
            if self.query.dataset.kind in cursor.KINDS_WITH_XMIN and (
                    not self._head or self.query.changed_since is not None):
                snapshot = await cursor.take(conn, limit)
            if snapshot is not None:
                self.snapshot_time, self.cursor = snapshot.time, snapshot.cursor
                if self.query.changed_since is not None:
                    cursor.check(self.query.changed_since, snapshot)
                    self.query.since_reference = snapshot.reference
            else:
                if self.query.changed_since is not None:
                    raise ApiError(503, cursor.NO_IDENTITY)
                if limit is None:
                    first = await conn.execute(text("SELECT now()"))
                else:
                    first = await conn.execute(text(
                        "SELECT now(), set_config('statement_timeout', :limit, true)"),
                        {"limit": limit})
                self.snapshot_time = first.one()[0]
            await sql.check_values(conn, self.query, timeout)
            if self._window is not None:
                self.answer = await pages.answer(conn, self.query, self._window,
                                                 self._settings.count_estimated_above)
            if self._head:
                return
            # The COPY streams as long as its client reads (the idle and duration rules
            # bound it, EXPORTER_EXPORT_IDLE_TIMEOUT and EXPORTER_EXPORT_MAX_DURATION);
            # its first row is awaited here, within the timeout.
            if bounded:
                await sql.limit_statements(conn, self._settings.export_max_duration)
            driver: Any = self._driver
            wanted = 1 if self._take_slots is None else parallel.wanted(
                self.query, self._settings, per_principal=self._per_principal,
                splits=self.renderer.splits and not self.renderer.reads_arrow,
                replica=self._replica)
            if wanted > 1:
                assert self._take_slots is not None
                self._ranges = await parallel.open_ranges(
                    conn, driver, self._engine, self._settings, self.query, wanted,
                    self._take_slots, None if self.cursor is None else self.cursor.xmax,
                    f"of {self.download.target}")
                if self._ranges is not None:
                    self.ranges = self._ranges.count
        except ApiError:
            raise
        except DATABASE_ERRORS as error:
            self._refused = answered_with_error(error)
            raise self._database_error(error) from error

        query = self.query
        if self.renderer.reads_arrow and query.since_reference is not None:
            # `since` compares age(xmin), which counts from an xid of the transaction
            # that asks: the driver's is another one, so the test on xmin's text instead.
            query = dataclasses.replace(query, since_reference=None)
        select = sql.select_sql(query)
        renderer = self.renderer.for_query(self.query)
        log.debug("export %s: %s", self.download.id, select)
        source = _Source(driver, libpq_url_of(self._engine), self._settings, self._ranges)

        async def produce(prelude: Output, output: Output) -> int | None:
            return await renderer.produce(source, select, prelude, output)

        s = self._settings
        self._stream = CopyStream(produce, chunk_size=s.export_chunk_size,
                                  max_chunks=s.export_buffer_chunks,
                                  flush_interval=s.export_flush_interval)
        self._stream.start()
        try:
            self._first = await self._stream.next_chunk()
            self._ran_out = self._first is None
        except DATABASE_ERRORS as error:
            self._refused = answered_with_error(error)
            raise self._database_error(error) from error

    def _database_error(self, error: BaseException) -> ApiError:
        if (failed := sql.cast_failure(self.query, error)) is not None:
            return failed
        code = sqlstate(error)
        if code == sql.QUERY_CANCELED and self._stream is None:
            # statement_timeout, before the first row (a HEAD's counts, say).
            return self._too_slow()
        if self._replica and code in REPLICA_RETRY:
            # Gone on a retry: the standby catches up, or the replay that needed our
            # snapshot gone is done.
            log.warning("export %s on the read replica: %s", self.download.id,
                        postgres_message(error))
            return ApiError(503, f"the read replica {REPLICA_RETRY[code]}; try again",
                            headers={"Retry-After": "5"}, reason="replica")
        return database_error(error, self._source)

    def hold(self, tail: Tail) -> None:
        """Tell `tail` how the response ends, and keep the snapshot and the connection
        until it is done with them."""
        self._tail = tail

    def body(self, coding: Coding | None = None, level: int | None = None, *,
             chunks: AsyncGenerator[bytes, None] | None = None) -> AsyncIterator[bytes]:
        """The response body, compressed with `coding` if given (inside the audit, so
        it counts the bytes sent). Raises on a failure mid-stream, so the response is
        cut short (a compressed one then lacks its trailer too). `chunks`: what is sent
        instead of `self.chunks()`, which it wraps (a resume copy's writer)."""
        if chunks is None:
            chunks = self.chunks()
        if coding is not None:
            # Read by several backends, the export comes faster than one thread compresses.
            chunks = compressed(chunks, coding, level,
                                flush_below=self._settings.export_chunk_size,
                                threads=self.ranges)
        return audited(chunks, self.download,
                       lambda status, error: self._end_detached(status, error, http_status=200))

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        """The chunks not taken yet, the first one included; a later call goes on where
        an earlier one stopped (after its client left, say)."""
        assert self._stream is not None
        first, self._first = self._first, None
        if first is not None:
            yield first
        while (chunk := await self._next_chunk()) is not None:
            yield chunk
        self.download.rows = self._stream.result

    @property
    def rows(self) -> int | None:
        """How many rows the COPY sent, once it ran out."""
        return None if self._stream is None else self._stream.result

    async def _next_chunk(self) -> bytes | None:
        assert self._stream is not None
        if self._ran_out:
            return None
        if self._deadline is None:
            chunk = await self._stream.next_chunk()
        else:
            try:
                async with asyncio.timeout_at(self._deadline):
                    chunk = await self._stream.next_chunk()
            except TimeoutError:
                raise ResponseCut(OVER_MAX_DURATION) from None
        self._ran_out = chunk is None
        return chunk

    def cut(self, reason: str) -> None:
        """Called when the response is cut while the body waits on its client: the
        snapshot and the connection are let go now, not whenever the body is closed."""
        log.warning("export %s of %s cut after %d bytes: %s",
                    self.download.id, self.download.target, self.download.bytes, reason)
        # A stalled client ended it; the duration limit is the server's own doing.
        status = FAILED if reason == OVER_MAX_DURATION else ABORTED
        self._end_detached(status, f"cut: {reason}", http_status=200)

    def request_ended(self) -> None:
        """The request is over. If the body never ran to its end (its client left before
        it started, or while it waited to send), the export was not complete."""
        if self._stream is not None:
            self._end_detached(ABORTED, CLIENT_LEFT, http_status=200)

    def _end_detached(self, status: str, error: str | None, *,
                      http_status: int | None = None) -> asyncio.Task[None]:
        """Release and record the end once, in a task of its own: the request's task may
        be cancelled (client gone) and with it every await in its clean-up."""
        if self._ending is None:
            if self._tail is not None:
                self._tail.ended(status, error)
            self._ending = run_detached(self._finish(status, error, http_status))
            self._ending.add_done_callback(lambda _: _running.discard(self))
        return self._ending

    def shut_down(self) -> None:
        self._shutting_down = True
        if self._ending is None:
            self._end_detached(ABORTED, SHUTDOWN, http_status=200)
        elif self._stream is not None:
            self._stream.stop()  # read on by its tail: that fails, and says why

    async def _end(self, status: str, error: str | None, *,
                   http_status: int | None = None) -> None:
        # Shielded: if this request is cancelled, it stops waiting, the clean-up does not.
        await asyncio.shield(self._end_detached(status, error, http_status=http_status))

    async def _finish(self, status: str, error: str | None,
                      http_status: int | None) -> None:
        tail = self._tail
        try:
            if tail is not None and await tail.settle(self.download.bytes):
                # The client's download ends here; its tail reads on to the end.
                await self._audit.finish(self.download, status, http_status=http_status,
                                         error=error)
                await self._release(clean=await tail.read_on())
                return
            await self._release(clean=status == COMPLETE)
            await self._audit.finish(self.download, status, http_status=http_status,
                                     error=error)
        finally:
            if tail is not None:
                tail.done()

    def why_stopped(self, error: BaseException) -> str:
        """Why reading the export (on, after its response) stopped with `error`."""
        if self._shutting_down:
            return SHUTDOWN
        if isinstance(error, ResponseCut):
            return OVER_MAX_DURATION
        if isinstance(error, ApiError):
            return error.message
        if isinstance(error, DATABASE_ERRORS):
            return self._database_error(error).message
        return f"{type(error).__name__}: {error}"

    async def _release(self, *, clean: bool) -> None:
        """End the snapshot and give the connection back; one in doubt is discarded."""
        copying = self._stream is not None and self._stream.running
        if self._stream is not None:
            if copying and not clean and self._driver is not None:
                self._stream.cut(self._driver.terminate)  # (copy.py says why)
            await self._stream.cancel()
        ranges, self._ranges = self._ranges, None
        if ranges is not None:
            await ranges.release(clean=clean)
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            # A statement PostgreSQL refused (a cast failing on a row, a bad regular
            # expression) left the protocol where it was: the rollback gives the connection
            # back, and a client's mistake costs no new backend.
            if not clean and not (self._refused and not copying):
                raise RuntimeError("export did not finish")
            async with asyncio.timeout(5):
                await conn.rollback()
            await conn.close()
        except BaseException:
            if copying:
                await self._cancel_backend()
            # After a cancelled COPY the protocol state is not worth trusting. A graceful
            # close would wait for a backend that is blocked writing to us, so the socket
            # is closed at once: the backend fails its next write, or notices within
            # client_connection_check_interval while still working before its first row.
            if self._driver is not None:
                self._driver.terminate()
            await conn.invalidate()
            await conn.close()

    async def _cancel_backend(self) -> None:
        """Cancel the COPY on the server before its connection is closed: the cancel
        request asyncpg sends when the COPY's task is cancelled dies with the connection,
        and a backend busy before its first row (a slow regular expression on
        PostgreSQL 15, say) may not notice the closed socket for as long as it works."""
        pid = self._pid
        if pid is None:
            return
        try:
            async with asyncio.timeout(2), self._engine.connect() as conn:
                await conn.execute(text("SELECT pg_cancel_backend(:pid)"), {"pid": pid})
        except Exception as error:
            log.info("export %s: could not cancel its backend %s: %s", self.download.id,
                     pid, error)
