"""CORS for web apps on other origins that fetch exports and files with a token.

Tokens travel in the Authorization header, never in cookies, so credentials mode stays
off. The middleware sits outside the routes' exception handlers, so 401, 403 and 429
answers carry the headers too and a web app can read why it was refused. (An unexpected
500 is answered by Starlette's outermost error middleware, without them.)
"""

from __future__ import annotations

from fastapi import FastAPI
from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware.cors import CORSMiddleware
from starlette.types import Message, Receive, Scope, Send

METHODS = ["GET", "HEAD", "POST", "OPTIONS"]
REQUEST_HEADERS = ["Authorization", "Range", "If-Range", "If-None-Match", "If-Modified-Since",
                   "Content-Type",
                   # What PostgREST's browser clients (supabase-js) send for pages and counts.
                   "Range-Unit", "Prefer"]
# What a script may read: the file name, the part it got, and what identifies the bytes;
# an export's change cursor, for its next pull with `since`; a page's unit and count.
EXPOSED_HEADERS = ["Content-Disposition", "Content-Range", "Content-Length", "ETag",
                   "Repr-Digest", "Digest", "Accept-Ranges", "Last-Modified",
                   "Export-Cursor", "Range-Unit", "Preference-Applied"]


class ListedOriginsOnly(CORSMiddleware):
    """Starlette's CORS middleware, except that an origin not listed gets no CORS header
    at all (Starlette would still send Access-Control-Expose-Headers), and its preflight
    reaches the app, which does not answer OPTIONS."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        origin = Headers(scope=scope).get("origin") if scope["type"] == "http" else None
        if origin is None or self.is_allowed_origin(origin):
            await super().__call__(scope, receive, send)
            return

        async def vary(message: Message) -> None:
            # A cache must not hand this answer, without CORS headers, to a listed origin.
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).add_vary_header("Origin")
            await send(message)

        await self.app(scope, receive, vary)


def add_cors(app: FastAPI, origins: list[str]) -> None:
    """Call after every other middleware is added, so that this one is the outermost."""
    if not origins:
        return
    app.add_middleware(
        ListedOriginsOnly, allow_origins=origins, allow_methods=METHODS,
        allow_headers=REQUEST_HEADERS, expose_headers=EXPOSED_HEADERS,
        allow_credentials=False, max_age=600,
    )
