"""GET /healthz: is the database (and the read replica, if any) reachable, and is the
server busy.

It never waits for a pool connection (see exporter/health.py), so it answers within
about a second also when every connection is taken: "busy" (200) then, not "down".
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy.pool import QueuePool

from exporter.state import get_state

router = APIRouter()


@router.get("/healthz")
async def healthz(request: Request) -> JSONResponse:
    st = get_state(request)
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
    elif busy:
        body["status"] = "busy"
    return JSONResponse(body)
