"""Caps: concurrent downloads per principal and concurrent exports, for the whole
deployment (every worker and host on one database); bytes per second per download; how
long an export may wait on a client that reads nothing.

Why it works this way: docs/internals.md, section `access/limits.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

import asyncpg
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from exporter import metrics
from exporter.access.admission import ExportWatch, held
from exporter.db import driver_connection, libpq_url_of
from exporter.errors import DATABASE_ERRORS, ApiError, unavailable
from exporter.notices import Notices
from exporter.server.sendfile import BODY_TYPES, body_bytes
from exporter.streaming import ResponseCut, run_detached, unless_disconnected

log = logging.getLogger(__name__)

RETRY_AFTER = "5"
# Waiters per principal beyond its cap: more connections than any download tool opens
# at once, few enough that one client cannot park thousands of requests here.
WAITERS_PER_SLOT = 4


class LocalSlots:
    """What this process holds and awaits of one cap (for /healthz)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0
        self.waiting = 0


def new_instance_id() -> str:
    """This server process, unique in the deployment (and readable in the tables)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


# First argument of the two-key advisory locks: other users of advisory locks in the
# database (the migrations, say) do not collide with the slots' keys.
_LOCK_SPACE = 0x5E0F


class Instance:
    """This process in the deployment: its row in `exporter.instances`, whose lease a
    heartbeat renews every third of `lease` seconds with one UPDATE, whatever the
    number of its slots. Its slots go with the row (at shutdown, or when another
    process finds the lease expired).

    The heartbeat has a connection of its own, outside the pool: a pool that every
    download and export holds (a burst) made it wait, and the slots of a loaded
    process lapsed under it."""

    def __init__(self, engine: AsyncEngine, instance_id: str, lease: float) -> None:
        self.id = instance_id
        self.lease = lease
        self._engine = engine
        self._dsn = libpq_url_of(engine)
        self._conn: Any = None  # asyncpg.Connection, the heartbeat's
        self._heartbeat: asyncio.Task[None] | None = None
        self._renewed: float | None = None  # monotonic, of the last renewal that worked
        # Told when the row was found gone (the slots with it) and made again.
        self.on_lapsed: list[Callable[[], None]] = []

    @property
    def sure(self) -> bool:
        """Whether this process's slots surely still count: its lease was renewed within
        two thirds of its length (one renewal may fail; a lease that may have lapsed lets
        other processes take the slots this one holds)."""
        renewed = self._renewed
        return renewed is not None and time.monotonic() - renewed < self.lease * 2 / 3

    async def renew(self) -> None:
        """Register or extend the lease (in the database's time: hosts' clocks differ)."""
        try:
            asked = time.monotonic()
            if self._conn is None or self._conn.is_closed():
                self._conn = await asyncpg.connect(
                    self._dsn, server_settings={"application_name": "exporter lease"})
            inserted = await self._conn.fetchval(
                "INSERT INTO exporter.instances (id, host, pid, expires_at)"
                " VALUES ($1, $2, $3, now() + make_interval(secs => $4))"
                " ON CONFLICT (id) DO UPDATE SET expires_at = excluded.expires_at"
                " RETURNING xmax = 0",
                self.id, socket.gethostname(), os.getpid(), float(self.lease))
            if inserted and self._renewed is not None:
                # Its lease ran out and another process forgot it, with its slots: what
                # this one held is gone (its downloads in flight count no more).
                log.error("this server process's lease had lapsed: its download slots"
                          " were given up")
                for forget in self.on_lapsed:
                    forget()
            self._renewed = asked
        except BaseException:
            # Cut mid-statement (a deadline), or broken: the next try starts afresh.
            self._drop()
            raise

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()

    async def prune(self) -> int:
        """Forget the processes whose lease ran out, and their slots; how many."""
        async with self._engine.begin() as conn:
            result = await conn.execute(sa.text(
                "DELETE FROM exporter.instances WHERE expires_at <= now()"))
        return int(result.rowcount)

    async def start(self) -> None:
        try:
            async with asyncio.timeout(self.lease / 3):
                await self.renew()
        except Exception as error:
            # Serve anyway: /healthz says the database is down, the heartbeat retries.
            log.error("could not register this server process: %s", error)
        self._heartbeat = asyncio.get_running_loop().create_task(self._beat())

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.lease / 3)
            try:
                # Not asyncio.wait_for, which in Python 3.11 may swallow the cancellation
                # that stops this loop (exports/copy.py): stop() would then wait forever.
                async with asyncio.timeout(self.lease / 3):
                    await self.renew()
            except Exception as error:
                log.warning("could not renew this process's lease (its download slots"
                            " lapse after %g s): %s", self.lease, error)

    async def stop(self) -> None:
        """At shutdown: stop the heartbeat and give back every slot still held."""
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
        self._drop()
        try:
            async with self._engine.begin() as conn:
                await conn.execute(sa.text("DELETE FROM exporter.instances WHERE id = :id"),
                                   {"id": self.id})
        except Exception as error:
            log.warning("could not give back this process's slots (they lapse after"
                        " %g s): %s", self.lease, error)


EXPORTS = "exports"
# Seconds a process keeps the slots it took beyond what it uses now: its peak use of the
# last LINGER seconds stays held, so that a stream of downloads takes and gives back
# nothing in the database (EXPORTER_SLOT_LINGER).
LINGER = 1.0
# The channel on which a process that found no room for a key says so (the key's md5).
# Seconds any request at the cap waits for other processes' unused slots (EXPORTER_LIMIT_WAIT=0
# included): without it, a principal's slots lingering in one process got it 429 from another.
GIVE_BACK_WAIT = 0.5
WANTED = "exporter_slots_wanted"


def _cap(key: str) -> str:
    """A slot's cap, as the metrics name it."""
    return EXPORTS if key == EXPORTS else "principal"


def _random_slot_id() -> int:
    """An id for a slot taken by `_insert_block`: above any the table's identity gives."""
    return (1 << 62) + secrets.randbits(61)


def _literal(text: str) -> str:
    """A text literal (standard_conforming_strings is on: db.SESSION_SETTINGS)."""
    if "\x00" in text:
        raise ValueError("PostgreSQL text cannot hold NUL bytes")
    return "'" + text.replace("'", "''") + "'"


def _key_digest(key: str) -> str:
    """As PostgreSQL's md5() of the key's text."""
    return hashlib.md5(key.encode(), usedforsecurity=False).hexdigest()


class _Grant:
    """The slots of one key that this process holds in the database, and how many of
    them its downloads use: a download takes one of these with no round trip."""

    def __init__(self) -> None:
        self.held: list[int] = []  # the rows' ids
        self.used = 0
        self.peak = 0  # the most used at once since the last trim
        self.taking: asyncio.Future[None] | None = None  # a block being taken
        self.trim: asyncio.TimerHandle | None = None


# The longest pause between two tries of a waiting request: a slot freed by another
# process is seen within this.
MAX_POLL = 0.5


class Lease:
    """The slots one download holds, given back once (the last taken first)."""

    def __init__(self) -> None:
        # Each may return the task that gives its slot back (awaited by `aclose`).
        self._releases: list[Callable[[], object]] = []
        self._kept = False
        # Told when the request that holds the lease is over (before the slots go), so an
        # export whose response never ran to its end can say so, or keep the lease.
        self.on_request_end: Callable[[], None] | None = None
        # Set by a streamed export: the middleware paces and cuts its `send` calls.
        self.watch: ExportWatch | None = None

    @property
    def released(self) -> bool:
        return not self._releases

    def add(self, release: Callable[[], object]) -> None:
        self._releases.append(release)

    def release(self) -> list[asyncio.Future[None]]:
        """Give every slot back (at most once each; later calls do nothing), without
        waiting; the tasks still doing it."""
        pending: list[asyncio.Future[None]] = []
        while self._releases:
            done = self._releases.pop()()
            if isinstance(done, asyncio.Future):
                pending.append(done)
        return pending

    async def aclose(self) -> None:
        """Give every slot back and wait until they are (a next request of the same
        principal then finds them free)."""
        pending = self.release()
        if pending:
            with contextlib.suppress(Exception):
                await asyncio.shield(asyncio.gather(*pending))

    def keep(self) -> Lease:
        """Take the lease over from the request that holds it: its end no longer gives
        the slots back; the caller calls `release` once its work is done."""
        self._kept = True
        return self

    def request_ended(self) -> None:
        """The holding request is over (the middleware calls this once)."""
        ending, self.on_request_end = self.on_request_end, None
        if ending is not None:
            ending()
        if not self._kept:
            self.release()

    async def __aenter__(self) -> Lease:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        traceback: TracebackType | None) -> None:
        await self.aclose()


class Limiter:
    """The deployment's slots: per principal (`limit_key`) and for exports.

    A key's slots are taken from the database in blocks (one, then doubling what this
    process holds, within the cap, under the key's advisory lock) and used from memory:
    a download takes and gives back one of them with no round trip. What is not used is
    given back once it has not been needed for `linger` seconds. The cap holds exactly
    (a slot is used only while its row counts); a process may hold up to its peak of the
    last `linger` seconds unused, which others then wait for."""

    def __init__(self, engine: AsyncEngine, instance_id: str, per_principal: int,
                 wait: float, max_exports: int, exports_wait: float, *,
                 linger: float = LINGER, notices: Notices | None = None,
                 instance: Instance | None = None) -> None:
        self._engine = engine
        # Slots are used from memory only while this process's lease surely runs.
        self._instance = instance
        if instance is not None:
            instance.on_lapsed.append(self._lapsed)
        self.instance_id = instance_id
        self.per_principal = per_principal
        self.wait = wait
        self.exports_wait = exports_wait
        self.linger = linger
        self.exports = LocalSlots(max_exports)
        self._grants: dict[str, _Grant] = {}
        self._waiting: dict[str, int] = {}
        # Set (and replaced) when a slot of the key is given back here.
        self._freed: dict[str, asyncio.Event] = {}
        if notices is not None:
            notices.on(WANTED, self._wanted)

    def _wanted(self, digest: str) -> None:
        """Another process found no room for a key: what this one holds of it unused
        goes back now, not after its linger."""
        for key, grant in list(self._grants.items()):
            if _key_digest(key) == digest:
                grant.peak = grant.used
                if grant.trim is not None:
                    grant.trim.cancel()
                self._trim(key, grant)

    def _lapsed(self) -> None:
        """The rows of every grant are gone: nothing is held; what is in use is let go
        of as it ends, and new downloads take rows again."""
        for grant in self._grants.values():
            grant.held.clear()
            grant.peak = grant.used

    def held(self) -> int:
        """Slots this process holds in the database, used or not (for /healthz)."""
        return sum(len(g.held) for g in self._grants.values())

    async def acquire(self, receive: Receive, key: str, *, export: bool = False) -> Lease:
        """Take the principal's slot (and an export slot), waiting a little if need be,
        while watching the client through `receive`; the lease that holds them.

        429 or 503 with Retry-After when none came in time; ClientLeft if the client
        went away meanwhile. Nothing is held then.
        """
        lease = Lease()
        try:
            if not await self._take(lease, receive, f"principal {key}", self.per_principal,
                                    self.wait, WAITERS_PER_SLOT * self.per_principal):
                raise ApiError(
                    429, f"at most {self.per_principal} downloads at a time; try again shortly",
                    headers={"Retry-After": RETRY_AFTER}, reason="principal_cap")
            if not export:
                return lease
            exports = self.exports
            exports.waiting += 1
            try:
                got = await self._take(lease, receive, EXPORTS, exports.limit,
                                       self.exports_wait, exports.limit)
            finally:
                exports.waiting -= 1
            if not got:
                raise ApiError(503, "the server is running as many exports as it may;"
                               " try again shortly", headers={"Retry-After": RETRY_AFTER},
                               reason="export_cap")
        except BaseException:
            lease.release()
            raise
        self._count_export(lease)
        return lease

    def _count_export(self, lease: Lease) -> None:
        exports = self.exports
        exports.active += 1

        def done() -> None:
            exports.active -= 1

        lease.add(done)

    async def extra_exports(self, lease: Lease, wanted: int) -> int:
        """Up to `wanted` more export slots for `lease` (the extra backends of a parallel
        export, exports/parallel.py), without waiting: only while they leave half of the
        export cap free, so that they never make another export wait. How many it got
        (0 when the database cannot say: the export is then one COPY)."""
        if wanted <= 0:
            return 0
        grant = self._grants.setdefault(EXPORTS, _Grant())
        # New rows only, counted against half the cap with this process's unused slots
        # (held for their linger) left out: those are in no one's use.
        spare = len(grant.held) - grant.used
        task = asyncio.ensure_future(
            self._insert_block(EXPORTS, int(self.exports.limit) // 2 + spare, wanted))
        try:
            ids = await asyncio.shield(task)
        except asyncio.CancelledError:
            def keep_unused(t: asyncio.Task[list[int]]) -> None:
                if not t.cancelled() and t.exception() is None:
                    grant.held += t.result()  # given back after their linger
                    self._arm_trim(EXPORTS, grant)

            task.add_done_callback(keep_unused)
            raise
        except ApiError as error:
            log.warning("no extra export slots (one COPY then): %s", error.message)
            ids = []
        grant.held += ids
        for _ in ids:
            self._use(EXPORTS, grant)
            lease.add(lambda: self._give_back(EXPORTS))
        self._forget_if_idle(EXPORTS, grant)
        return len(ids)

    @staticmethod
    def _use(key: str, grant: _Grant) -> None:
        """One more of the slots `grant` holds in use."""
        grant.used += 1
        grant.peak = max(grant.peak, grant.used)
        metrics.slot_taken(_cap(key))

    async def _take(self, lease: Lease, receive: Receive, key: str, cap: int, wait: float,
                    max_waiting: int) -> bool:
        taken = await self._try(key, cap)
        if not taken:
            waiting = self._waiting.get(key, 0)
            if waiting >= max_waiting:
                return False
            # Other processes may hold slots of the key unused (their linger): told so by
            # the failed take (WANTED), they give them back within moments. So even a
            # request that may not wait for a download to end waits for that.
            wait = max(wait, GIVE_BACK_WAIT)
            self._waiting[key] = waiting + 1
            try:
                taken = await unless_disconnected(self._wait_for(key, cap, wait), receive)
            finally:
                self._waiting[key] -= 1
                if not self._waiting[key]:
                    del self._waiting[key]
                    self._freed.pop(key, None)
            if not taken:
                return False
        lease.add(lambda: self._give_back(key))
        return True

    async def _try(self, key: str, cap: int) -> bool:
        """One of the key's slots: one this process holds, else a block more from the
        database. False if `cap` are taken. Cancelling the caller never leaks a slot: a
        block being taken still comes, and is given back if unused."""
        if self._instance is not None and not self._instance.sure:
            # Its slots may count no more: none is used until the database says again.
            error = ConnectionError("this server process could not renew its lease")
            raise unavailable(error)
        grant = self._grants.setdefault(key, _Grant())
        tried = False
        while True:
            if grant.used < len(grant.held):
                self._use(key, grant)
                return True
            if grant.taking is None:
                want = min(max(1, len(grant.held)), cap - len(grant.held))
                if tried or want <= 0:
                    self._forget_if_idle(key, grant)
                    return False
                tried = True
                grant.taking = asyncio.ensure_future(self._grow(key, grant, cap, want))
                # Its failure is every waiter's 503; none left to hear it is no warning.
                grant.taking.add_done_callback(
                    lambda t: None if t.cancelled() else t.exception())
            # Shared by every request that finds no room meanwhile (one round trip).
            await asyncio.shield(grant.taking)

    async def _grow(self, key: str, grant: _Grant, cap: int, want: int) -> None:
        try:
            grant.held += await self._insert_block(key, cap, want)
        finally:
            grant.taking = None
            self._arm_trim(key, grant)

    async def _insert_block(self, key: str, cap: int, want: int) -> list[int]:
        """Up to `want` slots of `key`, as many as the cap leaves room for: their ids.

        One simple-query message of three statements, run by PostgreSQL as one
        transaction (the lock held to its end), the others with snapshots taken after the
        lock was granted, so that they count every slot taken before. Literals, since the simple
        protocol takes no parameters: the keys are quoted, the rest are numbers."""
        ids = [_random_slot_id() for _ in range(want)]
        k, i = _literal(key), _literal(self.instance_id)
        count = ("(SELECT count(*) FROM exporter.slots s JOIN exporter.instances i"
                 f" ON i.id = s.instance WHERE s.key = {k} AND i.expires_at > now())")
        # Its commit does not wait for the WAL to reach the disk (the slots are
        # bookkeeping of live requests: after a crash the leases lapse anyway): a disk
        # busy with another download's tail would otherwise delay this one's first byte.
        statement = (
            "SELECT set_config('synchronous_commit', 'off', true),"
            f" pg_advisory_xact_lock({_LOCK_SPACE}, hashtext({k}));"
            # No room: the processes that hold slots of the key unused give them back
            # (delivered at the commit, to every process but the ones that hold none).
            f" SELECT pg_notify('{WANTED}', md5({k})) WHERE {count} >= {int(cap)};"
            f" INSERT INTO exporter.slots (id, key, instance)"
            f" SELECT v.id, {k}, {i} FROM unnest(ARRAY[{','.join(map(str, ids))}]::bigint[])"
            f" WITH ORDINALITY AS v(id, n)"
            f" WHERE v.n <= {int(cap)} - {count}")
        try:
            async with self._engine.connect() as conn:
                driver: Any = await driver_connection(conn)
                status = await driver.execute(statement)
        except DATABASE_ERRORS as error:
            # A vanished unix socket is a plain OSError, which the app's handlers leave
            # alone (a file that cannot be read is no database failure): say it here.
            raise unavailable(error) from error
        # The first n of the ordinality: "INSERT 0 n", the last statement's status.
        return ids[:int(str(status).rsplit(" ", 1)[-1])]

    async def _wait_for(self, key: str, cap: int, wait: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        pause = 0.05
        while (remaining := deadline - loop.time()) > 0:
            freed = self._freed.setdefault(key, asyncio.Event())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(pause, remaining)):
                    await freed.wait()
            pause = min(2 * pause, MAX_POLL)
            if await self._try(key, cap):
                return True
        return False

    def _give_back(self, key: str) -> None:
        grant = self._grants[key]
        grant.used -= 1
        metrics.slot_given_back(_cap(key))
        if (freed := self._freed.pop(key, None)) is not None:
            freed.set()
        self._arm_trim(key, grant)
        self._forget_if_idle(key, grant)

    def _arm_trim(self, key: str, grant: _Grant) -> None:
        if grant.trim is None and grant.used < len(grant.held):
            grant.trim = asyncio.get_running_loop().call_later(
                self.linger, self._trim, key, grant)

    def _trim(self, key: str, grant: _Grant) -> None:
        """Give back what the last `linger` seconds did not need."""
        grant.trim = None
        keep = len(grant.held) if grant.taking is not None else max(grant.used, grant.peak)
        grant.peak = grant.used
        if (surplus := len(grant.held) - keep) > 0:
            ids = grant.held[-surplus:]
            del grant.held[-surplus:]
            run_detached(self._delete(key, ids))
        self._forget_if_idle(key, grant)
        self._arm_trim(key, grant)

    def _forget_if_idle(self, key: str, grant: _Grant) -> None:
        if (not grant.held and not grant.used and grant.taking is None
                and self._grants.get(key) is grant):
            del self._grants[key]

    async def _delete(self, key: str, ids: list[int]) -> None:
        try:
            async with self._engine.begin() as conn:
                await conn.execute(sa.text("DELETE FROM exporter.slots WHERE id = ANY(:ids)"),
                                   {"ids": ids})
        except Exception as error:
            # Held until this process stops: a cap a little lower, never a higher one.
            log.warning("could not give back %d download slots of %s: %s", len(ids), key,
                        error)
        finally:
            if (freed := self._freed.pop(key, None)) is not None:
                freed.set()


class DownloadLimits:
    """ASGI middleware: frees a request's slots at its end, paces limited downloads,
    and cuts exports whose clients stall."""

    def __init__(self, app: ASGIApp, bytes_per_second: Callable[[], int]) -> None:
        self.app = app
        self.bytes_per_second = bytes_per_second

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        started = loop.time()
        sent = 0

        async def guarded(message: Message) -> None:
            nonlocal sent
            if message["type"] not in BODY_TYPES:
                await send(message)
                return
            rate = self.bytes_per_second()
            lease = held(scope)
            if rate > 0 and lease is not None:
                sent += body_bytes(message)
                ahead = sent / rate - (loop.time() - started)
                if ahead > 0:
                    await asyncio.sleep(ahead)
            watch: ExportWatch | None = None if lease is None else lease.watch
            limit = None if watch is None else watch.limit(loop.time())
            if limit is None:
                await send(message)
                return
            seconds, reason = limit
            try:
                async with asyncio.timeout(seconds):
                    # uvicorn waits for room before it writes: cut here, nothing is half sent.
                    await send(message)
            except TimeoutError:
                assert watch is not None
                watch.cut(reason)
                raise ResponseCut(reason) from None

        try:
            await self.app(scope, receive, guarded)
        except ResponseCut as cut:
            # Returning without the final chunk makes uvicorn close the connection: the
            # client sees a broken download (curl exit 18, wget 4), not a short file.
            log.warning("%s %s: cut: %s", scope["method"], scope["path"], cut)
        finally:
            # Its export (if any) hears first, and may keep the lease past this.
            if (lease := held(scope)) is not None:
                lease.request_ended()
