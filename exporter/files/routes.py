"""GET/HEAD /files/{path}: a file, or a folder's listing; the work is in service.py, the
answer made in response.py."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.routing import APIRoute

from exporter.errors import ApiError
from exporter.files import openapi, response, service
from exporter.files.deps import FileRequestDep
from exporter.files.response import SAFE_HEADERS
from exporter.openapi import get_and_head


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


@get_and_head(router, "/files/{path:path}", openapi_extra=openapi.FILES)
async def files(request: Request, asked: FileRequestDep) -> Response:
    query = request.query_params
    found = await service.serve_path(asked.files, asked.client, asked.principal, asked.path,
                                     request.method, query.get("limit"), query.get("offset"),
                                     str(request.base_url))
    return await response.answer(request, asked.files, asked.principal, found)
