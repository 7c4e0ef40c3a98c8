"""Stored exports' rows and files together: who owns one, the writer that fills one, the
clean-up. The HTTP side is in service.py; this module is what other code writes through.

Why it works this way: docs/internals.md, section `stored/store.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from exporter.access.durations import parse_duration
from exporter.access.principal import DATASETS, Principal
from exporter.config import Settings
from exporter.errors import DATABASE_ERRORS, ApiError, unavailable, without_paths
from exporter.stored.storage import Storage
from exporter.tables import stored_exports as t
from exporter.tables import tokens

log = logging.getLogger(__name__)

ASYNC, STREAMED = "async", "streamed"
RUNNING, COMPLETE, FAILED, CANCELLED = "running", "complete", "failed", "cancelled"
# A running export whose heartbeat is older than this many progress intervals is dead.
STALE_BEATS = 5
QUOTA_EXCEEDED = "the export exceeds the storage quota (EXPORTER_EXPORTS_MAX_BYTES)"
SHARE_EXCEEDED = ("the export exceeds its principal's share of the storage quota"
                  " (EXPORTER_EXPORTS_QUOTA_PER_PRINCIPAL)")
COPIES_EXCEEDED = ("the copy exceeds the copies' share of the storage quota"
                   " (EXPORTER_EXPORTS_RESUME_SHARE)")
SERVER_STOPPED = "the server stopped while it ran"
EXPIRED = "its file expired (a copy kept only for resuming)"
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
    """Who may see an export besides admins (docs/internals.md, `stored/store.py`)."""
    if principal.token_id is not None:
        return f"token {principal.token_id}"
    return principal.limit_key


def may_see(principal: Principal, owner: str, dataset: str) -> bool:
    """Whether the principal may see a stored export: its own (or an admin), of a dataset
    it may read now (a stored file never outlives the right to read its dataset)."""
    if principal.is_admin:
        return True
    return owner == owner_of(principal) and principal.may_read_dataset(dataset)


def readable_datasets(principal: Principal) -> list[str]:
    """The datasets the principal's scopes name one by one (not `datasets:*`)."""
    return sorted(s.removeprefix(DATASETS) for s in principal.scopes if s.startswith(DATASETS))


class WriterStopped(Exception):
    """The export must stop: cancelled (DELETE), or over the storage quota."""


class QuotaFull(Exception):
    """No room for the bytes an export needs, even once the copies that may go are gone."""


@dataclass
class Usage:
    """Bytes the stored exports hold (running and complete), but one of them."""

    total: int
    copies: int  # kind streamed
    mine: int  # kind async, of the one's owner
    evictable: int  # finished copies


def _usage(exclude: str | None, owner: str) -> sa.Select[Any]:
    holding = t.c.status.in_(_HOLDING)
    where = [holding] if exclude is None else [holding, t.c.id != exclude]

    def total(*only: sa.ColumnElement[bool]) -> sa.ColumnElement[Any]:
        summed = sa.func.sum(t.c.bytes)
        return sa.func.coalesce(summed.filter(*only) if only else summed, 0)

    return sa.select(total(), total(t.c.kind == STREAMED),
                     total(t.c.kind == ASYNC, t.c.owner == owner),
                     total(t.c.kind == STREAMED, t.c.status == COMPLETE)).where(*where)


class Promised:
    """A stored export whose id is known before its row and file exist: `task` makes them
    (once, on the first call) and gives its writer."""

    def __init__(self, export_id: str, begin: Callable[[], Coroutine[Any, Any, Writer]]
                 ) -> None:
        self.id = export_id
        self._begin: Callable[[], Coroutine[Any, Any, Writer]] | None = begin
        self._task: asyncio.Task[Writer] | None = None
        self._done: list[Callable[[], object]] = []

    def whenever_done(self, callback: Callable[[], object]) -> None:
        self._done.append(callback)

    def task(self) -> asyncio.Task[Writer]:
        if self._task is None:
            assert self._begin is not None
            begin, self._begin = self._begin, None
            self._task = asyncio.get_running_loop().create_task(begin())
            self._task.add_done_callback(self._finished)
        return self._task

    def _finished(self, task: asyncio.Task[Writer]) -> None:
        if not task.cancelled():
            task.exception()  # retrieved: its owner logs why, if it awaits it at all
        for callback in self._done:
            callback()


class StoredExports:
    def __init__(self, engine: AsyncEngine, settings: Settings, storage: Storage,
                 instance_id: str) -> None:
        self.engine = engine
        self.settings = settings
        self.storage = storage
        self.instance_id = instance_id
        self.retention: timedelta = parse_duration(settings.exports_retention)
        self.resume_retention: timedelta = parse_duration(settings.exports_resume_retention)
        self.interval = settings.exports_progress_interval
        self._cleanup: asyncio.Task[None] | None = None
        # Exports whose id is promised while their row and file are still being made
        # (`begin_soon`), with their owner and URL: readers in this process wait for them.
        self._starting: dict[str, tuple[str, str, Promised]] = {}

    # --- writing -----------------------------------------------------------------------

    @property
    def share(self) -> int:
        """Bytes one principal's stored exports (kind async) may hold together."""
        s = self.settings
        return int(s.exports_max_bytes * s.exports_quota_per_principal)

    @property
    def copies_share(self) -> int:
        """Bytes the copies of streamed exports may hold together."""
        s = self.settings
        return int(s.exports_max_bytes * s.exports_resume_share)

    async def room(self, export_id: str | None, kind: str, owner: str, needed: int
                   ) -> int | None:
        """The bytes the export may reach, at least `needed`: room is made by removing
        copies of streamed exports (oldest first) whenever an export needs it, not only
        once the quota is full. QuotaFull if there is none; None: no quota."""
        cap = self.settings.exports_max_bytes
        if not cap:
            return None
        async with self.engine.connect() as conn:
            row = (await conn.execute(_usage(export_id, owner))).one()
        used = Usage(*(int(value) for value in row))
        # Nothing is removed for an export that would not fit even then.
        if needed > cap - (used.total - used.evictable):
            raise QuotaFull(QUOTA_EXCEEDED)
        own = self.share - used.mine
        if kind == ASYNC and needed > own:
            # ResumeCopies are not the principal's to give back: another principal's stored
            # exports are what this share protects.
            raise QuotaFull(SHARE_EXCEEDED)
        if kind == STREAMED and needed > self.copies_share - (used.copies - used.evictable):
            raise QuotaFull(COPIES_EXCEEDED)
        short = needed - (cap - used.total)
        if kind == STREAMED:
            short = max(short, needed - (self.copies_share - used.copies))
        if short > 0:
            freed = await self._evict_copies(short, export_id)
            used.total -= freed
            used.copies -= freed
        room = cap - used.total
        room = min(room, own) if kind == ASYNC else min(room, self.copies_share - used.copies)
        if needed > room:
            raise QuotaFull(QUOTA_EXCEEDED if cap - used.total < needed else COPIES_EXCEEDED)
        return room

    async def check_quota(self, principal: Principal, kind: str = ASYNC) -> int | None:
        """507 if there is no room for a new export of `principal` (its share, or the
        whole quota once copies made what room they could); the room it has."""
        try:
            return await self.room(None, kind, owner_of(principal), 1)
        except DATABASE_ERRORS as error:
            raise unavailable(error) from error
        except QuotaFull as full:
            cap = self.settings.exports_max_bytes
            if str(full) == SHARE_EXCEEDED:
                raise ApiError(507, f"your stored exports fill your share of the quota"
                               f" ({self.share} of {cap} bytes,"
                               " EXPORTER_EXPORTS_QUOTA_PER_PRINCIPAL): delete some, or"
                               " wait for older ones to expire") from None
            raise ApiError(507, f"the stored exports fill their quota ({cap} bytes,"
                           " EXPORTER_EXPORTS_MAX_BYTES): delete some, or wait for older"
                           " ones to expire") from None

    async def _evict_copies(self, need: int, exclude: str | None = None) -> int:
        """Make room: remove finished copies of streamed exports (kept only in case a
        download is resumed, the least needed bytes here), those of downloads sent whole
        first, then the oldest, until `need` bytes are freed; how many were. Their rows
        stay, failed, so that a resume never takes another copy for one that is gone
        (exporter/stored/resume_copies.py)."""
        whole = sa.case((t.c.delivered >= t.c.bytes, 0), else_=1)
        where = [t.c.kind == STREAMED, t.c.status == COMPLETE]
        if exclude is not None:
            where.append(t.c.id != exclude)
        async with self.engine.begin() as conn:
            rows = (await conn.execute(
                sa.select(t.c.id, t.c.bytes).where(*where)
                .order_by(whole, t.c.finished).limit(1000))).all()
            chosen, planned = [], 0
            for row in rows:
                if planned >= need:
                    break
                chosen.append(row.id)
                planned += int(row.bytes)
            if not chosen:
                return 0
            # Another process may have taken some meanwhile: count what this one did.
            gone = (await conn.execute(
                sa.update(t).where(t.c.id.in_(chosen), t.c.status == COMPLETE)
                .values(status=FAILED, error=EVICTED)
                .returning(t.c.storage_key, t.c.bytes))).all()
        for key, _ in gone:
            await self.storage.delete(key)
        freed = sum(int(size) for _, size in gone)
        log.info("removed %d copies of streamed exports (%d bytes) to make room",
                 len(gone), freed)
        return freed

    async def begin(self, principal: Principal, *, url: str, dataset: str, format: str,
                    coding: str | None, content_type: str, filename: str, kind: str,
                    estimated_rows: int | None = None,
                    on_stop: Callable[[str], None] | None = None,
                    export_id: str | None = None) -> Writer:
        """A new running export and its writer; 507 when the quota is full."""
        room = await self.check_quota(principal, kind)
        export_id = export_id or new_id()
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
            await self._close_row(export_id, FAILED,
                                  f"the storage refused the file: {without_paths(error)}")
            if isinstance(error, OSError):
                log.error("stored export %s: cannot create its file: %s", export_id, error)
                raise ApiError(503, "the export storage cannot be written now",
                               headers={"Retry-After": "5"}, reason="storage") from error
            raise
        writer = Writer(self, export_id, out, on_stop, kind=kind, owner=owner_of(principal),
                        token_id=principal.token_id)
        writer.room = room
        writer.start()
        return writer

    def begin_soon(self, principal: Principal, **arguments: Any) -> Promised:
        """`begin`, promised: the id it will have, known now, and its row and file made
        once first asked for (`Promised.task`), in a task of their own. A streamed export
        promises its copy's ETag this way and makes the copy once its first chunk is on
        its way. Until they are made (or refused), readers in this process wait for them
        (`started`)."""
        export_id = new_id()
        promised = Promised(export_id, lambda: self.begin(principal, export_id=export_id,
                                                          **arguments))
        self._starting[export_id] = (owner_of(principal), arguments["url"], promised)
        promised.whenever_done(lambda: self._starting.pop(export_id, None))
        return promised

    async def started(self, export_id: str | None = None, *, owner: str | None = None,
                      url: str | None = None) -> None:
        """Once the rows `begin_soon` promised here for `export_id`, or for the owner's
        `url`, are written (or refused): a reader then finds them."""
        tasks = [promised.task() for key, (by, at, promised) in list(self._starting.items())
                 if key == export_id or (by == owner and at == url)]
        if tasks:
            await asyncio.wait(tasks)

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
            # A copy's file goes when it expires, but its row stays, failed, as long as a
            # client may resume any download: a resume must know every response of its
            # URL to prove which one the client's bytes are (resume_copies.py).
            gone_copies = (await conn.execute(
                sa.update(t).where(t.c.kind == STREAMED, t.c.status == COMPLETE,
                                   t.c.expires < sa.func.now())
                .values(status=FAILED, error=EXPIRED,
                        expires=sa.func.now() + self.resume_retention)
                .returning(t.c.storage_key))).scalars().all()
            expired = (await conn.execute(
                sa.delete(t).where(t.c.expires < sa.func.now())
                .returning(t.c.storage_key))).scalars().all()
        for key in [*gone_copies, *expired]:
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
        return {"stale": len(dead), "expired": len(gone_copies) + len(expired),
                "orphans": orphans}

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


REVOKED = "its token was revoked or expired while it ran"


class Writer:
    """Fills one stored export (docs/internals.md, `stored/store.py`)."""

    def __init__(self, store: StoredExports, export_id: str, out: Any,
                 on_stop: Callable[[str], None] | None, *, kind: str = ASYNC,
                 owner: str = "", token_id: int | None = None) -> None:
        self.id = export_id
        # The token whose rights it runs with (a link's maker's too), checked at each beat.
        self._token_id = token_id
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
        self._kind = kind
        self._owner = owner
        # Bytes it may reach, as of its start, its last beat (the others' grow too) or
        # the last room made for it; None: no quota.
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
            raise WriterStopped(self.reason)
        if self.room is not None and self.bytes + len(chunk) > self.room:
            await self._make_room(self.bytes + len(chunk))
            if self.stopped.is_set():
                raise WriterStopped(self.reason)
        # Hashed and written in one worker thread call where the storage allows (a local
        # file): each call is two hops of the event loop, which cost more CPU than the
        # hash of a chunk (measured: docs/internals.md, `stored/store.py`).
        await self._out.write_hashed(chunk, self._hash)
        self.bytes += len(chunk)

    async def progress(self, rows: int) -> None:
        """Rows so far; the next beat writes them (at most one update per interval)."""
        self.rows = rows

    async def _make_room(self, needed: int) -> None:
        """Room for `needed` bytes (copies go first), or stopped: over the quota."""
        try:
            self.room = await self._store.room(self.id, self._kind, self._owner, needed)
        except QuotaFull as full:
            self._stop(str(full))
        except DATABASE_ERRORS as error:
            self._stop(f"the storage quota could not be checked: {error}")

    async def _beat(self) -> tuple[str | None, bool]:
        """Its progress written; its status, and whether its token is still valid."""
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
                .returning(t.c.status, valid))).first()
        if row is None:
            return None, True
        return str(row[0]), row[1] is True

    async def _beat_regularly(self) -> None:
        while True:
            try:
                # asyncio.timeout, not wait_for: in Python 3.11 that may swallow the
                # cancellation that ends this loop (exports/copy.py).
                async with asyncio.timeout(self._store.interval * 5):
                    status, valid = await self._beat()
                if status == RUNNING and self.room is not None:
                    # The others' bytes as they are now (several exports together may
                    # cross the quota): room made again, or stopped.
                    async with asyncio.timeout(self._store.interval * 5):
                        await self._make_room(self.bytes)
            except (TimeoutError, *DATABASE_ERRORS) as error:
                log.warning("stored export %s: could not write its progress: %s", self.id, error)
            else:
                if status != RUNNING:
                    self._stop("cancelled" if status in (CANCELLED, None)
                               else f"marked {status} meanwhile")
                    return
                if not valid:
                    self._stop(REVOKED)
                    return
                if self.stopped.is_set():
                    return
            # Woken early when the writer ends: it then returns between two beats.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._store.interval):
                    await self._done_beating.wait()
            if self._done_beating.is_set():
                return

    async def _stop_beating(self) -> None:
        """Let a beat under way finish (cancelling it inside its transaction could leave
        its connection out of the pool), then stop."""
        self._done_beating.set()
        if self._beating is not None:
            # As before, a clean-up that is itself cancelled goes on (fail never raises).
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                async with asyncio.timeout(self._store.interval * 5 + 1):
                    await asyncio.shield(self._beating)
            self._beating.cancel()
            with contextlib.suppress(BaseException):
                await self._beating

    async def finish(self, rows: int | None, snapshot_time: datetime | None,
                     cursor: str | None = None) -> None:
        """Durable, in place, complete (or WriterStopped, if it was cancelled meanwhile);
        `cursor`, the Export-Cursor of its snapshot."""
        if self.stopped.is_set():
            raise WriterStopped(self.reason)
        self._closed = True
        if rows is not None:
            self.rows = rows
        try:
            # Beating on meanwhile: an object store's last part and the upload's completion
            # take seconds, and another host's clean-up takes a silent export for dead.
            await self._out.commit()
        except BaseException:
            await self._stop_beating()
            await self._out.abort()
            raise
        await self._stop_beating()
        status = await self._store._close_row(
            self.id, COMPLETE, None, rows=self.rows, bytes=self.bytes,
            sha256=self._hash.digest(), snapshot_time=snapshot_time, cursor=cursor)
        if status != COMPLETE:
            # Cancelled (or deleted) between the last beat and now: its file goes too.
            await self._store.storage.delete(self.id)
            raise WriterStopped("cancelled")

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
