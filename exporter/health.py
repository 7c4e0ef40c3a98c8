"""GET /healthz: is the database (and the read replica, if any) reachable, is the
server busy, and is every download audited (`degraded` for a while after the database
refused an audit row: exporter/audit.py).

The database is asked on a connection of its own, outside the pool. When every pool
connection is taken (slow clients, a burst of exports), a probe that
waited for one would hang and then call a healthy database down. So the probe keeps
one dedicated connection, gives up after `timeout`, and its answer is shared by the
requests that come while it runs. So /healthz answers within about a second also when
every connection is taken: "busy" (200) then, not "down".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import asyncpg
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy.pool import QueuePool

from exporter.db import libpq_url
from exporter.errors import describe
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
                await asyncio.wait_for(conn.close(), 2)


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
    problem, replica_problem = await asyncio.gather(
        st.health.problem(),
        st.replica_health.problem() if st.replica_health else asyncio.sleep(0, None))
    if st.replica_health is not None:
        body["replica"] = {"status": "ok"} if replica_problem is None else {
            "status": "unavailable",
            "error": f"the read replica is unavailable: {replica_problem}"}
    if problem is not None:
        body.update(status="unavailable", error=f"the database is unavailable: {problem}")
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
