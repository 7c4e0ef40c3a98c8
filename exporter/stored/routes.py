"""/exports: start, watch, list, cancel or remove stored exports, and fetch their files;
the work is in service.py, the answers made in responses.py."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from exporter.access.deps import ClientDep, PrincipalDep
from exporter.exports.deps import ExportsDep
from exporter.exports.responses import started
from exporter.files.deps import FilesDep
from exporter.openapi import get_and_head
from exporter.stored import openapi, responses, service
from exporter.stored.deps import StoredDep

router = APIRouter()


@router.post("/exports", openapi_extra=openapi.START, status_code=202)
async def start(request: Request, stored: StoredDep, exports: ExportsDep, client: ClientDep,
                principal: PrincipalDep) -> Response:
    return started(request, await service.start(
        stored, exports, client, principal, await request.body(),
        request.scope.get("root_path", "")))


@router.get("/exports", openapi_extra=openapi.LISTING)
async def listing(request: Request, stored: StoredDep, principal: PrincipalDep) -> Response:
    rows = await stored.listing(principal, request.query_params.get("limit"),
                                request.query_params.get("kind"))
    return responses.listing(request, rows)


@router.get("/exports/{export_id}", openapi_extra=openapi.STATUS)
async def status(request: Request, export_id: str, stored: StoredDep,
                 principal: PrincipalDep) -> Response:
    return responses.status(request, await stored.status(principal, export_id),
                            stored.retry_after())


@router.delete("/exports/{export_id}", status_code=204)
async def delete(export_id: str, stored: StoredDep, principal: PrincipalDep) -> Response:
    await stored.delete(principal, export_id)
    return Response(status_code=204)


@get_and_head(router, "/exports/{export_id}/file", openapi_extra=openapi.FILE)
async def file(request: Request, export_id: str, files: FilesDep, stored: StoredDep,
               principal: PrincipalDep) -> Response:
    return await responses.file(request, files, stored, principal, export_id)


# The same file under its own name (`/exports/ID/orders-20261205T111900Z.csv.gz`), the
# URL the manifest gives.
@get_and_head(router, "/exports/{export_id}/{name}", openapi_extra=openapi.FILE)
async def named_file(request: Request, export_id: str, name: str, files: FilesDep,
                     stored: StoredDep, principal: PrincipalDep) -> Response:
    return await responses.file(request, files, stored, principal, export_id, name)
