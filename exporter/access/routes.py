"""Access's endpoints: POST /links (a signed, expiring URL for an export or a file) and,
for admins, GET /tokens and DELETE /tokens/{name} (revoke); the work is in service.py."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from exporter.access import openapi, service
from exporter.access.deps import AdminDep, PrincipalDep, StateDep

router = APIRouter()


@router.post("/links", openapi_extra=openapi.LINKS)
async def create_link(request: Request, st: StateDep, principal: PrincipalDep) -> JSONResponse:
    link = await service.create_link(st.settings, st.links, st.stored, principal,
                                     await request.body(), request.url.netloc,
                                     str(request.base_url))
    return JSONResponse(link, status_code=201)


@router.get("/tokens")
async def list_tokens(st: StateDep, _: AdminDep) -> JSONResponse:
    return JSONResponse(await service.list_tokens(st.tokens))


@router.delete("/tokens/{name}")
async def revoke_token(name: str, st: StateDep, _: AdminDep) -> JSONResponse:
    return JSONResponse(await service.revoke_token(st.tokens, name))
