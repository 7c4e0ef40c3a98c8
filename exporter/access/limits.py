"""Caps: concurrent downloads per principal and concurrent exports, for the whole
deployment (every worker and host on one database); bytes per second per download; how
long an export may wait on a client that reads nothing.

Why it works this way: docs/internals.md, section `access/limits.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from collections.abc import Callable
from types import TracebackType
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from exporter import metrics
from exporter.access.admission import ExportWatch, held
from exporter.db import driver_connection
from exporter.errors import DATABASE_ERRORS, ApiError, unavailable
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
_TAKE = sa.text(
    "INSERT INTO exporter.slots (key, instance) SELECT :key, :instance"
    " WHERE (SELECT count(*) FROM exporter.slots s JOIN exporter.instances i"
    "        ON i.id = s.instance WHERE s.key = :key AND i.expires_at > now()) < :cap"
    " RETURNING id")


class Instance:
    """This process in the deployment: its row in `exporter.instances`, whose lease a
    heartbeat renews every third of `lease` seconds with one UPDATE, whatever the
    number of its slots. Its slots go with the row (at shutdown, or when another
    process finds the lease expired)."""

    def __init__(self, engine: AsyncEngine, instance_id: str, lease: float) -> None:
        self.id = instance_id
        self.lease = lease
        self._engine = engine
        self._heartbeat: asyncio.Task[None] | None = None

    async def renew(self) -> None:
        """Register or extend the lease (in the database's time: hosts' clocks differ)."""
        async with self._engine.begin() as conn:
            await conn.execute(sa.text(
                "INSERT INTO exporter.instances (id, host, pid, expires_at)"
                " VALUES (:id, :host, :pid, now() + make_interval(secs => :lease))"
                " ON CONFLICT (id) DO UPDATE SET expires_at = excluded.expires_at"),
                {"id": self.id, "host": socket.gethostname(), "pid": os.getpid(),
                 "lease": self.lease})

    async def prune(self) -> int:
        """Forget the processes whose lease ran out, and their slots; how many."""
        async with self._engine.begin() as conn:
            result = await conn.execute(sa.text(
                "DELETE FROM exporter.instances WHERE expires_at <= now()"))
        return int(result.rowcount)

    async def start(self) -> None:
        try:
            await self.renew()
        except Exception as error:
            # Serve anyway: /healthz says the database is down, the heartbeat retries.
            log.error("could not register this server process: %s", error)
        self._heartbeat = asyncio.get_running_loop().create_task(self._beat())

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.lease / 3)
            try:
                await asyncio.wait_for(self.renew(), self.lease / 3)
            except Exception as error:
                log.warning("could not renew this process's lease (its download slots"
                            " lapse after %g s): %s", self.lease, error)

    async def stop(self) -> None:
        """At shutdown: stop the heartbeat and give back every slot still held."""
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
        try:
            async with self._engine.begin() as conn:
                await conn.execute(sa.text("DELETE FROM exporter.instances WHERE id = :id"),
                                   {"id": self.id})
        except Exception as error:
            log.warning("could not give back this process's slots (they lapse after"
                        " %g s): %s", self.lease, error)


EXPORTS = "exports"


def _cap(key: str) -> str:
    """A slot's cap, as the metrics name it."""
    return EXPORTS if key == EXPORTS else "principal"


def _random_slot_id() -> int:
    """An id for a slot taken by `_take_both`: above any the table's identity gives."""
    return (1 << 62) + secrets.randbits(61)


def _literal(text: str) -> str:
    """A text literal (standard_conforming_strings is on: db.SESSION_SETTINGS)."""
    if "\x00" in text:
        raise ValueError("PostgreSQL text cannot hold NUL bytes")
    return "'" + text.replace("'", "''") + "'"
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
    """The deployment's slots: per principal (`limit_key`) and for exports."""

    def __init__(self, engine: AsyncEngine, instance_id: str, per_principal: int,
                 wait: float, max_exports: int, exports_wait: float) -> None:
        self._engine = engine
        self.instance_id = instance_id
        self.per_principal = per_principal
        self.wait = wait
        self.exports_wait = exports_wait
        self.exports = LocalSlots(max_exports)
        self._waiting: dict[str, int] = {}
        # Set (and replaced) when a slot of the key is given back here.
        self._freed: dict[str, asyncio.Event] = {}

    async def acquire(self, receive: Receive, key: str, *, export: bool = False) -> Lease:
        """Take the principal's slot (and an export slot), waiting a little if need be,
        while watching the client through `receive`; the lease that holds them.

        429 or 503 with Retry-After when none came in time; ClientLeft if the client
        went away meanwhile. Nothing is held then.
        """
        lease = Lease()
        if export and await self._take_both(lease, f"principal {key}"):
            return lease
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

    async def _take_both(self, lease: Lease, key: str) -> bool:
        """Both slots of an export in one round trip, when both caps have room (the
        usual case); False, holding nothing, otherwise (then each is taken on its own,
        with the waits that go with it)."""
        ids = [_random_slot_id(), _random_slot_id()]
        task = asyncio.ensure_future(self._insert_both(key, ids))
        try:
            taken = await asyncio.shield(task)
        except asyncio.CancelledError:
            def give_back(t: asyncio.Task[bool]) -> None:
                if not t.cancelled() and t.exception() is None and t.result():
                    self._give_back(EXPORTS, ids[1])
                    self._give_back(key, ids[0])

            task.add_done_callback(give_back)
            raise
        if not taken:
            return False
        lease.add(lambda: self._give_back(key, ids[0]))
        lease.add(lambda: self._give_back(EXPORTS, ids[1]))
        self._count_export(lease)
        return True

    async def _insert_both(self, key: str, ids: list[int]) -> bool:
        # One simple-protocol message of two statements: PostgreSQL runs them as one
        # transaction (the locks held to its end), the second with a snapshot taken after
        # the locks were granted, so that it counts every slot taken before. Literals,
        # since the simple protocol takes no parameters: the keys are quoted, the rest
        # are numbers. The principal's lock first, as every taker does.
        k, e, i = _literal(key), _literal(EXPORTS), _literal(self.instance_id)
        count = ("(SELECT count(*) FROM exporter.slots s JOIN exporter.instances i ON"
                 " i.id = s.instance WHERE s.key = {} AND i.expires_at > now())")
        # Its commit does not wait for the WAL to reach the disk (the slots are
        # bookkeeping of live requests: after a crash the leases lapse anyway): a disk busy
        # with another download's tail would otherwise delay this one's first byte.
        statement = (
            "SELECT set_config('synchronous_commit', 'off', true),"
            f" pg_advisory_xact_lock({_LOCK_SPACE}, hashtext({k})),"
            f" pg_advisory_xact_lock({_LOCK_SPACE}, hashtext({e}));"
            f" INSERT INTO exporter.slots (id, key, instance)"
            f" SELECT v.id, v.key, {i} FROM (VALUES ({ids[0]}::bigint, {k}),"
            f" ({ids[1]}::bigint, {e})) AS v(id, key)"
            f" WHERE {count.format(k)} < {int(self.per_principal)}"
            f" AND {count.format(e)} < {int(self.exports.limit)}")
        try:
            async with self._engine.connect() as conn:
                driver: Any = await driver_connection(conn)
                status = await driver.execute(statement)
        except DATABASE_ERRORS as error:
            raise unavailable(error) from error
        if str(status) == "INSERT 0 2":
            metrics.slot_taken(_cap(key))
            metrics.slot_taken(_cap(EXPORTS))
            return True
        return False

    async def _take(self, lease: Lease, receive: Receive, key: str, cap: int, wait: float,
                    max_waiting: int) -> bool:
        slot = await self._try(key, cap)
        if slot is None:
            waiting = self._waiting.get(key, 0)
            if wait <= 0 or waiting >= max_waiting:
                return False
            self._waiting[key] = waiting + 1
            try:
                slot = await unless_disconnected(self._wait_for(key, cap, wait), receive)
            finally:
                self._waiting[key] -= 1
                if not self._waiting[key]:
                    del self._waiting[key]
                    self._freed.pop(key, None)
            if slot is None:
                return False
        taken = slot
        lease.add(lambda: self._give_back(key, taken))
        return True

    async def _try(self, key: str, cap: int) -> int | None:
        """A slot's id, or None if `cap` are taken. Cancelling the caller never leaks a
        slot: a take already under way finishes, and what it took is given back."""
        task = asyncio.ensure_future(self._insert(key, cap))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            def give_back(t: asyncio.Task[int | None]) -> None:
                if not t.cancelled() and t.exception() is None and (slot := t.result()):
                    self._give_back(key, slot)

            task.add_done_callback(give_back)
            raise

    async def _insert(self, key: str, cap: int) -> int | None:
        try:
            async with self._engine.begin() as conn:
                # Takers of one key one after the other (the count then the insert).
                await conn.execute(
                    sa.text("SELECT pg_advisory_xact_lock(:space, hashtext(:key))"),
                    {"space": _LOCK_SPACE, "key": key})
                slot = await conn.scalar(_TAKE, {"key": key, "instance": self.instance_id,
                                                 "cap": cap})
        except DATABASE_ERRORS as error:
            # A vanished unix socket is a plain OSError, which the app's handlers leave
            # alone (a file that cannot be read is no database failure): say it here.
            raise unavailable(error) from error
        if slot is None:
            return None
        metrics.slot_taken(_cap(key))
        return int(slot)

    async def _wait_for(self, key: str, cap: int, wait: float) -> int | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        pause = 0.05
        while (remaining := deadline - loop.time()) > 0:
            freed = self._freed.setdefault(key, asyncio.Event())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(pause, remaining)):
                    await freed.wait()
            pause = min(2 * pause, MAX_POLL)
            if (slot := await self._try(key, cap)) is not None:
                return slot
        return None

    def _give_back(self, key: str, slot: int) -> asyncio.Task[None]:
        return run_detached(self._delete(key, slot))

    async def _delete(self, key: str, slot: int) -> None:
        try:
            async with self._engine.begin() as conn:
                await conn.execute(sa.text("DELETE FROM exporter.slots WHERE id = :id"),
                                   {"id": slot})
        except Exception as error:
            # Held until this process stops: a cap a little lower, never a higher one.
            log.warning("could not give back download slot %s of %s: %s", slot, key, error)
        finally:
            metrics.slot_given_back(_cap(key))
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
            if message["type"] != "http.response.body":
                await send(message)
                return
            rate = self.bytes_per_second()
            lease = held(scope)
            if rate > 0 and lease is not None:
                sent += len(message.get("body", b""))
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
