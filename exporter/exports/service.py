"""What the export routes do, out of the route modules: resolve a path to a dataset and
a format, and answer with its export (HEAD included), or the audit trail's."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fastapi import Request, Response
from fastapi.responses import RedirectResponse, StreamingResponse

from exporter.access.limits import ExportWatch, on_request_end, watch_export
from exporter.access.links import LINK_PARAMETERS, SIGNATURE, canonical_query
from exporter.access.principal import ANONYMOUS, LINK, Principal
from exporter.audit import Download
from exporter.errors import DATABASE_ERRORS, ApiError, unavailable
from exporter.exports import renderers, sql
from exporter.exports.catalog import Catalog, Dataset
from exporter.exports.export import Export, filename, source_name
from exporter.exports.query import Order, parse
from exporter.exports.renderers import Renderer
from exporter.exports.visible import export_urls, visible_datasets
from exporter.http import content_disposition, parse_accept, prefers_async
from exporter.state import State
from exporter.streaming import ClientLeft, unless_disconnected
from exporter.tables import APP_SCHEMA, downloads

DEFAULT_JSON_LIMIT = 100


async def list_datasets(request: Request, st: State, principal: Principal) -> dict[str, Any]:
    """The datasets the principal may export, with their columns and export URLs."""
    catalog = st.catalog
    visible = await visible_datasets(catalog, principal)
    if not visible and principal.kind == ANONYMOUS:
        raise principal.denied()
    items: list[dict[str, Any]] = []
    for ds in visible:
        items.append({
            "name": ds.name,
            "kind": ds.kind,
            "estimated_rows": ds.estimated_rows,
            "columns": [
                {"name": c.name, "type": c.type, "nullable": c.nullable}
                for c in ds.columns.values()
            ],
            "exports": export_urls(str(request.base_url), ds),
        })
    return {"schema": catalog.schema, "datasets": items}


def to_listing(request: Request) -> Response:
    root = request.scope.get("root_path", "")
    return RedirectResponse(request.url.replace(path=f"{root}/datasets"), status_code=307)


async def export_by_name(request: Request, st: State, principal: Principal,
                         name: str) -> Response:
    """`/datasets/{name}`: the dataset `name` names (with or without a format suffix)."""
    # Before looking the name up, so that a refusal does not tell whether it exists.
    if not any(principal.may_read_dataset(n) for n in candidate_names(name)):
        raise principal.denied()
    dataset, renderer = await resolve(st.catalog, name, request.headers.get("accept"))
    if not principal.may_read_dataset(dataset.name):
        raise principal.denied()
    return await export_response(request, st, principal, dataset, renderer)


def negotiate(accept: str | None) -> Renderer:
    for media_type in parse_accept(accept):
        if media_type in ("*/*", "text/*"):
            return renderers.DEFAULT
        renderer: Renderer | None = renderers.by_media_type(media_type)
        if renderer is not None:
            return renderer
    offered = ", ".join(r.media_type for r in renderers.all_renderers())
    raise ApiError(406, f"this dataset is available as {offered}")


def _split_suffix(name: str) -> tuple[str, Renderer | None]:
    base, dot, extension = name.rpartition(".")
    return (base, renderers.by_extension(extension)) if dot else (name, None)


def candidate_names(name: str) -> list[str]:
    """The datasets a request path may mean (`orders.csv`: `orders.csv` or `orders`)."""
    base, by_suffix = _split_suffix(name)
    return [name, base] if by_suffix is not None else [name]


async def resolve(catalog: Catalog, name: str, accept: str | None) -> tuple[Dataset, Renderer]:
    """`orders.csv` names dataset and format; `orders` leaves the format to Accept."""
    base, by_suffix = _split_suffix(name)
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


async def export_response(request: Request, st: State, principal: Principal, dataset: Dataset,
                          renderer: Renderer, *, from_primary: bool = False) -> Response:
    """The export of `dataset` that the request's query string asks for, read from the
    replica if there is one, unless `from_primary` (the audit trail, which must show
    the latest downloads)."""
    engine = st.engine if from_primary else st.export_engine
    params = request.query_params.multi_items()
    # A link's own parameters were checked by authenticate(); anywhere else parse() refuses them.
    filters = [p for p in params if p[0] not in LINK_PARAMETERS] if (
        principal.kind == LINK) else params
    query = parse(dataset, filters)
    if (request.method == "GET" and st.stored is not None and not from_primary
            and prefers_async(request.headers.getlist("prefer"))):
        # A stored export (exporter/stored/), reached through the state: 202 and a status URL.
        url = request.url.path.removeprefix(request.scope.get("root_path", ""))
        if filters:
            url += "?" + canonical_query(filters)
        return await st.stored.kick_off(request, st, principal, dataset, renderer, query,
                                        None, url)
    if request.method == "HEAD":
        # The same server as the GET would read, so both answer alike when it is down.
        try:
            conn = await engine.connect()
        except DATABASE_ERRORS as error:
            raise unavailable(error, source_name(engine is st.replica)) from error
        try:
            await sql.check_values(conn, query)
        finally:
            await conn.close()
        response = Response(
            headers=export_headers(
                request, renderer, filename(dataset.name, renderer, datetime.now(UTC))
            )
        )
        del response.headers["content-length"]  # GET streams its body chunked
        return response

    try:
        await st.limiter.acquire(request, principal.limit_key, export=True)
    except ClientLeft:
        return Response(status_code=499)  # nobody is listening; uvicorn drops it
    recorded: dict[str, list[str]] = {}
    for key, value in params:
        if key != SIGNATURE:  # a credential: never stored
            recorded.setdefault(key, []).append(value)
    download = Download("export", dataset.name, request.client.host if request.client else None,
                        format=renderer.name, params=recorded, principal=principal.label,
                        link_expires=principal.link_expires)
    job = Export(engine, st.audit, st.settings, query, renderer, download,
                 replica=engine is st.replica)
    try:
        await unless_disconnected(job.open(), request.receive)
    except ClientLeft:
        return Response(status_code=499)
    on_request_end(request.scope, job.request_ended)
    watch_export(request.scope, ExportWatch(st.settings.export_idle_timeout, job.deadline,
                                            job.cut))
    return StreamingResponse(job.body(), headers=export_headers(request, renderer, job.filename))


async def _audit_dataset(st: State) -> Dataset:
    dataset = (await Catalog(st.engine, APP_SCHEMA).reload()).get(downloads.name)
    if dataset is None:
        raise unavailable(RuntimeError("the audit table is missing: run `exporter migrate`"))
    return dataset


async def list_downloads(request: Request, st: State) -> Response:
    """The audit trail as JSON: newest first, 100 at a time unless `limit`/`order` say
    otherwise; filters as exports."""
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


async def export_downloads(request: Request, st: State, principal: Principal,
                           extension: str) -> Response:
    """The audit trail exported as any format, read from the primary (the latest rows)."""
    renderer = renderers.by_extension(extension)
    if renderer is None:
        raise ApiError(404, f"no format '{extension}'")
    return await export_response(request, st, principal, await _audit_dataset(st), renderer,
                                 from_primary=True)
