"""GET/HEAD /files/{path}: a file, or a folder's listing; the work is in exporter/files/."""

from __future__ import annotations

from urllib.parse import quote

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, RedirectResponse

from exporter.access.authenticate import authenticate
from exporter.access.limits import ClientLeft
from exporter.browse import folder_listing, open_path
from exporter.errors import bad_parameter
from exporter.files.paths import bad_path
from exporter.files.response import serve_file
from exporter.state import get_state

router = APIRouter()

MAX_LIMIT = 10_000


def _int(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise bad_parameter(name, f"{name} must be an integer") from None
    if not low <= value <= high:
        raise bad_parameter(name, f"{name} must be between {low} and {high}")
    return value


@router.api_route("/files/{path:path}", methods=["GET", "HEAD"])
async def files(request: Request, path: str) -> Response:
    st = get_state(request)
    if request.scope["path"] != "/files/" + path:
        # The route's pattern stops at a newline (`$` matches before one): never a shortcut.
        raise bad_path("control characters")
    principal = await authenticate(request, st)
    root, target = open_path(st, principal, path)
    if target.is_dir and not target.wants_folder:
        # As nginx does: relative links in the listing need the trailing slash.
        return RedirectResponse(f"/files/{quote(target.relative)}/", status_code=301)
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
