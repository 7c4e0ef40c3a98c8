"""The HTTP of the stored exports: the service's answers as responses (a status, a
listing, a file with everything a file download has), and the resume copies' HTTP side
(the 206 a continuation of a streamed export is)."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from fastapi import Request, Response
from fastapi.responses import JSONResponse

from exporter.access.principal import Principal
from exporter.audit import Download
from exporter.exports import cursor
from exporter.exports.resume_copies import Continuation
from exporter.files.context import Files
from exporter.files.digests import DigestStore, FileKey
from exporter.files.response import SAFE_HEADERS, respond_with_file, start_audit
from exporter.files.source import LocalFile, OpenFile, StoreFile
from exporter.stored.bucket import OpenObject
from exporter.stored.resume_copies import StoredResumeCopies
from exporter.stored.service import EXPORTS_PATH, FILE_ALIAS, StoredService, describe
from exporter.stored.store import COMPLETE, RUNNING


def status(request: Request, row: sa.Row[Any], retry_after: str) -> Response:
    body = describe(str(request.base_url), row)
    headers = {"Cache-Control": "no-store"}
    if row.status == RUNNING:
        progress = body["progress"]
        headers["Retry-After"] = retry_after
        headers["X-Progress"] = (f"{progress['percent']}%" if progress["percent"] is not None
                                 else f"{progress['rows']} rows" if progress["rows"] is not None
                                 else f"{progress['bytes']} bytes")
        return JSONResponse(body, status_code=202, headers=headers)
    if row.status == COMPLETE:
        return JSONResponse(body, headers=headers)
    return JSONResponse(body, status_code=410, headers=headers)


def listing(request: Request, rows: list[sa.Row[Any]]) -> Response:
    return JSONResponse({"exports": [describe(str(request.base_url), r) for r in rows]},
                        headers={"Cache-Control": "no-store"})


async def file(request: Request, files: Files, stored: StoredService, principal: Principal,
               export_id: str, name: str = FILE_ALIAS) -> Response:
    disposition = request.query_params.get("disposition", "attachment")
    row, f, fst = await stored.open_file(principal, export_id, disposition, name)
    try:
        sha256 = bytes(row.sha256)
        headers = {**SAFE_HEADERS, "Cache-Control": "private"}
        if row.cursor is not None:
            # The snapshot's cursor, as its streamed export (or its manifest) gave it:
            # a resumed download still learns where the next pull starts.
            headers[cursor.HEADER] = row.cursor
        # Its id is a strong ETag: the file never changes under it. The same one the
        # streamed export it copies (if any) carried, so If-Range works across both.
        # Never compressed on the fly: its Content-Length and digest are what the
        # manifest promises (a compressed one is asked for as .csv.gz, say).
        key = FileKey.of(f"{EXPORTS_PATH}/{row.id}", fst)
        opened: OpenFile = (StoreFile(f.store, f.info, key) if isinstance(f, OpenObject)
                            else LocalFile(f, fst, key))
        return await respond_with_file(
            request, files, opened,
            name=row.filename, kind=row.content_type, sha256=sha256,
            disposition=disposition, digests=DigestStore(files.engine),
            start_download=lambda: _start_audit(request, files, row, principal),
            headers=headers, etag=f'"{row.id}"', compress=False)
    except BaseException:
        await f.close()
        raise


async def _start_audit(request: Request, files: Files, row: sa.Row[Any],
                       principal: Principal) -> Download:
    return await start_audit(request, files, principal, "stored", f"{row.id} {row.url}"[:1000],
                             format=row.format)


class ServedResumeCopies(StoredResumeCopies):
    """State.resume_copies (exports/responses.py's `ServedCopies`): a copy's file is
    served as any stored export's, with `files`."""

    def __init__(self, service: StoredService, files: Files) -> None:
        super().__init__(service)
        self._files = files

    async def answer(self, request: Request, found: Continuation) -> Response:
        # The request holds its lease already: the export's admission took it before
        # the lookup (exporter/exports/service.py).
        response = await file(request, self._files, self._service, found.principal,
                              found.copy_id)
        if response.status_code == 206 and found.offset is not None:
            body: Any = getattr(response, "body_iterator", None)
            if body is not None:
                setattr(response, "body_iterator",  # noqa: B010
                        self.counting(body, found.copy_id, found.offset))
        return response
