"""GET /healthz: is the database (and the read replica, if any) reachable, is the
server busy, and is every download audited (`degraded` for a while after the database
refused an audit row: exporter/audit.py).

The database is asked on a connection of its own, outside the pool. When every pool
connection is taken (slow clients, a burst of exports), a probe that
waited for one would hang and then call a healthy database down. So the probe keeps
one dedicated connection, gives up after `timeout`, and its answer is shared by the
requests that come while it runs. So /healthz answers within about a second also when
every connection is taken: "busy" (200) then, not "down".

With files or stored exports in object storage, the store is asked too (`StoreHealth`):
one cheap request per store, its answer kept STORE_TTL seconds, since a load balancer
asks /healthz often and each probe must not cost a request to S3.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import asyncpg
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy.pool import QueuePool

from exporter.config import Settings
from exporter.db import libpq_url
from exporter.errors import describe
from exporter.objects import ObjectStore, StoreOptions, StoreUnavailable
from exporter.state import State, get_state

log = logging.getLogger(__name__)

router = APIRouter()


class Health:
    def __init__(self, url: str, *, timeout: float = 0.8) -> None:
        self._dsn = libpq_url(url)
        self.timeout = timeout
        self._conn: Any = None  # asyncpg.Connection
        self._running: asyncio.Task[str | None] | None = None

    async def problem(self) -> str | None:
        """None if the database answered, else what is wrong (no user, host or SQL).

        Callers that come while a probe runs share its answer: many health checks at
        once cost one query.
        """
        if self._running is None or self._running.done():
            self._running = asyncio.get_running_loop().create_task(self._check())
        return await asyncio.shield(self._running)

    async def _check(self) -> str | None:
        try:
            async with asyncio.timeout(self.timeout):
                await self._probe()
            return None
        except Exception as error:  # TimeoutError included
            self._drop()
            log.warning("health probe failed: %s: %s", type(error).__name__, error)
            return describe(error)

    async def _probe(self) -> None:
        if self._conn is not None:
            try:
                await self._conn.fetchval("SELECT 1")
                return
            except (asyncpg.PostgresConnectionError, asyncpg.InterfaceError, OSError):
                self._drop()  # the server restarted since, say: one more try on a new one
        self._conn = await asyncpg.connect(
            self._dsn, server_settings={"application_name": "exporter health"})
        await self._conn.fetchval("SELECT 1")

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await conn.close()


# Seconds a store's answer stands for the probes that follow, and that it may take.
STORE_TTL = 2.0
STORE_TIMEOUT = 1.5


class StoreHealth:
    """Whether the object stores answer (EXPORTER_FILES_ROOT, EXPORTER_EXPORTS_DIR when
    they are `s3://`): at most one check per STORE_TTL seconds, shared by the probes that
    come meanwhile."""

    def __init__(self, stores: dict[str, ObjectStore], *, ttl: float = STORE_TTL,
                 timeout: float = STORE_TIMEOUT) -> None:
        self.stores = stores  # by what they hold: "files", "exports"
        self.ttl, self.timeout = ttl, timeout
        self.checks = 0  # requests made (each is one per store)
        self._answer: str | None = None
        self._answered = -float("inf")
        self._running: asyncio.Task[str | None] | None = None

    @classmethod
    def of(cls, settings: Settings, *, files: ObjectStore | None = None,
           exports: ObjectStore | None = None) -> StoreHealth | None:
        """For the stores the settings name: those given (the app's own, so the probe goes
        through the clients the downloads use), else made from the settings."""
        options = StoreOptions.from_settings(settings)
        given = {"files": files, "exports": exports}
        stores = {role: given[role] or ObjectStore(url, options) for role, url in (
            ("files", settings.files_store), ("exports", settings.exports_store))
            if url is not None}
        return cls(stores) if stores else None

    async def problem(self) -> str | None:
        """None if every store answered, else which did not (their words go to the log)."""
        if time.monotonic() - self._answered < self.ttl:
            return self._answer
        if self._running is None or self._running.done():
            self._running = asyncio.get_running_loop().create_task(self._check())
        return await asyncio.shield(self._running)

    async def _check(self) -> str | None:
        self.checks += 1
        failed = await asyncio.gather(*(self._failed(role, store)
                                        for role, store in self.stores.items()))
        problems = [f for f in failed if f is not None]
        self._answer = "; ".join(problems) if problems else None
        self._answered = time.monotonic()
        return self._answer

    async def _failed(self, role: str, store: ObjectStore) -> str | None:
        try:
            async with asyncio.timeout(self.timeout):
                await store.ping()
            return None
        except TimeoutError:
            log.warning("health probe of the %s store (%s): no answer within %g s", role,
                        store.url, self.timeout)
            return f"the {role} store did not answer within {self.timeout:g} s"
        except StoreUnavailable as error:
            log.warning("health probe of the %s store (%s) failed: %s", role, store.url,
                        error)
            return f"the {role} store failed (see the log)"


@router.get("/healthz")
async def healthz(request: Request) -> JSONResponse:
    return await report(get_state(request))


async def report(st: State) -> JSONResponse:
    """The answer of /healthz: 200 (ok, busy or degraded) or 503 with Retry-After."""
    pool = st.engine.pool
    body: dict[str, Any] = {"status": "ok"}
    busy = False
    if isinstance(pool, QueuePool):
        body["pool"] = {"size": pool.size(), "checked_out": pool.checkedout(),
                        "overflow": pool.overflow()}
        s = st.settings
        busy = pool.checkedout() >= s.pool_size + s.pool_max_overflow
    exports = st.limiter.exports
    body["exports"] = {"active": exports.active, "max": exports.limit,
                       "waiting": exports.waiting}
    busy = busy or exports.active >= exports.limit
    if st.notices is not None:
        # Off, tokens are read from the database on every request (slower, as exact).
        body["caches"] = "on" if st.notices.live else "off"
    audit = st.audit
    body["audit"] = {"pending": audit.pending, "refused": audit.refused}
    if audit.overflowed:
        body["audit"]["overflowed"] = audit.overflowed
    if audit.last_refused is not None:
        body["audit"].update(last_refused=audit.last_refused.isoformat(timespec="seconds"),
                             last_refused_error=audit.last_refused_error)
    problem, replica_problem, store_problem = await asyncio.gather(
        st.health.problem(),
        st.replica_health.problem() if st.replica_health else asyncio.sleep(0, None),
        st.store_health.problem() if st.store_health else asyncio.sleep(0, None))
    if st.store_health is not None:
        body["store"] = {"status": "ok"} if store_problem is None else {
            "status": "unavailable",
            "error": f"the object store is unavailable: {store_problem}"}
    if st.replica_health is not None:
        body["replica"] = {"status": "ok"} if replica_problem is None else {
            "status": "unavailable",
            "error": f"the read replica is unavailable: {replica_problem}"}
    if problem is not None:
        body.update(status="unavailable", error=f"the database is unavailable: {problem}")
        return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})
    if store_problem is not None:
        # As for the database: the files (or stored exports) this host serves are there.
        body.update(status="unavailable", error=body["store"]["error"])
        return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})
    # Still 200: files and everything but exports work, and a balancer that took every
    # host sharing the replica out of service would stop those too. Exports answer 503.
    if replica_problem is not None:
        body["status"] = "degraded"
    elif audit.overflowing:
        body["status"] = "degraded"
        body["error"] = (f"{audit.pending} audit rows wait to be written: new downloads"
                         " are refused until they are (see the log)")
    elif audit.refusing:
        # Downloads go on, but some go unaudited: an operator must look (the log has
        # each refused row at ERROR).
        body["status"] = "degraded"
        body["error"] = (f"the database refused {audit.refused} audit rows (the last at"
                         f" {body['audit']['last_refused']}): see the log")
    elif busy:
        body["status"] = "busy"
    return JSONResponse(body)
