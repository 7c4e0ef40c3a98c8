"""What the export routes do, out of the route modules: read an export request once
(exports/request.py), choose its plan once (`answer`), and run it; the audit trail's too.

No HTTP here: it takes plain values and returns what to answer (`Answer`), which
exports/responses.py makes into a response.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Any

from exporter.access.admission import ExportWatch, admit
from exporter.access.limits import Lease
from exporter.access.links import SIGNATURE, LinkKeys
from exporter.access.principal import ANONYMOUS, Principal
from exporter.audit import Download
from exporter.compression import level_of
from exporter.errors import DATABASE_ERRORS, ApiError, bad_parameter, unavailable
from exporter.export_names import readings
from exporter.exports import cursor, renderers
from exporter.exports.catalog import Catalog, Dataset
from exporter.exports.context import Exports, Started
from exporter.exports.export import Export
from exporter.exports.query import ExportQuery
from exporter.exports.request import ExportRequest, Headers, Representation, find, read
from exporter.exports.resume_copies import Continuation, ResumeCopies, ResumeCopy
from exporter.exports.resume_writer import ResumeWriter
from exporter.exports.visible import compressed_export_urls, export_urls, visible_datasets
from exporter.streaming import Client, unless_disconnected
from exporter.tables import APP_SCHEMA, downloads

DEFAULT_JSON_LIMIT = 100


@dataclass(frozen=True)
class Head:
    """A HEAD's answer: the GET's status and headers (its checks and counts ran)."""

    req: ExportRequest
    job: Export


@dataclass(frozen=True)
class Stream:
    """A streamed export, open up to its first chunk: `body` from there; `copy`, the
    resume copy its chunks are written into (if any), `cursor` its Export-Cursor."""

    req: ExportRequest
    job: Export
    body: AsyncIterator[bytes]
    cursor: str | None
    copy: ResumeCopy | None


# What an export request is answered with: a stored export started, headers only, a
# resume from a copy (exporter/stored serves it), or a stream.
Answer = Started | Head | Continuation | Stream


async def list_datasets(catalog: Catalog, principal: Principal,
                        base_url: str) -> dict[str, Any]:
    """The datasets the principal may export, with their columns and export URLs."""
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
            "exports": export_urls(base_url, ds),
            "compressed_exports": compressed_export_urls(base_url, ds),
        })
    return {"schema": catalog.schema, "datasets": items}


async def export_by_name(exports: Exports, client: Client, principal: Principal, name: str,
                         headers: Headers, method: str) -> Answer:
    """`/datasets/{name}`: the dataset `name` names (with or without a format suffix)."""
    dataset, representation = await find(exports.catalog, principal, name, headers.accept)
    return await answer(exports, client, read_request(exports, client, principal, dataset,
                                                      representation, headers, method),
                        if_range=headers.if_range)


def read_request(exports: Exports, client: Client, principal: Principal, dataset: Dataset,
                 representation: Representation, headers: Headers, method: str, *,
                 base: str | None = None) -> ExportRequest:
    return read(dataset, representation, principal, client.params, headers, method=method,
                base=base, compression=exports.settings.compression)


def _copied(req: ExportRequest) -> bool:
    """Whether the export's bytes are kept for resuming: identity bytes of the URL's
    whole export (a page of items is not the URL's export)."""
    return (req.representation.file_coding is None and req.content_coding is None
            and req.items is None)


async def answer(exports: Exports, client: Client, req: ExportRequest, *,
                 if_range: str | None = None, from_primary: bool = False) -> Answer:
    """The one road of every export request, read once: the plan (stored, headers only,
    a resume from a copy, or a stream) is chosen here from the request, and nowhere
    else. Read from the replica if there is one, unless `from_primary` (the audit
    trail, which must show the latest downloads). ClientLeft if the client left before
    the answer could start."""
    engine = exports.engine if from_primary else exports.export_engine
    await read_since(exports.links, req.query)
    if (req.method == "GET" and req.prefer.respond_async and exports.stored is not None
            and not from_primary):
        # A stored export (exporter/stored/), reached through the state: 202 and a status URL.
        return await exports.stored.kick_off(client, exports, req)
    # One admission for HEAD and GET alike, before any query of the export runs (a
    # resume's lookup included); the request holds the lease until its response ends.
    # The audit trail is an admin's look at what runs: never kept waiting by the exports
    # that fill the export cap (the principal's own slot still counts).
    lease = await admit(client, exports.limiter, req.principal.limit_key,
                        export=not from_primary)
    head = req.method == "HEAD"
    if not head and req.byte_range is not None and exports.resume_copies is not None:
        # From the copy of the export this request continues, when that is provable;
        # otherwise the whole export, from a new snapshot, as a 200 (RFC 9110 §14.2).
        resumed = await exports.resume_copies.find(client, req.principal, req.url,
                                                   req.byte_range, if_range)
        if resumed is not None:
            return resumed
    principal = req.principal
    recorded: dict[str, list[str]] = {}
    for key, value in client.params:
        if key != SIGNATURE:  # a credential: never stored
            recorded.setdefault(key, []).append(value)
    if head:
        recorded.setdefault("method", []).append("HEAD")
    download = Download("export", req.dataset.name, client.host,
                        format=req.renderer.name, params=recorded, principal=principal.label,
                        link_expires=principal.link_expires)
    # The audit trail and pages of items are read as one COPY; a whole export may read in
    # ranges, on export slots of this request's lease (exports/parallel.py).
    take_slots = None if from_primary or req.window is not None else functools.partial(
        exports.limiter.extra_exports, lease)
    job = Export(engine, exports.audit, exports.settings, req.query, req.renderer, download,
                 replica=engine is exports.replica, window=req.window,
                 url_query=req.query_string, head=head, take_slots=take_slots,
                 per_principal=exports.limiter.per_principal)
    signing = None if head else _cursor_key_soon(exports.links, req)
    await unless_disconnected(job.open(), client.receive)
    if head:
        await lease.aclose()  # its work is done: a GET that follows finds the slots free
        return Head(req, job)
    return await _stream(exports, req, job, lease, signing)


async def _stream(exports: Exports, req: ExportRequest, job: Export, lease: Lease,
                  key: asyncio.Task[bytes] | None = None) -> Stream:
    s = exports.settings
    lease.on_request_end = job.request_ended
    lease.watch = ExportWatch(s.export_idle_timeout, job.deadline, job.cut)
    body_coding = req.representation.file_coding or req.content_coding
    level = level_of(body_coding, s.gzip_level, s.zstd_level) if body_coding else None
    token = await export_cursor(exports.links, job, key)
    chunks: AsyncGenerator[bytes, None] | None = None
    copy = None
    if exports.resume_copies is not None and _copied(req):
        copy = _begin_copy(exports.resume_copies, req, job, token)
        # Each chunk written into the copy as it is sent; the rest after the client
        # left, the snapshot held meanwhile (exports/resume_writer.py).
        writer = ResumeWriter(copy, job, lease, s.exports_resume_finish)
        job.hold(writer)
        chunks = writer.chunks()
    return Stream(req, job, job.body(body_coding, level, chunks=chunks), token, copy)


async def read_since(links: LinkKeys, query: ExportQuery) -> None:
    """Check the query's `since` (a 400 for a token this deployment did not sign, or a
    dataset without xmin) and set what it stands for."""
    if query.since is None:
        return
    ds = query.dataset
    if ds.kind not in cursor.KINDS_WITH_XMIN:
        raise cursor.refuse_without_xmin(ds.kind, ds.name)
    query.changed_since = cursor.decode(query.since, await _cursor_key(links))


async def export_cursor(links: LinkKeys, job: Export, key: Awaitable[bytes] | None = None
                        ) -> str | None:
    """The Export-Cursor of an export's snapshot, signed (with `key` if it is being read
    already); none for a dataset without xmin, or for a part of the rows (a limit, an
    offset, a page: the cursor would claim the rows left out, and a pull by pages would
    lose them)."""
    if job.cursor is None or job.query.partial:
        return None
    return cursor.encode(job.cursor, await (key or _cursor_key(links)))


def _cursor_key_soon(links: LinkKeys, req: ExportRequest) -> asyncio.Task[bytes] | None:
    """The cursor's key, read while the export opens (on a connection of its own: its
    round trips are off the way to the first byte), when the export will sign a cursor.
    Its failure is raised where it is awaited; unawaited (the export failed first), it
    is dropped."""
    query = req.query
    if query.dataset.kind not in cursor.KINDS_WITH_XMIN or query.partial:
        return None
    task = asyncio.get_running_loop().create_task(_cursor_key(links))
    task.add_done_callback(lambda t: t.cancelled() or t.exception())
    return task


async def _cursor_key(links: LinkKeys) -> bytes:
    """The key cursors are signed with, derived from the link key (a 503 while the
    database that holds it is out of reach)."""
    try:
        key = await links.key()
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


async def _audit_dataset(exports: Exports) -> Dataset:
    dataset = (await Catalog(exports.engine, APP_SCHEMA).reload()).get(downloads.name)
    if dataset is None:
        raise unavailable(RuntimeError("the audit table is missing: run `exporter migrate`"))
    return dataset


async def list_downloads(exports: Exports, client: Client, principal: Principal,
                         headers: Headers, method: str) -> Answer:
    """The audit trail as JSON: `/downloads.json` newest first, 100 at a time unless
    `order`/`limit` say otherwise (the same road as every export)."""
    params = list(client.params)
    if any(key == cursor.SINCE for key, _ in params):
        raise bad_parameter(cursor.SINCE, "the audit trail takes 'since' as an export:"
                            " /downloads.csv or /downloads.ndjson")
    names = {key for key, _ in params}
    params += [(k, v) for k, v in (("order", "id.desc"), ("limit", str(DEFAULT_JSON_LIMIT)))
               if k not in names]
    req = read(await _audit_dataset(exports), Representation(renderers.json.JSON), principal,
               params, headers, method=method, base="/downloads",
               compression=exports.settings.compression)
    return await answer(exports, client, req, if_range=headers.if_range, from_primary=True)


async def export_downloads(exports: Exports, client: Client, principal: Principal,
                           extension: str, headers: Headers, method: str) -> Answer:
    """The audit trail exported as any format (`csv`, or `csv.gz` as a gzip file), read
    from the primary (the latest rows)."""
    reading = readings(f"downloads.{extension}")[0]
    renderer = renderers.by_extension(reading.format) if reading.format else None
    if renderer is None:
        raise ApiError(404, f"no format '{extension}'")
    dataset = await _audit_dataset(exports)
    req = read_request(exports, client, principal, dataset,
                       Representation(renderer, reading.coding), headers, method,
                       base="/downloads")
    # A dataset export keeps COPY's bytes exactly; the audit trail's cells are what
    # clients sent, and a spreadsheet must not run them.
    req.query.formula_safe = renderer is renderers.csv.CSV
    return await answer(exports, client, req, if_range=headers.if_range, from_primary=True)
