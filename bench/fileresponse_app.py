"""References for file serving in Python: Starlette's `FileResponse`, and plain aiofiles
streaming at a chosen chunk size (to show what the chunk size does under uvicorn).

Run with `BENCH_FILES_ROOT=folder uvicorn bench.fileresponse_app:app`.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import aiofiles
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

ROOT = Path(os.environ.get("BENCH_FILES_ROOT", ".")).resolve()


def _path(request: Request) -> Path:
    # Benchmark files are plain names in one folder; anything else is refused.
    name = str(request.path_params["name"])
    if "/" in name or name.startswith("."):
        raise ValueError(name)
    return ROOT / name


async def healthz(request: Request) -> Response:
    return PlainTextResponse("ok")


async def file_response(request: Request) -> Response:
    """Starlette's own: 64 KiB reads through anyio's thread pool, Range supported."""
    return FileResponse(_path(request))


async def _chunks(path: Path, size: int) -> AsyncIterator[bytes]:
    async with aiofiles.open(path, "rb") as f:
        while chunk := await f.read(size):
            yield chunk


async def aiofiles_stream(request: Request) -> Response:
    """The whole file in chunks of `chunk` KiB (no Range: single-stream only)."""
    path = _path(request)
    size = int(request.path_params["chunk"]) * 1024
    return StreamingResponse(_chunks(path, size), media_type="application/octet-stream",
                             headers={"Content-Length": str(path.stat().st_size)})


app = Starlette(routes=[
    Route("/healthz", healthz),
    Route("/files/{name}", file_response),
    Route("/aiofiles/{chunk:int}/{name}", aiofiles_stream),
])
