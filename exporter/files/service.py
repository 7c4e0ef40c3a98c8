"""What GET/HEAD /files/{path} does, out of the route module: a file, a folder's listing,
or the redirect that gives a folder its trailing slash."""

from __future__ import annotations

from fastapi import Request, Response
from fastapi.responses import JSONResponse, RedirectResponse

from exporter.access.admission import admit
from exporter.access.deps import client_of
from exporter.access.principal import Principal
from exporter.errors import bad_parameter
from exporter.files.listing import url_path
from exporter.files.response import serve_file
from exporter.files.visible import folder_listing, open_path
from exporter.state import State
from exporter.streaming import ClientLeft

MAX_LIMIT = 10_000
FILES_PATH = "/files/"


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


async def serve_path(request: Request, st: State, principal: Principal, path: str) -> Response:
    """The answer for `path` (as `os.fsdecode` names files) under the files root."""
    root, target = await open_path(st, principal, path)
    try:
        if target.is_dir and not target.wants_folder:
            # As nginx does: relative links in the listing need the trailing slash.
            root_path = request.scope.get("root_path", "")
            return RedirectResponse(f"{root_path}{FILES_PATH}{url_path(target.relative)}/",
                                    status_code=301)
        if target.is_dir:
            limit = _int(request, "limit", 1000, 1, MAX_LIMIT)
            offset = _int(request, "offset", 0, 0, 2**62)
            body = await folder_listing(st, principal, root, target, str(request.base_url),
                                        limit, offset)
            return JSONResponse(body, headers={"Cache-Control": "no-cache"})
        if request.method == "GET":
            try:
                await admit(client_of(request), st.limiter, principal.limit_key, export=False)
            except ClientLeft:
                return Response(status_code=499)  # nobody is listening; uvicorn drops it
        return await serve_file(request, st, target, principal)
    finally:
        target.close()  # unless serve_file took the descriptor
