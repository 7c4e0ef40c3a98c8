"""The HTTP of the files feature: from what the service found (a file, a folder's
listing, a folder asked without its slash) and the request's headers to the answer: 200,
206, 301, 304, 412 or 416."""

from __future__ import annotations

import contextlib
import mimetypes
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from datetime import timedelta
from typing import Any
from urllib.parse import quote

import aiofiles
from fastapi import Request, Response
from fastapi.responses import JSONResponse, RedirectResponse

from exporter.access.principal import Principal
from exporter.audit import PROXIED, Download
from exporter.compression import CODINGS, Coding, coded_etag, compressible, level_of, negotiate
from exporter.config import Settings
from exporter.errors import ApiError, unavailable
from exporter.files import conditions, ranges
from exporter.files.context import Files
from exporter.files.digests import DigestStore, FileKey, legacy_digest, repr_digest
from exporter.files.paths import Target, not_found, printable, storable
from exporter.files.service import FILES_PATH, Found, Listing, ToFolder
from exporter.files.source import LocalFile, OpenFile, StoreFile
from exporter.files.store import StoreTarget, object_key, store_unavailable
from exporter.http import content_disposition
from exporter.objects import ObjectStore, StoreUnavailable
from exporter.streaming import BodyResponse, zero_copy

DISPOSITIONS = ("attachment", "inline")
# The only types shown inline: none of them can run script in a browser (browsers show
# JSON as text). Everything else (HTML, SVG, XML, XHTML, JavaScript, ...) is an
# attachment whatever the query asks.
INLINE_TYPES = frozenset({
    "text/plain", "application/json", "application/pdf",
    "image/png", "image/jpeg", "image/gif", "image/webp", "image/avif", "image/bmp",
    "image/x-icon", "image/vnd.microsoft.icon", "image/tiff",
    "audio/mpeg", "audio/ogg", "audio/wav", "audio/x-wav", "audio/webm", "audio/flac",
    "audio/aac", "audio/mp4", "audio/x-m4a", "audio/opus",
    "video/mp4", "video/webm", "video/ogg", "video/quicktime", "video/x-matroska",
    "video/mpeg",
})
# On every answer under /files/: a document served from here runs with an opaque origin
# and no script (so it cannot read the server's other endpoints with a visitor's cookie),
# and no browser second-guesses the declared type.
SAFE_HEADERS = {
    "Content-Security-Policy": "sandbox; default-src 'none'",
    "X-Content-Type-Options": "nosniff",
}


async def answer(request: Request, files: Files, principal: Principal,
                 found: Found) -> Response:
    if isinstance(found, ToFolder):
        # As nginx does: relative links in the listing need the trailing slash.
        root_path = request.scope.get("root_path", "")
        return RedirectResponse(f"{root_path}{FILES_PATH}{found.path}/", status_code=301)
    if isinstance(found, Listing):
        return JSONResponse(found.body, headers={"Cache-Control": "no-cache"})
    if isinstance(found, StoreTarget):
        return await serve_object(request, files, found, principal)
    try:
        return await serve_file(request, files, found, principal)
    finally:
        found.close()  # unless serve_file took the descriptor


def effective_disposition(asked: str, kind: str) -> str:
    """`inline` only for the allow-listed types; an attachment otherwise."""
    media_type = kind.split(";", 1)[0].strip().lower()
    return "inline" if asked == "inline" and media_type in INLINE_TYPES else "attachment"


def disposition_header(name: str, kind: str, asked: str, user_agent: str | None) -> str:
    """The Content-Disposition of a file's download, whoever sends it (this server, nginx
    after X-Accel-Redirect, the store after a pre-signed redirect): `asked` is the
    query's disposition, `kind` the file's Content-Type."""
    return content_disposition(name, effective_disposition(asked, kind), user_agent=user_agent)


def content_type(name: str) -> str:
    guessed, encoding = mimetypes.guess_type(name, strict=False)
    if guessed is None or encoding is not None:
        # `x.tar.gz` is a gzip file to the client, not a tar file with Content-Encoding.
        return "application/gzip" if encoding == "gzip" else "application/octet-stream"
    if guessed.startswith("text/"):
        return f"{guessed}; charset=utf-8"
    return guessed


async def open_file(target: Target) -> tuple[Any, os.stat_result]:
    """The target's descriptor as an aiofiles file (which now owns it), and its stat.

    The descriptor is the one the walk in paths.py opened: what is served is exactly
    what was checked, whatever was renamed since.
    """
    if not target.is_file or target.fd < 0:
        raise not_found(target.relative)
    fd = target.detach()
    try:
        f = await aiofiles.open(fd, "rb", closefd=True)
    except BaseException:
        os.close(fd)
        raise
    return f, target.stat  # the fstat of this very descriptor, taken by the walk


def _disposition(request: Request) -> str:
    disposition = request.query_params.get("disposition", "attachment")
    if disposition not in DISPOSITIONS:
        raise ApiError(400, "disposition is attachment or inline", parameter="disposition")
    return disposition


async def serve_file(request: Request, files: Files, target: Target,
                     principal: Principal) -> Response:
    disposition = _disposition(request)
    if files.settings.files_accel_redirect:
        return await _hand_to_proxy(request, files, target, disposition, principal)
    f, fst = await open_file(target)
    try:
        return await _respond(request, files, target, disposition, f, fst, principal)
    except BaseException:
        with contextlib.suppress(Exception):
            await f.close()
        raise


async def serve_object(request: Request, files: Files, target: StoreTarget,
                       principal: Principal) -> Response:
    """A file in the store (EXPORTER_FILES_ROOT=s3://...): served as a file on disk is,
    or handed to the store with a pre-signed URL (EXPORTER_FILES_REDIRECT=presigned)."""
    disposition = _disposition(request)
    if target.info is None or files.store is None:
        raise not_found(target.relative)
    if files.settings.files_redirect == "presigned":
        return await _redirect_to_store(request, files, files.store, target, principal,
                                        disposition)
    key = object_key(target.relative, target.info)
    digests = DigestStore(files.engine)
    return await respond_with_file(
        request, files, StoreFile(files.store, target.info, key), name=target.name,
        kind=content_type(target.name), sha256=await digests.lookup(key),
        disposition=disposition, digests=digests,
        start_download=lambda: start_audit(request, files, principal, "file", target.relative),
        headers=SAFE_HEADERS)


async def _redirect_to_store(request: Request, files: Files, store: ObjectStore,
                             target: StoreTarget, principal: Principal,
                             disposition: str) -> Response:
    """302 to a pre-signed URL, after the checks; the audit row says `proxied`, as for
    X-Accel-Redirect: what the store then sends is in its own logs. HEAD gets a redirect
    signed for HEAD (a client follows it to the store's own HEAD) and no audit row.

    The URL has the store send the download's name and type, as this server would: an
    object's own answer has no Content-Disposition (a browser would save it under its
    key's last name, or worse) and the type it was put with. The name is in its standard
    form whatever the client: a store may not send a header's raw UTF-8 bytes, which
    curl alone would need (so `curl -OJ` saves a non-ASCII name in its ASCII fallback).
    """
    kind = content_type(target.name)
    try:
        url = await store.presigned_get(
            target.relative, timedelta(seconds=files.settings.files_redirect_expiry),
            headers={"Content-Type": kind,
                     "Content-Disposition": disposition_header(target.name, kind,
                                                               disposition, None)},
            method="HEAD" if request.method == "HEAD" else "GET")
    except StoreUnavailable as error:
        raise store_unavailable(error) from None
    if request.method == "GET":
        download = await start_audit(request, files, principal, "file", target.relative)
        await files.audit.finish(download, PROXIED)
    # The link is a bearer credential for its lifetime: no cache keeps it.
    return RedirectResponse(url, status_code=302,
                            headers={**SAFE_HEADERS, "Cache-Control": "no-store"})


def _varies(settings: Settings, kind: str, size: int) -> bool:
    """Whether this file's answer depends on Accept-Encoding (then its identity answer
    says so too, with Vary)."""
    return (settings.compression and size >= settings.compress_min_size
            and compressible(kind, settings.compress_types))


def _coding(request: Request, varies: bool) -> Coding | None:
    """The coding of this answer: none for a Range request (ranges are of the identity
    bytes, never of an on-the-fly stream), whatever If-Range says."""
    if not varies or "range" in request.headers:
        return None
    return negotiate(request.headers.get("accept-encoding"))


async def _respond(request: Request, files: Files, target: Target, disposition: str,
                   f: Any, fst: os.stat_result, principal: Principal) -> Response:
    key = FileKey.of(storable(target.relative), fst)
    digests = DigestStore(files.engine)
    sha256 = await digests.lookup(key)
    return await respond_with_file(
        request, files, LocalFile(f, fst, key), name=printable(target.name),
        kind=content_type(target.name), sha256=sha256, disposition=disposition,
        digests=digests,
        start_download=lambda: _start_audit(request, files, target, principal),
        headers=SAFE_HEADERS)


async def respond_with_file(request: Request, files: Files, opened: OpenFile, *,
                            name: str, kind: str, sha256: bytes | None,
                            disposition: str, digests: DigestStore,
                            start_download: Callable[[], Awaitable[Download]],
                            headers: Mapping[str, str], etag: str | None = None,
                            compress: bool = True) -> Response:
    """The answer for an open file (files/source.py: on disk or in the store; taken over):
    validators, conditions, ranges, the body. For files under the root and for any other
    file served the same way (stored exports). `name` is the download's name, `kind` its
    Content-Type; `sha256`, if known, is sent as Repr-Digest and not computed again (else
    it is computed on a whole-file answer and stored through `digests`);
    `start_download` opens the audit row just before the body. `etag`: the strong ETag
    of a file that never changes under its name (a stored export's id), instead of one
    made of its size, mtime and inode. `compress`: False for a file whose length and
    digest are its promise (a stored export: its manifest names both)."""
    settings = files.settings
    size = opened.size
    v = opened.validators()
    if etag is not None:
        v = replace(v, etag=etag)
    varies = compress and _varies(settings, kind, size)
    coding = _coding(request, varies)
    headers = {"ETag": coded_etag(v.etag, coding), "Last-Modified": v.last_modified,
               **headers}
    if varies:
        headers["Vary"] = "Accept-Encoding"
    # Both digests are of the bytes sent (RFC 9530, RFC 3230): not of a compressed answer.
    if sha256 is not None and coding is None:
        headers["Repr-Digest"] = repr_digest(sha256)
        headers["Digest"] = legacy_digest(sha256)

    method = request.method
    variants = tuple(coded_etag(v.etag, c) for c in CODINGS) if varies else ()
    outcome = conditions.evaluate(method, dict(request.headers), v, variants)
    if outcome == conditions.NOT_MODIFIED:
        await opened.close()
        return Response(status_code=304, headers=headers)
    if outcome == conditions.PRECONDITION_FAILED:
        raise ApiError(412, "the file does not meet the request's preconditions",
                       headers=headers)

    layout = ranges.whole(size, kind)
    range_header = request.headers.get("range")
    # Range applies to GET only (RFC 9110 §14.2); HEAD shows what a plain GET would get.
    if (range_header is not None and method == "GET"
            and conditions.if_range_allows(request.headers.get("if-range"), v)):
        try:
            wanted = ranges.parse_range(range_header, size, settings.max_ranges)
        except ranges.Unsatisfiable:
            raise ApiError(416, f"no part of the range lies within the {size} bytes",
                           headers={**headers, "Content-Range": f"bytes */{size}",
                                    "Accept-Ranges": "bytes"}) from None
        if wanted is not None:
            layout = ranges.partial(wanted, size, kind)

    headers.update({
        "Content-Type": layout.content_type,
        "Accept-Ranges": "bytes",  # of the identity bytes, which a Range request gets
        "Content-Disposition": disposition_header(name, kind, disposition,
                                                  request.headers.get("user-agent")),
    })
    if layout.content_range is not None:
        headers["Content-Range"] = layout.content_range
    if coding is None:
        headers["Content-Length"] = str(layout.length)
    else:
        headers["Content-Encoding"] = coding.name  # length unknown: sent chunked
    if method == "HEAD":
        await opened.close()
        response = Response(status_code=layout.status, headers=headers)
        if coding is not None:
            del response.headers["content-length"]  # Response's own 0: the GET streams
        return response

    await opened.prepare(layout, files.read_budget.chunk_size())
    try:
        download = await start_download()
    except BaseException:
        await opened.close()
        raise
    level = level_of(coding, settings.gzip_level, settings.zstd_level) if coding else None
    body = opened.body(files, layout, download, digests, sha256 is not None, coding, level,
                       zero_copy(request.scope))
    return BodyResponse(body, status_code=layout.status, headers=headers)


async def _start_audit(request: Request, files: Files, target: Target,
                       principal: Principal) -> Download:
    """The audit row of a file download that is about to send its body (or hand it on)."""
    return await start_audit(request, files, principal, "file", storable(target.relative))


async def start_audit(request: Request, files: Files, principal: Principal, kind: str,
                      target: str, format: str | None = None) -> Download:
    """The audit row of a download of a file (any served with respond_with_file) about to
    send its body: its range, client and principal."""
    client = request.client.host if request.client else None
    download = Download(kind, target, client, format=format,
                        range=ranges.recorded(request.headers.get("range"),
                                              files.settings.max_ranges),
                        principal=principal.label, link_expires=principal.link_expires)
    try:
        await files.audit.start(download)
    except Exception as error:
        raise unavailable(error) from error
    return download


async def _hand_to_proxy(request: Request, files: Files, target: Target, disposition: str,
                         principal: Principal) -> Response:
    """EXPORTER_FILES_ACCEL_REDIRECT: checked, audited, and sent by nginx.

    nginx serves the file from its `internal` location with sendfile, and answers Range,
    If-Range and the other conditions itself, with its own ETag and Last-Modified: the app
    sets neither, so that every answer for a file carries the same validators. nginx
    keeps Content-Type and Content-Disposition from this answer; the rest of the headers
    (CSP sandbox, nosniff, Repr-Digest) the location adds from `$upstream_http_*`.
    """
    if not target.is_file:
        raise not_found(target.relative)
    kind = content_type(target.name)
    headers = {
        **SAFE_HEADERS,
        "Content-Type": kind,
        "Content-Disposition": disposition_header(printable(target.name), kind, disposition,
                                                  request.headers.get("user-agent")),
        # Where the walk ended, links resolved: nginx (disable_symlinks) follows none.
        "X-Accel-Redirect": files.settings.files_accel_redirect
        + quote(os.fsencode(target.real_relative)),
    }
    sha256 = await DigestStore(files.engine).lookup(
        FileKey.of(storable(target.relative), target.stat))
    if sha256 is not None:
        headers["Repr-Digest"] = repr_digest(sha256)
        headers["Digest"] = legacy_digest(sha256)
    if files.settings.max_bytes_per_second:
        headers["X-Accel-Limit-Rate"] = str(files.settings.max_bytes_per_second)
    if request.method == "GET":
        download = await _start_audit(request, files, target, principal)
        # What nginx then sends (bytes, status, a client that leaves) is in its access log.
        await files.audit.finish(download, PROXIED)
    return Response(status_code=200, headers=headers)
