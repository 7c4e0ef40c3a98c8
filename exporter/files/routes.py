"""GET/HEAD /files/{path}: a file, or a folder's listing; the work is in service.py, the
answer made in response.py."""

from __future__ import annotations

import os
from collections.abc import Callable, Coroutine
from typing import Annotated, Any
from urllib.parse import unquote_to_bytes

from fastapi import APIRouter, Depends, Request, Response
from fastapi.routing import APIRoute

from exporter.access.deps import ClientDep, PrincipalDep
from exporter.errors import ApiError
from exporter.files import openapi, response, service
from exporter.files.deps import FilesDep
from exporter.files.paths import bad_path
from exporter.files.response import SAFE_HEADERS
from exporter.openapi import get_and_head
from exporter.server.prefix import app_path, app_raw_path

FILES_PATH = service.FILES_PATH


class _SafeHeaders(APIRoute):
    """Every answer under /files/ carries SAFE_HEADERS, errors included: those of the
    route's dependencies (authentication) too, which is why it is the route's handler
    that is wrapped and not the route function."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def safe(request: Request) -> Response:
            try:
                response = await handler(request)
            except ApiError as error:
                present = {name.lower() for name, _ in error.headers}
                error.headers.extend(
                    (k, v) for k, v in SAFE_HEADERS.items() if k.lower() not in present)
                raise
            response.headers.update(SAFE_HEADERS)
            return response

        return safe


router = APIRouter(route_class=_SafeHeaders)


async def file_path(request: Request, path: str) -> str:
    """The path as the client's bytes spell it, as `os.fsdecode` names files.

    The server decodes the request path as UTF-8 with replacement, so `%FF` arrives as
    U+FFFD and a file whose name is not UTF-8 could never be asked for; the raw path
    keeps the bytes. It is decoded once, like the path the router matched. Checked
    before the request is authenticated, as it was before routes took dependencies.
    A coroutine only so that FastAPI calls it in the loop, not in a worker thread.
    """
    if app_path(request.scope) != FILES_PATH + path:
        # The route's pattern stops at a newline (`$` matches before one): never a shortcut.
        raise bad_path("control characters")
    raw = app_raw_path(request.scope)
    if raw is None or not raw.startswith(FILES_PATH.encode()):
        return path
    return os.fsdecode(unquote_to_bytes(raw[len(FILES_PATH):]))


@get_and_head(router, "/files/{path:path}", openapi_extra=openapi.FILES)
async def files(request: Request, fs_path: Annotated[str, Depends(file_path)],
                files: FilesDep, client: ClientDep, principal: PrincipalDep) -> Response:
    query = request.query_params
    found = await service.serve_path(files, client, principal, fs_path, request.method,
                                     query.get("limit"), query.get("offset"),
                                     str(request.base_url))
    return await response.answer(request, files, principal, found)
