"""Stored exports' rows and files together: who owns one, the writer that fills one, the
clean-up. The HTTP side is in service.py; this module is what other code writes through.

The writer API (also for the stored copies of streamed exports, kind `streamed`)::

    writer = await stored.begin(principal, url=..., dataset=..., format="csv",
                                coding=None, content_type=..., filename=...,
                                kind=STREAMED)          # 507 if the quota is full
    try:
        async for chunk in body:
            await writer.write(chunk)   # hashed (SHA-256) and written in worker threads;
                                        # raises Stopped when the export is cancelled
                                        # (DELETE, from any host) or crosses the quota
            await writer.progress(rows_so_far)   # cheap: the DB sees it on the next beat
        await writer.finish(rows, snapshot_time)   # fsync, rename into place, complete
    except BaseException as error:
        await writer.fail(str(error))   # partial file removed; `cancelled` stays so
        raise

While it runs, a heartbeat task writes rows, bytes and `heartbeat` every
EXPORTER_EXPORTS_PROGRESS_INTERVAL seconds and reads back the row's status and the
storage used by the others: that is how a DELETE on another host, or a quota crossed
by several exports together, reaches the writer. `writer.stopped` is an event set then
(and `on_stop`, if given to begin, called), so a runner waiting on the database rather
than writing hears it too.

Owners: a token's exports belong to its row ("token 42"), and so do those started
through the signed links it made (a link works with its maker's rights, so it sees its
maker's exports); an operator link (`exporter link`) is admin anyway; an anonymous
client owns by its address ("anonymous 10.0.0.7", the key its download cap counts by).
A token revoked and made again under its name is another row: it does not see the old
one's exports.

Exports are never resumed after their server process stops: a running row whose
heartbeat is older than STALE_BEATS beats is marked failed ("the server stopped while
it ran") by the clean-up of any process (at its start-up and then on its schedule), and
its partial file removed. A new export is a new snapshot anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from exporter.access.durations import parse_duration
from exporter.access.principal import Principal
from exporter.config import Settings
from exporter.errors import DATABASE_ERRORS, ApiError, unavailable
from exporter.stored.storage import Storage
from exporter.tables import stored_exports as t
from exporter.tables import tokens

log = logging.getLogger(__name__)

ASYNC, STREAMED = "async", "streamed"
RUNNING, COMPLETE, FAILED, CANCELLED = "running", "complete", "failed", "cancelled"
# A running export whose heartbeat is older than this many progress intervals is dead.
STALE_BEATS = 5
QUOTA_EXCEEDED = "the export exceeds the storage quota (EXPORTER_EXPORTS_MAX_BYTES)"
SERVER_STOPPED = "the server stopped while it ran"
EVICTED = "removed to make room in the storage quota (a copy kept only for resuming)"
# What counts against the quota: every file there is or is being written.
_HOLDING = (RUNNING, COMPLETE)


def new_id() -> str:
    """22 characters of [A-Za-z0-9_-], never a leading `-` (which a command line would
    take for an option: `exporter exports delete ID`)."""
    while (export_id := secrets.token_urlsafe(16)).startswith("-"):
        pass
    return export_id


def owner_of(principal: Principal) -> str:
    """Who may see an export besides admins (see the module's docstring)."""
    if principal.token_id is not None:
        return f"token {principal.token_id}"
    return principal.limit_key


class Stopped(Exception):
    """The export must stop: cancelled (DELETE), or over the storage quota."""


def _used(exclude: str | None = None) -> sa.ScalarSelect[Any]:
    where: list[sa.ColumnElement[bool]] = [t.c.status.in_(_HOLDING)]
    if exclude is not None:
        where.append(t.c.id != exclude)
    return sa.select(sa.func.coalesce(sa.func.sum(t.c.bytes), 0)).where(*where).scalar_subquery()


class StoredExports:
    def __init__(self, engine: AsyncEngine, settings: Settings, storage: Storage,
                 instance_id: str) -> None:
        self.engine = engine
        self.settings = settings
        self.storage = storage
        self.instance_id = instance_id
        self.retention: timedelta = parse_duration(settings.exports_retention)
        self.interval = settings.exports_progress_interval
        self._cleanup: asyncio.Task[None] | None = None

    # --- writing -----------------------------------------------------------------------

    async def check_quota(self) -> int:
        """507 if the stored exports already fill the quota; the bytes they hold."""
        cap = self.settings.exports_max_bytes
        if not cap:
            return 0
        try:
            async with self.engine.connect() as conn:
                used = int(await conn.scalar(sa.select(_used())) or 0)
            if used >= cap:
                used -= await self._evict_copies(used - cap + 1)
        except DATABASE_ERRORS as error:
            raise unavailable(error) from error
        if used >= cap:
            raise ApiError(507, f"the stored exports fill their quota ({used} of {cap} bytes,"
                           " EXPORTER_EXPORTS_MAX_BYTES): delete some, or wait for older"
                           " ones to expire")
        return used

    async def _evict_copies(self, need: int) -> int:
        """Make room: remove the oldest finished copies of streamed exports (kept only in
        case a download is resumed, the least needed bytes here) until `need` bytes are
        freed; how many were. Their rows stay, failed, so that a resume never takes
        another copy for one that is gone (exporter/stored/copies.py)."""
        async with self.engine.begin() as conn:
            rows = (await conn.execute(
                sa.select(t.c.id, t.c.storage_key, t.c.bytes)
                .where(t.c.kind == STREAMED, t.c.status == COMPLETE)
                .order_by(t.c.finished).limit(1000))).all()
            chosen, freed = [], 0
            for row in rows:
                if freed >= need:
                    break
                chosen.append(row)
                freed += int(row.bytes)
            if not chosen:
                return 0
            await conn.execute(
                sa.update(t).where(t.c.id.in_([r.id for r in chosen]), t.c.status == COMPLETE)
                .values(status=FAILED, error=EVICTED))
        for row in chosen:
            await self.storage.delete(row.storage_key)
        log.info("removed %d copies of streamed exports (%d bytes) to make room",
                 len(chosen), freed)
        return freed

    async def begin(self, principal: Principal, *, url: str, dataset: str, format: str,
                    coding: str | None, content_type: str, filename: str, kind: str,
                    estimated_rows: int | None = None,
                    on_stop: Callable[[str], None] | None = None) -> Writer:
        """A new running export and its writer; 507 when the quota is full."""
        used = await self.check_quota()
        export_id = new_id()
        try:
            async with self.engine.begin() as conn:
                await conn.execute(sa.insert(t).values(
                    id=export_id, owner=owner_of(principal), principal=principal.label,
                    kind=kind, url=url, dataset=dataset, format=format, coding=coding,
                    content_type=content_type, filename=filename, status=RUNNING,
                    estimated_rows=estimated_rows, storage_key=export_id,
                    instance=self.instance_id))
        except DATABASE_ERRORS as error:
            raise unavailable(error) from error
        try:
            out = await self.storage.create(export_id)
        except BaseException as error:
            await self._close_row(export_id, FAILED, f"the storage refused the file: {error}")
            if isinstance(error, OSError):
                log.error("stored export %s: cannot create its file: %s", export_id, error)
                raise ApiError(503, "the export storage cannot be written now",
                               headers={"Retry-After": "5"}) from error
            raise
        writer = Writer(self, export_id, out, on_stop, principal.token_id)
        writer.room = self.settings.exports_max_bytes - used
        writer.start()
        return writer

    async def _close_row(self, export_id: str, status: str, error: str | None,
                         **values: Any) -> str | None:
        """Move a running row to `status`; the status it has afterwards (a row cancelled
        meanwhile stays cancelled), None if it is gone."""
        async with self.engine.begin() as conn:
            done = await conn.scalar(
                sa.update(t).where(t.c.id == export_id, t.c.status == RUNNING)
                .values(status=status, error=error, finished=sa.func.now(),
                        heartbeat=sa.func.now(),
                        expires=sa.func.now() + self.retention, **values)
                .returning(t.c.status))
            if done is not None:
                return str(done)
            now = await conn.scalar(sa.select(t.c.status).where(t.c.id == export_id))
            return None if now is None else str(now)

    # --- the clean-up --------------------------------------------------------------------

    async def clean_up(self) -> dict[str, int]:
        """Expired exports (rows and files), running ones whose runner stopped beating,
        partial files of exports no longer running, and files no row names."""
        stale = timedelta(seconds=STALE_BEATS * self.interval)
        async with self.engine.begin() as conn:
            dead = (await conn.execute(
                sa.update(t).where(t.c.status == RUNNING, t.c.heartbeat < sa.func.now() - stale)
                .values(status=FAILED, error=SERVER_STOPPED, finished=sa.func.now(),
                        expires=sa.func.now() + self.retention)
                .returning(t.c.id))).scalars().all()
            expired = (await conn.execute(
                sa.delete(t).where(t.c.expires < sa.func.now())
                .returning(t.c.storage_key))).scalars().all()
        for key in expired:
            await self.storage.delete(key)
        # Listed first, then the rows: a row is written before its file is created, so a
        # file listed here whose row is missing was never going to get one.
        found = await self.storage.list()
        orphans = 0
        if found:
            async with self.engine.connect() as conn:
                result = await conn.execute(
                    sa.select(t.c.storage_key, t.c.status)
                    .where(t.c.storage_key.in_({s.key for s in found})))
                rows = {str(key): str(status) for key, status in result}
            for item in found:
                status = rows.get(item.key)
                if status is None:
                    orphans += 1
                    await self.storage.delete(item.key)
                elif item.partial and status != RUNNING:
                    orphans += 1
                    await self.storage.discard(item.key)
        if dead:
            log.warning("%d stored exports were running on a server that stopped: failed",
                        len(dead))
        return {"stale": len(dead), "expired": len(expired), "orphans": orphans}

    async def start_cleanup(self) -> None:
        """At start-up: one clean-up now (exports left running by a stopped server),
        then one every EXPORTER_EXPORTS_CLEANUP_INTERVAL seconds."""
        try:
            await self.clean_up()
        except Exception as error:
            log.error("could not clean up the stored exports: %s", error)
        self._cleanup = asyncio.get_running_loop().create_task(self._clean_regularly())

    async def _clean_regularly(self) -> None:
        while True:
            await asyncio.sleep(self.settings.exports_cleanup_interval)
            try:
                await self.clean_up()
            except Exception as error:
                log.warning("could not clean up the stored exports: %s", error)

    async def stop_cleanup(self) -> None:
        if self._cleanup is not None:
            self._cleanup.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._cleanup


@dataclass
class _Beat:
    status: str | None
    others: int
    revoked: bool = False  # the token it runs for was revoked (or expired) meanwhile


REVOKED = "its token was revoked or expired while it ran"


class Writer:
    """Fills one stored export (see the module's docstring)."""

    def __init__(self, store: StoredExports, export_id: str, out: Any,
                 on_stop: Callable[[str], None] | None, token_id: int | None = None) -> None:
        self.id = export_id
        # The token whose rights it runs with (a link's maker's too), checked at each beat.
        self._token_id = token_id
        self.bytes = 0
        self.rows = 0
        self.stopped = asyncio.Event()
        self.reason: str | None = None  # why it was stopped
        self._store = store
        self._out = out
        self._on_stop = on_stop
        self._hash = hashlib.sha256()
        cap = store.settings.exports_max_bytes
        self._cap = cap
        # Bytes it may reach, as of its start or its last beat (the others' grow too).
        self.room: int | None = None
        self._beating: asyncio.Task[None] | None = None
        self._done_beating = asyncio.Event()
        self._closed = False

    def start(self) -> None:
        self._beating = asyncio.get_running_loop().create_task(self._beat_regularly())

    def _stop(self, reason: str) -> None:
        if self.stopped.is_set():
            return
        self.reason = reason
        self.stopped.set()
        if self._on_stop is not None:
            self._on_stop(reason)

    async def write(self, chunk: bytes) -> None:
        if self.stopped.is_set():
            raise Stopped(self.reason)
        if self._cap and self.room is not None and self.bytes + len(chunk) > self.room:
            self._stop(QUOTA_EXCEEDED)
            raise Stopped(self.reason)
        # Both release the GIL on large buffers: the second core does the work.
        await asyncio.gather(self._out.write(chunk),
                             asyncio.to_thread(self._hash.update, chunk))
        self.bytes += len(chunk)

    async def progress(self, rows: int) -> None:
        """Rows so far; the next beat writes them (at most one update per interval)."""
        self.rows = rows

    async def _beat(self) -> _Beat:
        valid: sa.ColumnElement[Any] = sa.true()
        if self._token_id is not None:
            valid = sa.select(sa.and_(
                tokens.c.revoked_at.is_(None),
                sa.or_(tokens.c.expires_at.is_(None), tokens.c.expires_at > sa.func.now()),
            )).where(tokens.c.id == self._token_id).scalar_subquery()
        async with self._store.engine.begin() as conn:
            row = (await conn.execute(
                sa.update(t).where(t.c.id == self.id)
                .values(rows=self.rows, bytes=self.bytes, heartbeat=sa.func.now())
                .returning(t.c.status, _used(self.id), valid))).first()
        if row is None:
            return _Beat(None, 0)
        return _Beat(str(row[0]), int(row[1] or 0), revoked=row[2] is not True)

    async def _beat_regularly(self) -> None:
        while True:
            try:
                beat = await asyncio.wait_for(self._beat(), self._store.interval * 5)
            except (TimeoutError, *DATABASE_ERRORS) as error:
                log.warning("stored export %s: could not write its progress: %s", self.id, error)
            else:
                if beat.status != RUNNING:
                    self._stop("cancelled" if beat.status in (CANCELLED, None)
                               else f"marked {beat.status} meanwhile")
                    return
                if beat.revoked:
                    self._stop(REVOKED)
                    return
                if self._cap:
                    self.room = self._cap - beat.others
                    if self.bytes > self.room:
                        self._stop(QUOTA_EXCEEDED)
                        return
            # Woken early when the writer ends: it then returns between two beats.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._done_beating.wait(), self._store.interval)
            if self._done_beating.is_set():
                return

    async def _stop_beating(self) -> None:
        """Let a beat under way finish (cancelling it inside its transaction could leave
        its connection out of the pool), then stop."""
        self._done_beating.set()
        if self._beating is not None:
            # As before, a clean-up that is itself cancelled goes on (fail never raises).
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._beating),
                                       self._store.interval * 5 + 1)
            self._beating.cancel()
            with contextlib.suppress(BaseException):
                await self._beating

    async def finish(self, rows: int | None, snapshot_time: datetime | None,
                     cursor: str | None = None) -> None:
        """Durable, in place, complete (or Stopped, if it was cancelled meanwhile);
        `cursor`, the Export-Cursor of its snapshot."""
        if self.stopped.is_set():
            raise Stopped(self.reason)
        self._closed = True
        await self._stop_beating()
        if rows is not None:
            self.rows = rows
        try:
            await self._out.commit()
        except BaseException:
            await self._out.abort()
            raise
        status = await self._store._close_row(
            self.id, COMPLETE, None, rows=self.rows, bytes=self.bytes,
            sha256=self._hash.digest(), snapshot_time=snapshot_time, cursor=cursor)
        if status != COMPLETE:
            # Cancelled (or deleted) between the last beat and now: its file goes too.
            await self._store.storage.delete(self.id)
            raise Stopped("cancelled")

    async def fail(self, reason: str) -> None:
        """Failed, with `reason` (a cancelled export stays cancelled); the partial file goes.
        Never raises: it runs in clean-ups."""
        self._closed = True
        await self._stop_beating()
        with contextlib.suppress(Exception):
            await self._out.abort()
        try:
            await self._store._close_row(self.id, FAILED, reason[:1000], rows=self.rows,
                                         bytes=self.bytes)
        except Exception as error:
            # The clean-up marks it failed once its heartbeat is stale.
            log.error("stored export %s: could not record its failure: %s", self.id, error)

    @property
    def sha256(self) -> bytes:
        return self._hash.digest()
