"""GET /datasets and the export routes; the work is done in export.py."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from exporter import renderers, sql
from exporter.audit import Download
from exporter.catalog import Catalog, Dataset
from exporter.errors import ApiError
from exporter.export import Export, filename
from exporter.http import content_disposition, parse_accept
from exporter.query import parse
from exporter.renderers import Renderer
from exporter.state import get_state
from exporter.streaming import unless_disconnected

router = APIRouter()


def export_urls(request: Request, dataset: Dataset) -> dict[str, str]:
    base = str(request.base_url).rstrip("/")
    return {
        r.name: f"{base}/datasets/{quote(dataset.name)}.{r.extension}"
        for r in renderers.all_renderers()
    }


@router.get("/datasets")
async def list_datasets(request: Request) -> JSONResponse:
    catalog = get_state(request).catalog
    items: list[dict[str, Any]] = []
    for ds in await catalog.all():
        items.append({
            "name": ds.name,
            "kind": ds.kind,
            "estimated_rows": ds.estimated_rows,
            "columns": [
                {"name": c.name, "type": c.type, "nullable": c.nullable}
                for c in ds.columns.values()
            ],
            "exports": export_urls(request, ds),
        })
    return JSONResponse({"schema": catalog.schema, "datasets": items})


def negotiate(accept: str | None) -> Renderer:
    for media_type in parse_accept(accept):
        if media_type in ("*/*", "text/*"):
            return renderers.DEFAULT
        renderer: Renderer | None = renderers.by_media_type(media_type)
        if renderer is not None:
            return renderer
    offered = ", ".join(r.media_type for r in renderers.all_renderers())
    raise ApiError(406, f"this dataset is available as {offered}")


async def resolve(catalog: Catalog, name: str, accept: str | None) -> tuple[Dataset, Renderer]:
    """`orders.csv` names dataset and format; `orders` leaves the format to Accept."""
    base, dot, extension = name.rpartition(".")
    by_suffix = renderers.by_extension(extension) if dot else None
    for attempt in range(2):
        if attempt:
            await catalog.reload()  # a table or view created since the last look
        if by_suffix is not None and (ds := catalog.get(base)):
            return ds, by_suffix
        if ds := catalog.get(name):
            return ds, negotiate(accept)
    raise ApiError(404, f"no dataset named '{name}' in schema '{catalog.schema}'")


def export_headers(request: Request, renderer: Renderer, download_name: str) -> dict[str, str]:
    user_agent = request.headers.get("user-agent")
    return {
        "Content-Type": renderer.content_type,
        "Content-Disposition": content_disposition(download_name, user_agent=user_agent),
        "Cache-Control": "no-store",
        "Accept-Ranges": "none",
        "X-Content-Type-Options": "nosniff",
        "Vary": "Accept",
    }


@router.api_route("/datasets/{name}", methods=["GET", "HEAD"])
async def export(request: Request, name: str) -> Response:
    st = get_state(request)
    dataset, renderer = await resolve(st.catalog, name, request.headers.get("accept"))
    params = request.query_params.multi_items()
    query = parse(dataset, params)
    if request.method == "HEAD":
        async with st.engine.connect() as conn:
            await sql.check_values(conn, query)
        response = Response(
            headers=export_headers(
                request, renderer, filename(dataset.name, renderer, datetime.now(UTC))
            )
        )
        del response.headers["content-length"]  # GET streams its body chunked
        return response

    recorded: dict[str, list[str]] = {}
    for key, value in params:
        recorded.setdefault(key, []).append(value)
    download = Download("export", dataset.name, request.client.host if request.client else None,
                        format=renderer.name, params=recorded)
    job = Export(st.engine, st.audit, st.settings, query, renderer, download)
    if not await unless_disconnected(job.open(), request.receive):
        return Response(status_code=499)  # nobody is listening; uvicorn drops it
    return StreamingResponse(job.body(), headers=export_headers(request, renderer, job.filename))
