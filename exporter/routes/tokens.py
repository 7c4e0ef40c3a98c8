"""Admin endpoints for tokens: GET /tokens, DELETE /tokens/{name} (revoke)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from exporter.access.authenticate import require_admin
from exporter.errors import ApiError

router = APIRouter()


@router.get("/tokens")
async def list_tokens(request: Request) -> JSONResponse:
    st, _ = await require_admin(request)
    return JSONResponse([
        {"name": t.name, "scopes": t.scopes, "state": t.state,
         "created_at": t.created_at.isoformat(),
         "expires_at": t.expires_at.isoformat() if t.expires_at else None,
         "last_used_at": t.last_used_at.isoformat() if t.last_used_at else None,
         "revoked_at": t.revoked_at.isoformat() if t.revoked_at else None}
        for t in await st.tokens.list()
    ])


@router.delete("/tokens/{name}")
async def revoke_token(request: Request, name: str) -> JSONResponse:
    st, _ = await require_admin(request)
    if not await st.tokens.revoke(name):
        raise ApiError(404, f"no active token named {name!r}")
    return JSONResponse({"name": name, "state": "revoked"})
