"""What the /exports routes do: start a stored export (POST /exports, or `Prefer:
respond-async` on an export URL), run it in the background, find it for its status,
list, cancel or remove it, and open its file. No HTTP here: stored/responses.py makes
the answers.

Why it works this way: docs/internals.md, section `stored/service.py`.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import logging
import os
import re
from collections.abc import AsyncGenerator, AsyncIterator
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from exporter.access.limits import Lease
from exporter.access.links import LINK_PARAMETERS, SIGNATURE, LinkKeys
from exporter.access.principal import ALL_DATASETS, Principal
from exporter.audit import Download
from exporter.compression import Coding, by_name, compressed, level_of
from exporter.config import Settings
from exporter.errors import (
    DATABASE_ERRORS,
    ApiError,
    bad_parameter,
    unavailable,
    without_paths,
)
from exporter.exports import renderers, sql
from exporter.exports.context import Exports, Started
from exporter.exports.export import Export, source_name
from exporter.exports.filenames import filename
from exporter.exports.pages import planned_count
from exporter.exports.query import ExportQuery
from exporter.exports.request import ExportRequest, Headers, Representation, find, read
from exporter.exports.service import export_cursor, read_since
from exporter.stored.storage import Storage
from exporter.stored.store import (
    ASYNC,
    CANCELLED,
    COMPLETE,
    RUNNING,
    STREAMED,
    StoredExports,
    Writer,
    WriterStopped,
    may_see,
    owner_of,
    readable_datasets,
)
from exporter.streaming import Client, unless_disconnected
from exporter.tables import stored_exports as t

log = logging.getLogger(__name__)

ID = re.compile(r"[A-Za-z0-9_-]{22}")
EXPORTS_PATH = "/exports"
# The file's first URL, kept as an alias of the one named after the file (links signed
# for it and scripts that saved it go on working, without a redirect to follow).
FILE_ALIAS = "file"


def url_name(filename: str) -> str:
    """The file's name as the last segment of its URL (a dataset's name may hold a slash,
    which a path segment cannot)."""
    return filename.replace("/", "_")


def file_path(row: sa.Row[Any]) -> str:
    """`/exports/ID/orders-20261205T111900Z.csv.gz`: readers that go by the URL's ending
    (pandas, DuckDB, `wget`, `curl -O`) see what the file is."""
    return f"{EXPORTS_PATH}/{row.id}/{quote(url_name(row.filename), safe='')}"
RUN_SHUT_DOWN = "the server shut down while it ran"
DEFAULT_LIST = 100
# GET /exports?kind=: the names a client asks by, and the rows' kinds.
KINDS = {ASYNC: ASYNC, "copy": STREAMED, STREAMED: STREAMED}
MAX_LIST = 1000
MAX_BODY = 64 * 1024


class StoredService(StoredExports):
    """The stored exports of the app (State.stored): the writer API of StoredExports, the
    runs of this process, and what the routes ask of them."""

    def __init__(self, engine: AsyncEngine, settings: Settings, storage: Storage,
                 instance_id: str) -> None:
        super().__init__(engine, settings, storage, instance_id)
        self._runs: dict[str, asyncio.Task[None]] = {}
        self._stopping = False

    # --- starting ------------------------------------------------------------------------

    async def kick_off(self, client: Client, exports: Exports, req: ExportRequest) -> Started:
        """Checks (400 for bad values, 507 when the quota is full, 429/503 over the
        caps), then 202 with the status URL; the export runs in the background."""
        principal, dataset, query = req.principal, req.dataset, req.query
        renderer, coding, url = req.renderer, req.representation.file_coding, req.url
        await self.check_quota(principal)
        engine = exports.export_engine
        # The same admission as a streamed export's, before any query of the export runs;
        # the run holds the lease until it ends.
        lease = await exports.limiter.acquire(client.receive, principal.limit_key, export=True)
        try:
            estimated = await unless_disconnected(
                _check_and_estimate(engine, query, engine is exports.replica,
                                    self.settings.statement_timeout), client.receive)
            at = datetime.now(UTC)
            extension = f".{coding.extension}" if coding else ""
            name = filename(dataset.name, renderer, at, req.query_string) + extension
            content_type = coding.media_type if coding else renderer.content_type
            run: list[asyncio.Task[None]] = []
            writer = await self.begin(
                principal, url=url, dataset=dataset.name, format=renderer.name,
                coding=coding.name if coding else None, content_type=content_type,
                filename=name, kind=ASYNC, estimated_rows=estimated,
                on_stop=lambda reason: _cancel(run))
        except BaseException:  # ClientLeft included
            lease.release()
            raise
        download = Download("export", dataset.name, client.host, format=renderer.name,
                            params=_recorded(client, url), principal=principal.label,
                            link_expires=principal.link_expires)
        job = Export(engine, exports.audit, self.settings, query, renderer, download,
                     replica=engine is exports.replica,
                     take_slots=functools.partial(exports.limiter.extra_exports, lease),
                     per_principal=exports.limiter.per_principal)
        task = asyncio.get_running_loop().create_task(
            self._run(writer, job, coding, lease, exports.links))
        run.append(task)
        self._runs[writer.id] = task
        task.add_done_callback(lambda _: self._runs.pop(writer.id, None))
        task.add_done_callback(lambda _: lease.release())  # cancelled before it ran, too
        return Started(writer.id, url, f"{EXPORTS_PATH}/{writer.id}", RUNNING,
                       self.retry_after())

    def retry_after(self) -> str:
        return str(max(1, round(self.interval * 2)))

    async def _run(self, writer: Writer, job: Export, coding: Coding | None,
                   lease: Lease, links: LinkKeys) -> None:
        async with lease:
            await self._write(writer, job, coding, links)

    async def _write(self, writer: Writer, job: Export, coding: Coding | None,
                     links: LinkKeys) -> None:
        body: AsyncIterator[bytes] | None = None
        try:
            try:
                await job.open()
                body = job.body()
                chunks: AsyncIterator[bytes] = _counting(body, job, writer)
                if coding is not None:
                    s = self.settings
                    chunks = compressed(chunks, coding, level_of(coding, s.gzip_level,
                                                                 s.zstd_level),
                                        threads=job.ranges)
                async for chunk in chunks:
                    await writer.write(chunk)
                token = await export_cursor(links, job)
                await writer.finish(job.download.rows, job.snapshot_time, token)
            finally:
                if body is not None and hasattr(body, "aclose"):
                    # The COPY stopped and its snapshot let go now, if it still ran.
                    await body.aclose()
        except asyncio.CancelledError:
            await writer.fail(RUN_SHUT_DOWN if self._stopping else (writer.reason or "cancelled"))
        except WriterStopped as stop:
            await writer.fail(str(stop) or "stopped")
        except ApiError as error:
            await writer.fail(error.message)
        except Exception as error:
            log.warning("stored export %s failed: %s: %s", writer.id, type(error).__name__,
                        error)
            await writer.fail(without_paths(error))

    async def stop(self) -> None:
        """At shutdown: this process's runs end as failed (RUN_SHUT_DOWN); they are not
        resumed by another process (a new run would be another snapshot)."""
        self._stopping = True
        runs = list(self._runs.values())
        for task in runs:
            task.cancel()
        if runs:
            log.warning("%d stored exports still running at shutdown: failed", len(runs))
            await asyncio.wait(runs, timeout=10)
        await self.stop_cleanup()

    # --- reading -------------------------------------------------------------------------

    async def _row(self, principal: Principal, export_id: str) -> sa.Row[Any]:
        """The export if the principal may see it; 404 alike for absent and others'."""
        if not ID.fullmatch(export_id):
            raise ApiError(404, "no such export")
        await self.started(export_id)  # a streamed export's copy, promised before its row
        try:
            async with self.engine.connect() as conn:
                row = (await conn.execute(sa.select(t).where(t.c.id == export_id))).first()
        except DATABASE_ERRORS as error:
            raise unavailable(error) from error
        if row is None or not may_see(principal, row.owner, row.dataset):
            raise ApiError(404, "no such export")
        return row

    async def visible(self, principal: Principal, export_id: str) -> bool:
        """Whether the principal may see the export now (POST /links asks, before it signs
        a link to it)."""
        try:
            await self._row(principal, export_id)
        except ApiError as error:
            if error.status == 404:
                return False
            raise
        return True

    async def status(self, principal: Principal, export_id: str) -> sa.Row[Any]:
        """The export, for its status; 404 alike for absent and others'."""
        return await self._row(principal, export_id)

    async def listing(self, principal: Principal, limit: str | None,
                      kind: str | None) -> list[sa.Row[Any]]:
        """The principal's exports (an admin's: all), newest first; `limit` and `kind` as
        the query string gives them."""
        raw = str(DEFAULT_LIST) if limit is None else limit
        if not raw.isascii() or not raw.isdigit() or not 1 <= int(raw[:6]) <= MAX_LIST \
                or len(raw) > 6:
            raise bad_parameter("limit", f"limit must be between 1 and {MAX_LIST}")
        select = sa.select(t).order_by(t.c.created.desc(), t.c.id).limit(int(raw))
        if kind is not None:
            if kind not in KINDS:
                raise bad_parameter("kind", "kind is async (stored exports) or copy (the"
                                    " copies streamed exports keep for resuming)")
            select = select.where(t.c.kind == KINDS[kind])
        if not principal.is_admin:
            select = select.where(t.c.owner == owner_of(principal))
            if ALL_DATASETS not in principal.scopes:
                select = select.where(t.c.dataset.in_(readable_datasets(principal)))
        try:
            async with self.engine.connect() as conn:
                return list((await conn.execute(select)).all())
        except DATABASE_ERRORS as error:
            raise unavailable(error) from error

    async def delete(self, principal: Principal, export_id: str) -> None:
        """Cancel a running export (its runner, on whatever host, hears it at its next
        beat) or remove a finished one with its file."""
        row = await self._row(principal, export_id)
        async with self.engine.begin() as conn:
            if row.status == RUNNING:
                cancelled = await conn.scalar(
                    sa.update(t).where(t.c.id == export_id, t.c.status == RUNNING)
                    .values(status=CANCELLED, error=f"cancelled by {principal.label}",
                            finished=sa.func.now(), expires=sa.func.now() + self.retention)
                    .returning(t.c.id))
                if cancelled is not None:
                    if (task := self._runs.get(export_id)) is not None:
                        task.cancel()  # here at once; elsewhere at the runner's next beat
                    return
            await conn.execute(sa.delete(t).where(t.c.id == export_id))
        await self.storage.delete(row.storage_key)

    async def open_file(self, principal: Principal, export_id: str, disposition: str,
                        name: str = FILE_ALIAS) -> tuple[sa.Row[Any], Any, os.stat_result]:
        """The complete export's row and its file, open (the caller closes it), and its
        stat; 409 while it runs, 410 once it failed or its file is gone."""
        row = await self._row(principal, export_id)
        if name not in (FILE_ALIAS, url_name(row.filename)):
            raise ApiError(404, f"this export's file is {file_path(row)}")
        if row.status == RUNNING:
            raise ApiError(409, "the export is still running: see its status",
                           headers={"Retry-After": self.retry_after()})
        if row.status != COMPLETE:
            raise ApiError(410, f"the export {row.status}: {row.error}")
        if disposition not in ("attachment", "inline"):
            raise ApiError(400, "disposition is attachment or inline", parameter="disposition")
        try:
            f, fst = await self.storage.open(row.storage_key)
        except FileNotFoundError:
            raise ApiError(410, "the export's file is gone (expired or removed)") from None
        except OSError as error:  # a disk that fails, an object store that is down
            log.error("stored export %s: cannot open its file: %s", export_id, error)
            raise ApiError(503, "the export storage cannot be read now",
                           headers={"Retry-After": "5"}) from error
        return row, f, fst


def _cancel(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()


async def _counting(body: AsyncIterator[bytes], job: Export,
                    writer: Writer) -> AsyncGenerator[bytes, None]:
    """The body, its rows counted on the way by newlines (a CSV value may hold one, so
    this is a running estimate; the COPY's own count is the final one). A binary format
    (Parquet, Arrow, XLSX) has no such count: its progress is its bytes."""
    if not job.renderer.rows_by_line:
        async for chunk in body:
            yield chunk
        return
    lines = 0
    header = 1 if job.renderer.header("") is not None else 0
    async for chunk in body:
        lines += chunk.count(b"\n")
        await writer.progress(max(0, lines - header))
        yield chunk


async def _check_and_estimate(engine: AsyncEngine, query: ExportQuery,
                              replica: bool, statement_timeout: float) -> int | None:
    """400 for bad filter values (as a streamed export would answer), and the planner's
    estimate of the rows: EXPLAIN's "Plan Rows" of the export's own SELECT, which counts
    the filters and the limit and works for views, unlike pg_class.reltuples (a table's
    total only). Planning only: nothing runs."""
    try:
        conn = await engine.connect()
    except DATABASE_ERRORS as error:
        raise unavailable(error, source_name(replica)) from error
    try:
        await sql.limit_statements(conn, statement_timeout)
        await sql.check_values(conn, query, statement_timeout)
        try:
            return await planned_count(conn, query)
        except Exception as error:  # an estimate is a nicety: never a reason to refuse
            log.info("no row estimate: %s", error)
            await conn.rollback()
            return None
    finally:
        await conn.close()


def _recorded(client: Client, url: str) -> dict[str, list[str]]:
    recorded: dict[str, list[str]] = {"stored": ["async"]}
    for key, value in client.params:
        if key != SIGNATURE:
            recorded.setdefault(key, []).append(value)
    recorded["url"] = [url]
    return recorded


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def describe(base_url: str, row: sa.Row[Any]) -> dict[str, Any]:
    """The status JSON: what the page shows and scripts read (the manifest once done)."""
    base = base_url.rstrip("/")
    status_url = f"{base}{EXPORTS_PATH}/{row.id}"
    body: dict[str, Any] = {
        "id": row.id, "status": row.status, "kind": row.kind, "url": row.url,
        "dataset": row.dataset, "format": row.format, "coding": row.coding,
        "content_type": row.content_type, "filename": row.filename,
        "principal": row.principal, "status_url": status_url,
        "created": _iso(row.created), "rows": row.rows, "bytes": row.bytes,
    }
    if row.status == RUNNING:
        estimated = row.estimated_rows
        renderer = renderers.by_extension(row.format)
        counted = renderer is None or renderer.rows_by_line
        percent = (min(99, int(100 * row.rows / estimated)) if estimated and counted
                   else None)
        now = datetime.now(UTC)
        body["progress"] = {
            "rows": row.rows if counted else None, "bytes": row.bytes,
            "estimated_rows": estimated,
            "percent": percent, "started": _iso(row.created),
            "elapsed": round((now - row.created).total_seconds(), 3),
        }
        return body
    body.update({"finished": _iso(row.finished), "expires": _iso(row.expires)})
    if row.status == COMPLETE:
        sha256 = bytes(row.sha256)
        body.update({
            "snapshot_time": _iso(row.snapshot_time),
            # A table's: `since=` this cursor in a later export gives what changed after.
            "cursor": row.cursor,
            "sha256": sha256.hex(), "sha256_base64": base64.b64encode(sha256).decode(),
            "file_url": f"{base}{file_path(row)}",
        })
    else:
        body["error"] = row.error
    return body


# --- POST /exports -----------------------------------------------------------------------

async def start(stored: StoredService, exports: Exports, client: Client,
                principal: Principal, raw: bytes, root: str) -> Started:
    """POST /exports with `{"url": "/datasets/orders.csv.gz?amount=gt.5"}` (and an optional
    `"coding": "gzip"|"zstd"`): the same checks and errors as the streamed export. `root`:
    the server's prefix, which the URL may carry."""
    if len(raw) > MAX_BODY:
        raise ApiError(413, f"the body is larger than {MAX_BODY} bytes")
    try:
        body: Any = json.loads(raw)
    except (ValueError, RecursionError):
        raise ApiError(400, 'expected a JSON body: {"url": "/datasets/orders.csv?..."}') from None
    if not isinstance(body, dict) or not isinstance(body.get("url"), str):
        raise bad_parameter("url", "'url' must be an export's path, such as"
                            " /datasets/orders.csv?amount=gt.5")
    try:
        url = urlsplit(body["url"])
    except ValueError as error:
        raise bad_parameter("url", f"not a URL: {error}") from None
    path = url.path
    if root and path.startswith(root + "/"):
        path = path[len(root):]
    if not path.startswith("/datasets/") or len(path) <= len("/datasets/"):
        raise bad_parameter("url", "'url' must be an export's path, such as"
                            " /datasets/orders.csv")
    dataset, representation = await find(exports.catalog, principal,
                                         unquote(path[len("/datasets/"):]), None)
    asked = body.get("coding")
    if asked is not None:
        if not isinstance(asked, str) or (named := by_name(asked)) is None:
            raise bad_parameter("coding", "coding is gzip or zstd")
        if representation.file_coding not in (None, named):
            raise bad_parameter("coding", f"the URL asks for "
                                f"{representation.file_coding.name} already")
        representation = Representation(representation.renderer, named)
    # A link's own parameters, copied with its URL, are not the export's.
    params = [(k, v) for k, v in _query_pairs(url.query) if k not in LINK_PARAMETERS]
    req = read(dataset, representation, principal, params,
               Headers(prefer=("respond-async",)), method="POST")
    await read_since(exports.links, req.query)
    return await stored.kick_off(client, exports, req)


def _query_pairs(query: str) -> list[tuple[str, str]]:
    try:
        return parse_qsl(query, keep_blank_values=True, max_num_fields=10_000)
    except ValueError as error:
        raise bad_parameter("url", f"the URL's query: {error}") from None
