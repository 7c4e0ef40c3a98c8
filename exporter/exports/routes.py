"""GET /datasets and the export routes; the work is done in service.py and export.py,
the answer made in responses.py."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from exporter.access.deps import ClientDep, PrincipalDep, StateDep
from exporter.exports import openapi, responses, service
from exporter.exports.deps import ExportsDep, headers_of
from exporter.openapi import get_and_head

router = APIRouter()


@router.get("/datasets")
async def list_datasets(request: Request, exports: ExportsDep,
                        principal: PrincipalDep) -> JSONResponse:
    return JSONResponse(await service.list_datasets(exports.catalog, principal,
                                                    str(request.base_url)))


@get_and_head(router, "/datasets/", include_in_schema=False)
async def datasets_slash(request: Request) -> Response:
    # What Starlette did before the route below took slashes: to the listing (a redirect
    # whatever the credentials, as then).
    return responses.to_listing(request)


# `:path`: a dataset's name may hold a slash, listed as %2F, which the server decodes
# before routing (so `a%2Fb.csv` arrives as `a/b.csv`); a plain slash means the same.
@get_and_head(router, "/datasets/{name:path}", openapi_extra=openapi.EXPORT)
async def export(request: Request, name: str, st: StateDep, exports: ExportsDep,
                 client: ClientDep, principal: PrincipalDep) -> Response:
    answer = await service.export_by_name(exports, client, principal, name,
                                          headers_of(request), request.method)
    return await responses.respond(request, answer, st.resume_copies)
