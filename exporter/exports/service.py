"""What the export routes do, out of the route modules: read an export request once
(exports/request.py), choose its plan once (`answer`), and run it; the audit trail's too."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable
from typing import Any

from fastapi import Request, Response
from fastapi.responses import RedirectResponse, StreamingResponse

from exporter.access.admission import ExportWatch, admit
from exporter.access.limits import Lease
from exporter.access.links import SIGNATURE
from exporter.access.principal import ANONYMOUS, Principal
from exporter.audit import Download
from exporter.compression import level_of
from exporter.errors import DATABASE_ERRORS, ApiError, bad_parameter, unavailable
from exporter.export_names import readings
from exporter.exports import cursor, renderers
from exporter.exports.catalog import Catalog, Dataset
from exporter.exports.export import Export
from exporter.exports.query import ExportQuery
from exporter.exports.request import ExportRequest, Headers, Representation, find, read
from exporter.exports.resume_copies import ResumeCopies, ResumeCopy
from exporter.exports.resume_writer import ResumeWriter
from exporter.exports.visible import compressed_export_urls, export_urls, visible_datasets
from exporter.http import content_disposition
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
    dataset, representation = await find(st.catalog, principal, name,
                                         request.headers.get("accept"))
    return await answer(request, st, read_request(request, st, principal, dataset,
                                                  representation))


def read_request(request: Request, st: State, principal: Principal, dataset: Dataset,
                 representation: Representation, *, base: str | None = None) -> ExportRequest:
    return read(dataset, representation, principal, request.query_params.multi_items(),
                Headers.of(request.headers), method=request.method, base=base,
                compression=st.settings.compression)


def export_headers(request: Request, req: ExportRequest, download_name: str) -> dict[str, str]:
    """What every answer of an export says. A file coding (`orders.csv.gz`) is served as
    application/gzip; a negotiated content coding is a Content-Encoding."""
    user_agent = request.headers.get("user-agent")
    file_coding = req.representation.file_coding
    if file_coding is not None:
        download_name = f"{download_name}.{file_coding.extension}"
    headers = {
        "Content-Type": req.representation.content_type,
        "Content-Disposition": content_disposition(download_name, user_agent=user_agent),
        "Cache-Control": "no-store",
        "Accept-Ranges": "none",
        "X-Content-Type-Options": "nosniff",
        # On every answer, identity too: what a cache stored for one Accept-Encoding is
        # not the answer for another.
        "Vary": "Accept, Accept-Encoding",
    }
    if req.content_coding is not None:
        headers["Content-Encoding"] = req.content_coding.name
    return headers


def _copied(req: ExportRequest) -> bool:
    """Whether the export's bytes are kept for resuming: identity bytes of the URL's
    whole export (a page of items is not the URL's export)."""
    return (req.representation.file_coding is None and req.content_coding is None
            and req.items is None)


async def answer(request: Request, st: State, req: ExportRequest, *,
                 from_primary: bool = False) -> Response:
    """The one road of every export request, read once: the plan (stored, headers only,
    a resume from a copy, or a stream) is chosen here from the request, and nowhere
    else. Read from the replica if there is one, unless `from_primary` (the audit
    trail, which must show the latest downloads)."""
    engine = st.engine if from_primary else st.export_engine
    await read_since(st, req.query)
    if (req.method == "GET" and req.prefer.respond_async and st.stored is not None
            and not from_primary):
        # A stored export (exporter/stored/), reached through the state: 202 and a status URL.
        return await st.stored.kick_off(request, st, req)
    # One admission for HEAD and GET alike, before any query of the export runs (a
    # resume's lookup included); the request holds the lease until its response ends.
    # The audit trail is an admin's look at what runs: never kept waiting by the exports
    # that fill the export cap (the principal's own slot still counts).
    try:
        lease = await admit(request, st.limiter, req.principal.limit_key,
                            export=not from_primary)
    except ClientLeft:
        return Response(status_code=499)  # nobody is listening; uvicorn drops it
    head = req.method == "HEAD"
    if not head and req.byte_range is not None and st.resume_copies is not None:
        # From the copy of the export this request continues, when that is provable;
        # otherwise the whole export, from a new snapshot, as a 200 (RFC 9110 §14.2).
        resumed = await st.resume_copies.resume(request, req.principal, req.url)
        if resumed is not None:
            # Served from the copy, yet this URL still answers an arbitrary range with the
            # whole export (only a proven continuation is a 206): no promise of ranges.
            resumed.headers["Accept-Ranges"] = "none"
            return resumed
    principal = req.principal
    recorded: dict[str, list[str]] = {}
    for key, value in request.query_params.multi_items():
        if key != SIGNATURE:  # a credential: never stored
            recorded.setdefault(key, []).append(value)
    if head:
        recorded.setdefault("method", []).append("HEAD")
    download = Download("export", req.dataset.name,
                        request.client.host if request.client else None,
                        format=req.renderer.name, params=recorded, principal=principal.label,
                        link_expires=principal.link_expires)
    job = Export(engine, st.audit, st.settings, req.query, req.renderer, download,
                 replica=engine is st.replica, window=req.window, url_query=req.query_string,
                 head=head)
    signing = None if head else _cursor_key_soon(st, req)
    try:
        await unless_disconnected(job.open(), request.receive)
    except ClientLeft:
        return Response(status_code=499)
    if head:
        await lease.aclose()  # its work is done: a GET that follows finds the slots free
        return _head_response(request, req, job)
    return await _stream(request, st, req, job, lease, signing)


def _head_response(request: Request, req: ExportRequest, job: Export) -> Response:
    """The GET's headers, without its body (the checks and counts ran as the GET's)."""
    response = Response(status_code=job.answer.status if job.answer else 200,
                        headers=export_headers(request, req, job.filename))
    del response.headers["content-length"]  # GET streams its body chunked
    if job.answer is not None:
        response.headers.update(job.answer.headers)
    return response


async def _stream(request: Request, st: State, req: ExportRequest, job: Export,
                  lease: Lease, key: asyncio.Task[bytes] | None = None) -> Response:
    lease.on_request_end = job.request_ended
    lease.watch = ExportWatch(st.settings.export_idle_timeout, job.deadline, job.cut)
    body_coding = req.representation.file_coding or req.content_coding
    s = st.settings
    level = level_of(body_coding, s.gzip_level, s.zstd_level) if body_coding else None
    headers = export_headers(request, req, job.filename)
    status = 200
    if job.answer is not None:
        status = job.answer.status
        headers.update(job.answer.headers)
    token = await export_cursor(st, job, key)
    if token is not None:
        headers[cursor.HEADER] = token
    chunks: AsyncGenerator[bytes, None] | None = None
    if st.resume_copies is not None and _copied(req):
        copy = _begin_copy(st.resume_copies, req, job, token)
        # Each chunk written into the copy as it is sent; the rest after the client
        # left, the snapshot held meanwhile (exports/resume_writer.py).
        writer = ResumeWriter(copy, job, lease, s.exports_resume_finish)
        job.hold(writer)
        chunks = writer.chunks()
        headers.update(_copy_headers(request, st.resume_copies, copy))
    return StreamingResponse(job.body(body_coding, level, chunks=chunks), status_code=status,
                             headers=headers)


async def read_since(st: State, query: ExportQuery) -> None:
    """Check the query's `since` (a 400 for a token this deployment did not sign, or a
    dataset without xmin) and set what it stands for."""
    if query.since is None:
        return
    ds = query.dataset
    if ds.kind not in cursor.KINDS_WITH_XMIN:
        raise cursor.refuse_without_xmin(ds.kind, ds.name)
    query.changed_since = cursor.decode(query.since, await _cursor_key(st))


async def export_cursor(st: State, job: Export, key: Awaitable[bytes] | None = None
                        ) -> str | None:
    """The Export-Cursor of an export's snapshot, signed (with `key` if it is being read
    already); none for a dataset without xmin, or for a part of the rows (a limit, an
    offset, a page: the cursor would claim the rows left out, and a pull by pages would
    lose them)."""
    if job.cursor is None or job.query.partial:
        return None
    return cursor.encode(job.cursor, await (key or _cursor_key(st)))


def _cursor_key_soon(st: State, req: ExportRequest) -> asyncio.Task[bytes] | None:
    """The cursor's key, read while the export opens (on a connection of its own: its
    round trips are off the way to the first byte), when the export will sign a cursor.
    Its failure is raised where it is awaited; unawaited (the export failed first), it
    is dropped."""
    query = req.query
    if query.dataset.kind not in cursor.KINDS_WITH_XMIN or query.partial:
        return None
    task = asyncio.get_running_loop().create_task(_cursor_key(st))
    task.add_done_callback(lambda t: t.cancelled() or t.exception())
    return task


async def _cursor_key(st: State) -> bytes:
    """The key cursors are signed with, derived from the link key (a 503 while the
    database that holds it is out of reach)."""
    try:
        key = await st.links.key()
    except DATABASE_ERRORS as error:
        raise unavailable(error) from error
    return cursor.cursor_key(key)


def _begin_copy(copies: ResumeCopies, req: ExportRequest, job: Export,
                token: str | None) -> ResumeCopy:
    """Start the export's stored copy, found later by the request's representation URL.
    The export goes on without one if it cannot be had (the reason is logged by the
    store)."""
    return copies.begin(
        req.principal, url=req.url, dataset=job.query.dataset.name, format=job.renderer.name,
        content_type=job.renderer.content_type, filename=job.filename,
        snapshot_time=job.snapshot_time, cursor=token)


def _copy_headers(request: Request, copies: ResumeCopies, copy: ResumeCopy) -> dict[str, str]:
    """The headers that name the export's copy."""
    # A strong validator of exactly these bytes (the copy's), so that If-Range can ask
    # for the rest of them; where they can be fetched whole, later and by range. No
    # `Accept-Ranges: bytes` here: this URL serves a range only as a proven continuation
    # (docs/internals.md, "Resuming a broken download"), so a client that trusts the header and asks
    # for another range gets the whole body as a 200; the copy's own URL says bytes.
    return {"ETag": f'"{copy.id}"', "Content-Location": copies.location(request, copy)}


async def _audit_dataset(st: State) -> Dataset:
    dataset = (await Catalog(st.engine, APP_SCHEMA).reload()).get(downloads.name)
    if dataset is None:
        raise unavailable(RuntimeError("the audit table is missing: run `exporter migrate`"))
    return dataset


async def list_downloads(request: Request, st: State, principal: Principal) -> Response:
    """The audit trail as JSON: `/downloads.json` newest first, 100 at a time unless
    `order`/`limit` say otherwise (the same road as every export)."""
    params = request.query_params.multi_items()
    if any(key == cursor.SINCE for key, _ in params):
        raise bad_parameter(cursor.SINCE, "the audit trail takes 'since' as an export:"
                            " /downloads.csv or /downloads.ndjson")
    names = {key for key, _ in params}
    params += [(k, v) for k, v in (("order", "id.desc"), ("limit", str(DEFAULT_JSON_LIMIT)))
               if k not in names]
    req = read(await _audit_dataset(st), Representation(renderers.json.JSON), principal, params,
               Headers.of(request.headers), method=request.method, base="/downloads",
               compression=st.settings.compression)
    return await answer(request, st, req, from_primary=True)


async def export_downloads(request: Request, st: State, principal: Principal,
                           extension: str) -> Response:
    """The audit trail exported as any format (`csv`, or `csv.gz` as a gzip file), read
    from the primary (the latest rows)."""
    reading = readings(f"downloads.{extension}")[0]
    renderer = renderers.by_extension(reading.format) if reading.format else None
    if renderer is None:
        raise ApiError(404, f"no format '{extension}'")
    dataset = await _audit_dataset(st)
    req = read_request(request, st, principal, dataset,
                       Representation(renderer, reading.coding), base="/downloads")
    # A dataset export keeps COPY's bytes exactly; the audit trail's cells are what
    # clients sent, and a spreadsheet must not run them.
    req.query.formula_safe = renderer is renderers.csv.CSV
    return await answer(request, st, req, from_primary=True)
