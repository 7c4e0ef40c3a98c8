"""`EXPORTER_ROOT_PATH`: the server published under a prefix by a reverse proxy.

A proxy either passes the prefix on (nginx `proxy_pass http://upstream;`) or strips it
(`proxy_pass http://upstream/;`); both work. The middleware makes every request look like
the first kind, as ASGI describes it (`path` holds `root_path`), so Starlette routes on the
rest and `request.base_url` carries the prefix into every URL made from it. uvicorn's own
`--root-path` is not used: it prepends the prefix unconditionally, which breaks the proxy
that passes it on.

What the app compares or signs is the path without the prefix (`app_path`): a signed link
verifies whichever way the proxy is set up, and after the prefix changes.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send


class RootPath:
    def __init__(self, app: ASGIApp, root_path: str) -> None:
        self.app = app
        self.root_path = root_path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or not self.root_path:
            await self.app(scope, receive, send)
            return
        prefix = self.root_path
        path: str = scope["path"]
        if path == prefix:
            # The page is at the prefix's folder: `/exporter` alone has relative links wrong.
            query = scope.get("query_string", b"")
            location = prefix + "/" + ("?" + query.decode("latin-1") if query else "")
            await send({"type": "http.response.start", "status": 301,
                        "headers": [(b"location", location.encode("latin-1")),
                                    (b"content-length", b"0")]})
            await send({"type": "http.response.body", "body": b""})
            return
        scope = dict(scope)
        if not path.startswith(prefix + "/"):
            scope["path"] = prefix + path
            raw = scope.get("raw_path")
            if isinstance(raw, bytes):
                scope["raw_path"] = prefix.encode() + raw
        scope["root_path"] = prefix
        await self.app(scope, receive, send)


def app_path(scope: Scope) -> str:
    """The request's path without the prefix: what the routes match."""
    path: str = scope["path"]
    root = scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root + "/") else path


def app_raw_path(scope: Scope) -> bytes | None:
    """The raw (percent-encoded) path without the prefix, or None when the client spelled
    the prefix itself percent-encoded (its raw bytes then cannot be told apart)."""
    raw = scope.get("raw_path")
    if not isinstance(raw, bytes):
        return None
    root = scope.get("root_path", "").encode()
    if not root:
        return raw
    return raw[len(root):] if raw.startswith(root + b"/") else None


def strip_root(path: str, root_path: str) -> str:
    """A path given by a user (a link to make), with or without the prefix."""
    if root_path and path.startswith(root_path + "/"):
        return path[len(root_path):]
    return path
