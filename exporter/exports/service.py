"""What the export routes do, out of the route modules: resolve a path to a dataset and
a format, and answer with its export (HEAD included), or the audit trail's."""

from __future__ import annotations

from typing import Any

from fastapi import Request, Response
from fastapi.responses import RedirectResponse, StreamingResponse

from exporter.access.admission import ExportWatch, admit, held
from exporter.access.links import LINK_PARAMETERS, SIGNATURE, canonical_query, split_query
from exporter.access.principal import ANONYMOUS, LINK, Principal
from exporter.audit import Download
from exporter.compression import Coding, accepted, by_extension, level_of
from exporter.errors import DATABASE_ERRORS, ApiError, bad_parameter, unavailable
from exporter.exports import cursor, pages, renderers, sql
from exporter.exports.catalog import Catalog, Dataset
from exporter.exports.copies import Copies
from exporter.exports.export import Export
from exporter.exports.query import ExportQuery, Order, parse
from exporter.exports.renderers import Renderer
from exporter.exports.visible import compressed_export_urls, export_urls, visible_datasets
from exporter.http import content_disposition, parse_accept
from exporter.server.prefix import app_path
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
            "compressed_exports": compressed_export_urls(str(request.base_url), ds),
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
    dataset, renderer, explicit = await resolve_export(st.catalog, name,
                                                       request.headers.get("accept"))
    if not principal.may_read_dataset(dataset.name):
        raise principal.denied()
    return await export_response(request, st, principal, dataset, renderer, explicit=explicit)


def negotiate(accept: str | None) -> Renderer:
    for media_type in parse_accept(accept):
        if media_type in ("*/*", "text/*"):
            return renderers.DEFAULT
        renderer: Renderer | None = renderers.by_media_type(media_type)
        if renderer is not None:
            return renderer
    offered = ", ".join(r.media_type for r in renderers.all_renderers())
    pgrst = [m for m in parse_accept(accept) if m.startswith("application/vnd.pgrst.")]
    if pgrst:
        # PostgREST's singular object, plan, and array/stripped forms: a whole export
        # is streamed rows, never one object made of them (docs/postgrest.md).
        raise ApiError(406, f"{pgrst[0]} (PostgREST's) is not supported: this dataset is "
                       f"available as {offered}")
    raise ApiError(406, f"this dataset is available as {offered}")


def _split_suffix(name: str) -> tuple[str, Renderer | None, Coding | None]:
    """`orders.csv` -> (`orders`, csv, None); `orders.csv.gz` -> (`orders`, csv, gzip).

    A coding suffix counts only after a format's (`orders.gz` names no format, so it is
    only ever a dataset's own name), and only one of each, the last ones: a dataset named
    `x.csv` is `x.csv.csv.gz`.
    """
    base, dot, extension = name.rpartition(".")
    if not dot:
        return name, None, None
    coding = by_extension(extension)
    if coding is not None:
        inner, dot, extension = base.rpartition(".")
        renderer = renderers.by_extension(extension) if dot else None
        return (inner, renderer, coding) if renderer is not None else (name, None, None)
    return base, renderers.by_extension(extension), None


def candidate_names(name: str) -> list[str]:
    """The datasets a request path may mean (`orders.csv`: `orders.csv` or `orders`)."""
    base, by_suffix, _ = _split_suffix(name)
    return [name, base] if by_suffix is not None else [name]


async def resolve_export(catalog: Catalog, name: str, accept: str | None,
                         ) -> tuple[Dataset, Renderer, Coding | None]:
    """`orders.csv` names dataset and format; `orders` leaves the format to Accept;
    `orders.csv.gz` is the CSV as a gzip file (the coding, else None). A dataset whose
    own name matches comes second: `x.csv` is dataset `x` if there is one."""
    base, by_suffix, coding = _split_suffix(name)
    for attempt in range(2):
        if attempt:
            await catalog.reload()  # a table or view created since the last look
        if by_suffix is not None and (ds := catalog.get(base)):
            return ds, by_suffix, coding
        if ds := catalog.get(name):
            return ds, negotiate(accept), None
    hint = ""
    if by_extension(name.rpartition(".")[2]) is not None and by_suffix is None:
        hint = f" (a compressed export names its format first: {name.rpartition('.')[0]}" \
               f".csv.{name.rpartition('.')[2]})"
    raise ApiError(404, f"no dataset named '{name}' in schema '{catalog.schema}'{hint}")


async def resolve(catalog: Catalog, name: str, accept: str | None) -> tuple[Dataset, Renderer]:
    """resolve_export without the coding (callers that serve only plain formats)."""
    dataset, renderer, _ = await resolve_export(catalog, name, accept)
    return dataset, renderer


def export_headers(request: Request, renderer: Renderer, download_name: str, *,
                   explicit: Coding | None = None,
                   coding: Coding | None = None) -> dict[str, str]:
    """`explicit`: a file in that coding (`orders.csv.gz`, served as application/gzip);
    `coding`: a content coding the client negotiated (Content-Encoding)."""
    user_agent = request.headers.get("user-agent")
    if explicit is not None:
        download_name = f"{download_name}.{explicit.extension}"
    headers = {
        "Content-Type": explicit.media_type if explicit is not None else renderer.content_type,
        "Content-Disposition": content_disposition(download_name, user_agent=user_agent),
        "Cache-Control": "no-store",
        "Accept-Ranges": "none",
        "X-Content-Type-Options": "nosniff",
        # On every answer, identity too: what a cache stored for one Accept-Encoding is
        # not the answer for another.
        "Vary": "Accept, Accept-Encoding",
    }
    if coding is not None:
        headers["Content-Encoding"] = coding.name
    return headers


def recorded_url(request: Request) -> str:
    """An export's URL as stored exports (and streamed exports' copies) record it: the
    app's path and the query in canonical form, without a signed link's own parameters
    (a new link to the same export names the same URL)."""
    rest, _ = split_query(request.scope.get("query_string", b"").decode("latin-1"))
    query = canonical_query(rest)
    return app_path(request.scope) + (f"?{query}" if query else "")


def export_coding(request: Request, st: State, explicit: Coding | None) -> Coding | None:
    """The content coding of an export's answer: none for an explicit `.gz`/`.zst` URL
    (already a file in that coding) and none for a Range request (the bytes of a range
    are identity bytes, never a slice of an on-the-fly stream)."""
    if explicit is not None or "range" in request.headers:
        return None
    return accepted(st.settings.compression, request.headers.get("accept-encoding"))


async def export_response(request: Request, st: State, principal: Principal, dataset: Dataset,
                          renderer: Renderer, *, from_primary: bool = False,
                          explicit: Coding | None = None) -> Response:
    """The export of `dataset` that the request's query string asks for, read from the
    replica if there is one, unless `from_primary` (the audit trail, which must show
    the latest downloads); `explicit`, a file in that coding (`orders.csv.gz`)."""
    coding = export_coding(request, st, explicit)
    engine = st.engine if from_primary else st.export_engine
    params = request.query_params.multi_items()
    # A link's own parameters were checked by authenticate(); anywhere else parse() refuses them.
    filters = [p for p in params if p[0] not in LINK_PARAMETERS] if (
        principal.kind == LINK) else params
    query = parse(dataset, filters)
    await read_since(st, query)
    if len(request.headers.getlist("range")) > 1:
        raise ApiError(400, "one Range header at a time")
    # Items (PostgREST's pages) before bytes: `Range: bytes=` resumes a copy, below.
    items = pages.parse_range(request.headers.get("range"), request.headers.get("range-unit"))
    prefer = pages.parse_prefer(request.headers.getlist("prefer"))
    if (request.method == "GET" and st.stored is not None and not from_primary
            and prefer.respond_async):
        if items is not None or prefer.count is not None:
            raise ApiError(400, "a stored export (Prefer: respond-async) is always whole: "
                           "its manifest counts its rows; Range and Prefer: count are for "
                           "streamed answers")
        # A stored export (exporter/stored/), reached through the state: 202 and a status URL.
        return await st.stored.kick_off(request, st, principal, dataset, renderer, query,
                                        explicit, recorded_url(request))
    window = pages.window(query, items, prefer.count)
    # One admission for HEAD and GET alike, before any query of the export runs (a
    # resume's lookup included); the request holds the lease until its response ends.
    try:
        lease = await admit(request, st.limiter, principal.limit_key)
    except ClientLeft:
        return Response(status_code=499)  # nobody is listening; uvicorn drops it
    head = request.method == "HEAD"
    if (not head and items is None and request.headers.get("range") is not None
            and st.copies is not None):
        # From the copy of the export this request continues, when that is provable;
        # otherwise the whole export, from a new snapshot, as a 200 (RFC 9110 §14.2).
        resumed = await st.copies.resume(request, principal)
        if resumed is not None:
            return resumed
    recorded: dict[str, list[str]] = {}
    for key, value in params:
        if key != SIGNATURE:  # a credential: never stored
            recorded.setdefault(key, []).append(value)
    if head:
        recorded.setdefault("method", []).append("HEAD")
    download = Download("export", dataset.name, request.client.host if request.client else None,
                        format=renderer.name, params=recorded, principal=principal.label,
                        link_expires=principal.link_expires)
    job = Export(engine, st.audit, st.settings, query, renderer, download,
                 replica=engine is st.replica, window=window, head=head)
    try:
        await unless_disconnected(job.open(), request.receive)
    except ClientLeft:
        return Response(status_code=499)
    if head:
        await lease.aclose()  # its work is done: a GET that follows finds the slots free
        return _head_response(request, st, job, explicit=explicit, coding=coding,
                              items=items)
    lease.on_request_end = job.request_ended
    lease.watch = ExportWatch(st.settings.export_idle_timeout, job.deadline, job.cut)
    body_coding = explicit or coding
    s = st.settings
    level = level_of(body_coding, s.gzip_level, s.zstd_level) if body_coding else None
    headers = export_headers(request, renderer, job.filename, explicit=explicit, coding=coding)
    status = 200
    if job.answer is not None:
        status = job.answer.status
        headers.update(job.answer.headers)
    token = await export_cursor(st, job)
    if token is not None:
        headers[cursor.HEADER] = token
    # A page of items is not the URL's export: no copy for a later bytes range to resume.
    if st.copies is not None and body_coding is None and items is None:
        headers.update(await _copy_headers(request, st.copies, principal, job, token))
    return StreamingResponse(job.body(body_coding, level), status_code=status, headers=headers)


def _head_response(request: Request, st: State, job: Export, *, explicit: Coding | None,
                   coding: Coding | None, items: pages.ItemRange | None) -> Response:
    """The GET's headers, without its body (the checks and counts ran as the GET's)."""
    answer = job.answer
    response = Response(
        status_code=answer.status if answer else 200,
        headers=export_headers(request, job.renderer, job.filename, explicit=explicit,
                               coding=coding))
    del response.headers["content-length"]  # GET streams its body chunked
    if answer is not None:
        response.headers.update(answer.headers)
    if st.copies is not None and explicit is None and coding is None and items is None:
        response.headers["Accept-Ranges"] = "bytes"  # as the GET's copy allows
    return response


async def read_since(st: State, query: ExportQuery) -> None:
    """Check the query's `since` (a 400 for a token this deployment did not sign, or a
    dataset without xmin) and set what it stands for."""
    if query.since is None:
        return
    ds = query.dataset
    if ds.kind not in cursor.KINDS_WITH_XMIN:
        raise cursor.refuse_without_xmin(ds.kind, ds.name)
    query.changed_since = cursor.decode(query.since, await _cursor_key(st))


async def export_cursor(st: State, job: Export) -> str | None:
    """The Export-Cursor of an export's snapshot, signed; none for a dataset without xmin,
    or for a part of the rows (a limit, an offset, a page: the cursor would claim the
    rows left out, and a pull by pages would lose them)."""
    if job.cursor is None or job.query.partial:
        return None
    return cursor.encode(job.cursor, await _cursor_key(st))


async def _cursor_key(st: State) -> bytes:
    """The key cursors are signed with, derived from the link key (a 503 while the
    database that holds it is out of reach)."""
    try:
        key = await st.links.key()
    except DATABASE_ERRORS as error:
        raise unavailable(error) from error
    return cursor.cursor_key(key)


async def _copy_headers(request: Request, copies: Copies, principal: Principal,
                        job: Export, token: str | None) -> dict[str, str]:
    """Start the export's stored copy; the headers that name it. The export goes on
    without one if it cannot be had (the reason is logged by the store). Identity
    bodies only: a compressed one's bytes are not the copy's."""
    copy = await copies.begin(
        request, principal, dataset=job.query.dataset.name, format=job.renderer.name,
        content_type=job.renderer.content_type, filename=job.filename,
        snapshot_time=job.snapshot_time, cursor=token)
    if copy is None:
        return {}
    lease = held(request.scope)
    assert lease is not None  # admitted before the export opened
    job.attach(copy, lease)
    # A strong validator of exactly these bytes (the copy's), so that If-Range can ask
    # for the rest of them; where they can be fetched whole, later and by range.
    return {"ETag": f'"{copy.id}"', "Content-Location": copies.location(request, copy),
            "Accept-Ranges": "bytes"}


async def _audit_dataset(st: State) -> Dataset:
    dataset = (await Catalog(st.engine, APP_SCHEMA).reload()).get(downloads.name)
    if dataset is None:
        raise unavailable(RuntimeError("the audit table is missing: run `exporter migrate`"))
    return dataset


async def list_downloads(request: Request, st: State) -> Response:
    """The audit trail as JSON: newest first, 100 at a time unless `limit`/`order` say
    otherwise; filters as exports."""
    query = parse(await _audit_dataset(st), request.query_params.multi_items())
    if query.since is not None:
        raise bad_parameter(cursor.SINCE, "the audit trail takes 'since' as an export:"
                            " /downloads.csv or /downloads.ndjson")
    if not query.order:
        query.order = [Order(query.dataset.columns["id"], descending=True)]
    if query.limit is None:
        query.limit = DEFAULT_JSON_LIMIT
    async with st.engine.connect() as conn:
        timeout = st.settings.statement_timeout
        await sql.limit_statements(conn, timeout)
        await sql.check_values(conn, query, timeout)
        try:
            result = await conn.exec_driver_sql(
                f"SELECT coalesce(json_agg(s), '[]'::json)::text FROM ({sql.select_sql(query)})"
                " AS s"
            )
        except DATABASE_ERRORS as error:
            if (failed := sql.cast_failure(query, error)) is not None:
                raise failed from None
            raise
        body = result.scalar_one()
    return Response(body, media_type="application/json")


async def export_downloads(request: Request, st: State, principal: Principal,
                           extension: str) -> Response:
    """The audit trail exported as any format (`csv`, or `csv.gz` as a gzip file), read
    from the primary (the latest rows)."""
    base, _, last = extension.rpartition(".")
    explicit = by_extension(last) if base else None
    renderer = renderers.by_extension(base if explicit is not None else extension)
    if renderer is None:
        raise ApiError(404, f"no format '{extension}'")
    return await export_response(request, st, principal, await _audit_dataset(st), renderer,
                                 from_primary=True, explicit=explicit)
