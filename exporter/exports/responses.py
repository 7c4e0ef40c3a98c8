"""The HTTP of the export routes: what the service answers (exports/service.py's
`Answer`) as a response, with the headers every answer of an export carries."""

from __future__ import annotations

from typing import Protocol

from fastapi import Request, Response
from fastapi.responses import JSONResponse, RedirectResponse, StreamingResponse

from exporter.exports import cursor
from exporter.exports.context import Started
from exporter.exports.export import Export
from exporter.exports.request import ExportRequest
from exporter.exports.resume_copies import Continuation, ResumeCopies, ResumeCopy
from exporter.exports.service import Answer, Head, Stream
from exporter.http import content_disposition


class ServedCopies(ResumeCopies, Protocol):
    """The resume copies (State.resume_copies) with their HTTP side: the 206 a
    continuation is, which the stored exports serve (exports may not import them)."""

    async def answer(self, request: Request, found: Continuation) -> Response:
        """The copy's file from where the client's bytes end (or its If-Range answer)."""


def to_listing(request: Request) -> Response:
    root = request.scope.get("root_path", "")
    return RedirectResponse(request.url.replace(path=f"{root}/datasets"), status_code=307)


async def respond(request: Request, answer: Answer, copies: ServedCopies | None) -> Response:
    if isinstance(answer, Started):
        return started(request, answer)
    if isinstance(answer, Head):
        return _head_response(request, answer.req, answer.job)
    if isinstance(answer, Continuation):
        assert copies is not None  # a continuation is found only where copies are kept
        resumed = await copies.answer(request, answer)
        # Served from the copy, yet this URL still answers an arbitrary range with the
        # whole export (only a proven continuation is a 206): no promise of ranges.
        resumed.headers["Accept-Ranges"] = "none"
        return resumed
    return _stream(request, answer, copies)


def started(request: Request, started: Started) -> JSONResponse:
    """202, and where to watch the stored export."""
    location = f"{request.scope.get('root_path', '')}{started.path}"
    return JSONResponse(
        {"id": started.id, "status": started.status, "url": started.url,
         "status_url": location},
        status_code=202,
        headers={"Location": location, "Preference-Applied": "respond-async",
                 "Retry-After": started.retry_after, "Cache-Control": "no-store"})


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


def _head_response(request: Request, req: ExportRequest, job: Export) -> Response:
    """The GET's headers, without its body (the checks and counts ran as the GET's)."""
    response = Response(status_code=job.answer.status if job.answer else 200,
                        headers=export_headers(request, req, job.filename))
    del response.headers["content-length"]  # GET streams its body chunked
    if job.answer is not None:
        response.headers.update(job.answer.headers)
    return response


def _stream(request: Request, stream: Stream, copies: ServedCopies | None) -> Response:
    req, job = stream.req, stream.job
    headers = export_headers(request, req, job.filename)
    status = 200
    if job.answer is not None:
        status = job.answer.status
        headers.update(job.answer.headers)
    if stream.cursor is not None:
        headers[cursor.HEADER] = stream.cursor
    if stream.copy is not None and copies is not None:
        headers.update(_copy_headers(request, copies, stream.copy))
    return StreamingResponse(stream.body, status_code=status, headers=headers)


def _copy_headers(request: Request, copies: ResumeCopies, copy: ResumeCopy) -> dict[str, str]:
    """The headers that name the export's copy."""
    # A strong validator of exactly these bytes (the copy's), so that If-Range can ask
    # for the rest of them; where they can be fetched whole, later and by range. No
    # `Accept-Ranges: bytes` here: this URL serves a range only as a proven continuation
    # (docs/internals.md, "Resuming a broken download"), so a client that trusts the header and asks
    # for another range gets the whole body as a 200; the copy's own URL says bytes.
    root = request.scope.get("root_path", "")
    return {"ETag": f'"{copy.id}"', "Content-Location": f"{root}{copies.location(copy)}"}
