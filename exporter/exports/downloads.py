"""GET /downloads: the audit trail, for admins, as JSON, CSV or NDJSON."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from exporter.access.deps import AdminDep, StateDep
from exporter.exports import openapi, service

router = APIRouter()


@router.get("/downloads", openapi_extra=openapi.DOWNLOADS)
async def list_downloads(request: Request, st: StateDep, admin: AdminDep) -> Response:
    """Newest first, 100 at a time unless `limit`/`order` say otherwise; filters as exports."""
    return await service.list_downloads(request, st, admin)


@router.api_route("/downloads.{extension}", methods=["GET", "HEAD"],
                  openapi_extra=openapi.DOWNLOADS)
async def export_downloads(request: Request, extension: str, st: StateDep,
                           admin: AdminDep) -> Response:
    return await service.export_downloads(request, st, admin, extension)
