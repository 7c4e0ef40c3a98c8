"""/exports: start, watch, list, cancel or remove stored exports, and fetch their files;
the work is in service.py."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from exporter.access.deps import PrincipalDep, StateDep
from exporter.stored import openapi, service

router = APIRouter()


@router.post("/exports", openapi_extra=openapi.START, status_code=202)
async def start(request: Request, st: StateDep, principal: PrincipalDep) -> Response:
    return await service.start(request, st, principal)


@router.get("/exports", openapi_extra=openapi.LISTING)
async def listing(request: Request, st: StateDep, principal: PrincipalDep) -> Response:
    return await service.listing(request, st, principal)


@router.get("/exports/{export_id}", openapi_extra=openapi.STATUS)
async def status(request: Request, export_id: str, st: StateDep,
                 principal: PrincipalDep) -> Response:
    return await service.status(request, st, principal, export_id)


@router.delete("/exports/{export_id}", status_code=204)
async def delete(export_id: str, st: StateDep, principal: PrincipalDep) -> Response:
    return await service.delete(st, principal, export_id)


@router.api_route("/exports/{export_id}/file", methods=["GET", "HEAD"],
                  openapi_extra=openapi.FILE)
async def file(request: Request, export_id: str, st: StateDep,
               principal: PrincipalDep) -> Response:
    return await service.file(request, st, principal, export_id)


# The same file under its own name (`/exports/ID/orders-20261205T111900Z.csv.gz`), the
# URL the manifest gives.
@router.api_route("/exports/{export_id}/{name}", methods=["GET", "HEAD"],
                  openapi_extra=openapi.FILE)
async def named_file(request: Request, export_id: str, name: str, st: StateDep,
                     principal: PrincipalDep) -> Response:
    return await service.file(request, st, principal, export_id, name)
