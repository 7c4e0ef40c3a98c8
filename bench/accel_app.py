"""The least an app can do in front of nginx's X-Accel-Redirect: answer every /files/ path
with the header and nothing else (no token, no walk, no audit). A contender in
bench/burst.py, to show how near to nginx direct any app behind nginx can get on this
machine. Run with `uvicorn bench.accel_app:app`.

`fastapi_app` does the same through FastAPI (one route, no dependency, no middleware of
ours): what the framework the exporter is built on costs before any of its own work.
"""

from __future__ import annotations

from fastapi import FastAPI, Response
from starlette.types import Receive, Scope, Send


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    path: str = scope["path"]
    if not path.startswith("/files/"):
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})
        return
    await send({"type": "http.response.start", "status": 200, "headers": [
        (b"content-type", b"application/octet-stream"),
        (b"x-accel-redirect", ("/internal/" + path.removeprefix("/files/")).encode())]})
    await send({"type": "http.response.body", "body": b""})


fastapi_app = FastAPI()


@fastapi_app.get("/healthz")
async def healthz() -> Response:
    return Response(b"ok")


@fastapi_app.get("/files/{path:path}")
async def files(path: str) -> Response:
    return Response(headers={"Content-Type": "application/octet-stream",
                             "X-Accel-Redirect": "/internal/" + path})
