"""GET /datasets and the export routes; the work is done in service.py and export.py."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from exporter.access.deps import PrincipalDep, StateDep
from exporter.exports import openapi, service

router = APIRouter()


@router.get("/datasets")
async def list_datasets(request: Request, st: StateDep, principal: PrincipalDep) -> JSONResponse:
    return JSONResponse(await service.list_datasets(request, st, principal))


@router.api_route("/datasets/", methods=["GET", "HEAD"], include_in_schema=False)
async def datasets_slash(request: Request) -> Response:
    # What Starlette did before the route below took slashes: to the listing (a redirect
    # whatever the credentials, as then).
    return service.to_listing(request)


# `:path`: a dataset's name may hold a slash, listed as %2F, which the server decodes
# before routing (so `a%2Fb.csv` arrives as `a/b.csv`); a plain slash means the same.
@router.api_route("/datasets/{name:path}", methods=["GET", "HEAD"],
                  openapi_extra=openapi.EXPORT)
async def export(request: Request, name: str, st: StateDep,
                 principal: PrincipalDep) -> Response:
    return await service.export_by_name(request, st, principal, name)
