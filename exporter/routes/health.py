"""GET /healthz: is the database reachable, and how full is the pool."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text
from sqlalchemy.pool import QueuePool

from exporter.state import get_state

router = APIRouter()


@router.get("/healthz")
async def healthz(request: Request) -> JSONResponse:
    engine = get_state(request).engine
    pool = engine.pool
    body: dict[str, Any] = {"status": "ok"}
    if isinstance(pool, QueuePool):
        body["pool"] = {"size": pool.size(), "checked_out": pool.checkedout(),
                        "overflow": pool.overflow()}
    try:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
    except Exception as error:
        body.update(status="unavailable", error=f"{type(error).__name__}: {error}")
        return JSONResponse(body, status_code=503)
    return JSONResponse(body)
