"""GET /downloads: the audit trail, for admins, as JSON, CSV or NDJSON."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from exporter.access.authenticate import require_admin
from exporter.errors import ApiError, unavailable
from exporter.exports import openapi, renderers, sql
from exporter.exports.catalog import Catalog, Dataset
from exporter.exports.query import Order, parse
from exporter.exports.routes import export_response
from exporter.state import State
from exporter.tables import APP_SCHEMA, downloads

router = APIRouter()

DEFAULT_JSON_LIMIT = 100


async def _audit_dataset(st: State) -> Dataset:
    dataset = (await Catalog(st.engine, APP_SCHEMA).reload()).get(downloads.name)
    if dataset is None:
        raise unavailable(RuntimeError("the audit table is missing: run `exporter migrate`"))
    return dataset





@router.get("/downloads", openapi_extra=openapi.DOWNLOADS)
async def list_downloads(request: Request) -> Response:
    """Newest first, 100 at a time unless `limit`/`order` say otherwise; filters as exports."""
    st, _ = await require_admin(request)
    query = parse(await _audit_dataset(st), request.query_params.multi_items())
    if not query.order:
        query.order = [Order(query.dataset.columns["id"], descending=True)]
    if query.limit is None:
        query.limit = DEFAULT_JSON_LIMIT
    async with st.engine.connect() as conn:
        await sql.check_values(conn, query)
        result = await conn.exec_driver_sql(
            f"SELECT coalesce(json_agg(s), '[]'::json)::text FROM ({sql.select_sql(query)}) AS s"
        )
        body = result.scalar_one()
    return Response(body, media_type="application/json")


@router.api_route("/downloads.{extension}", methods=["GET", "HEAD"],
                  openapi_extra=openapi.DOWNLOADS)
async def export_downloads(request: Request, extension: str) -> Response:
    st, principal = await require_admin(request)
    renderer = renderers.by_extension(extension)
    if renderer is None:
        raise ApiError(404, f"no format '{extension}'")
    return await export_response(request, st, principal, await _audit_dataset(st), renderer,
                                 from_primary=True)
