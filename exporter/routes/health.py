"""GET /healthz: is the database reachable, and is the server busy.

It never waits for a pool connection (see exporter/health.py), so it answers within
about a second also when every connection is taken: "busy" (200) then, not "down".
"""

from __future__ import annotations

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
    problem = await st.health.problem()
    if problem is not None:
        body.update(status="unavailable", error=f"the database is unavailable: {problem}")
        return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})
    if busy:
        body["status"] = "busy"
    return JSONResponse(body)
