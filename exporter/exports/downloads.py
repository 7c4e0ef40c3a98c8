"""GET /downloads: the audit trail, for admins, as JSON, CSV or NDJSON."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from exporter.access.deps import AdminDep, ClientDep, StateDep
from exporter.exports import openapi, responses, service
from exporter.exports.deps import ExportsDep, headers_of
from exporter.openapi import get_and_head

router = APIRouter()


@router.get("/downloads", openapi_extra=openapi.DOWNLOADS)
async def list_downloads(request: Request, st: StateDep, exports: ExportsDep,
                         client: ClientDep, admin: AdminDep) -> Response:
    """Newest first, 100 at a time unless `limit`/`order` say otherwise; filters as exports."""
    answer = await service.list_downloads(exports, client, admin, headers_of(request),
                                          request.method)
    return await responses.respond(request, answer, st.resume_copies)


@get_and_head(router, "/downloads.{extension}", openapi_extra=openapi.DOWNLOADS)
async def export_downloads(request: Request, extension: str, st: StateDep,
                           exports: ExportsDep, client: ClientDep,
                           admin: AdminDep) -> Response:
    answer = await service.export_downloads(exports, client, admin, extension,
                                            headers_of(request), request.method)
    return await responses.respond(request, answer, st.resume_copies)
