"""GET/HEAD /files/{path}: a file, or a folder's listing; the work is in exporter/files/."""

from __future__ import annotations

import os
from urllib.parse import unquote_to_bytes

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, RedirectResponse

from exporter.access.authenticate import authenticate
from exporter.access.limits import ClientLeft
from exporter.errors import ApiError, bad_parameter
from exporter.files import openapi
from exporter.files.listing import url_path
from exporter.files.paths import bad_path
from exporter.files.response import SAFE_HEADERS, serve_file
from exporter.files.visible import folder_listing, open_path
from exporter.server.prefix import app_path, app_raw_path
from exporter.state import get_state

router = APIRouter()

MAX_LIMIT = 10_000
PREFIX = "/files/"


def _int(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    digits = raw.removeprefix("-")
    if not digits.isascii() or not digits.isdigit():
        raise bad_parameter(name, f"{name} must be an integer")
    # Huge numbers are out of range without int() on thousands of digits (refused > 4300).
    value = int(raw) if len(digits.lstrip("0")) <= 19 else None
    if value is None or not low <= value <= high:
        raise bad_parameter(name, f"{name} must be between {low} and {high}")
    return value


def _fs_path(request: Request, path: str) -> str:
    """The path as the client's bytes spell it, as `os.fsdecode` names files.

    The server decodes the request path as UTF-8 with replacement, so `%FF` arrives as
    U+FFFD and a file whose name is not UTF-8 could never be asked for; the raw path
    keeps the bytes. It is decoded once, like the path the router matched.
    """
    raw = app_raw_path(request.scope)
    if raw is None or not raw.startswith(PREFIX.encode()):
        return path
    return os.fsdecode(unquote_to_bytes(raw[len(PREFIX):]))


@router.api_route("/files/{path:path}", methods=["GET", "HEAD"], openapi_extra=openapi.FILES)
async def files(request: Request, path: str) -> Response:
    try:
        response = await _files(request, path)
    except ApiError as error:
        present = {name.lower() for name, _ in error.headers}
        error.headers.extend((k, v) for k, v in SAFE_HEADERS.items() if k.lower() not in present)
        raise
    response.headers.update(SAFE_HEADERS)
    return response


async def _files(request: Request, path: str) -> Response:
    st = get_state(request)
    if app_path(request.scope) != PREFIX + path:
        # The route's pattern stops at a newline (`$` matches before one): never a shortcut.
        raise bad_path("control characters")
    path = _fs_path(request, path)
    principal = await authenticate(request, st)
    root, target = await open_path(st, principal, path)
    try:
        if target.is_dir and not target.wants_folder:
            # As nginx does: relative links in the listing need the trailing slash.
            root = request.scope.get("root_path", "")
            return RedirectResponse(f"{root}{PREFIX}{url_path(target.relative)}/",
                                    status_code=301)
        if target.is_dir:
            limit = _int(request, "limit", 1000, 1, MAX_LIMIT)
            offset = _int(request, "offset", 0, 0, 2**62)
            body = await folder_listing(st, principal, root, target, str(request.base_url),
                                        limit, offset)
            return JSONResponse(body, headers={"Cache-Control": "no-cache"})
        if request.method == "GET":
            try:
                await st.limiter.acquire(request, principal.limit_key)
            except ClientLeft:
                return Response(status_code=499)  # nobody is listening; uvicorn drops it
        return await serve_file(request, st, target, principal)
    finally:
        target.close()  # unless serve_file took the descriptor
