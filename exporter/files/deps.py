"""What the file routes take beyond access/deps.py's: the parts of the app's state the
files feature uses (`FilesDep`), and a /files/ request read once (`FileRequestDep`)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Annotated
from urllib.parse import unquote_to_bytes

from fastapi import Depends, Request

from exporter.access.deps import StateDep, client_of, principal_of
from exporter.access.principal import Principal
from exporter.files.context import Files
from exporter.files.paths import bad_path
from exporter.files.service import FILES_PATH
from exporter.server.prefix import app_path, app_raw_path
from exporter.state import State, get_state
from exporter.streaming import Client


def files_of(st: State) -> Files:
    return Files(st.settings, st.engine, st.audit, st.limiter, st.read_budget,
                 st.files_store)


async def _files(st: StateDep) -> Files:
    return files_of(st)


FilesDep = Annotated[Files, Depends(_files)]


@dataclass(frozen=True, slots=True)
class FileRequest:
    """A /files/ request as the service needs it: the path, who asks, and from where.

    One dependency, not one per part: FastAPI walks each dependency's own tree on every
    request, and the four that GET /files/ took were a third of the app's time under a
    profiler for an answer handed to nginx (X-Accel-Redirect); one made the app's part
    of that answer 0.30 ms -> 0.235 ms (docs/benchmarks.md).
    """

    path: str
    files: Files
    client: Client
    principal: Principal


def file_path(request: Request, path: str) -> str:
    """The path as the client's bytes spell it, as `os.fsdecode` names files.

    The server decodes the request path as UTF-8 with replacement, so `%FF` arrives as
    U+FFFD and a file whose name is not UTF-8 could never be asked for; the raw path
    keeps the bytes. It is decoded once, like the path the router matched.
    """
    if app_path(request.scope) != FILES_PATH + path:
        # The route's pattern stops at a newline (`$` matches before one): never a shortcut.
        raise bad_path("control characters")
    raw = app_raw_path(request.scope)
    if raw is None or not raw.startswith(FILES_PATH.encode()):
        return path
    return os.fsdecode(unquote_to_bytes(raw[len(FILES_PATH):]))


async def _file_request(request: Request, path: str) -> FileRequest:
    # The path is checked before the request is authenticated: a bad one is a 400 to
    # anybody, as it was before routes took dependencies.
    fs_path = file_path(request, path)
    st = get_state(request)
    return FileRequest(fs_path, files_of(st), client_of(request),
                       await principal_of(request, st))


FileRequestDep = Annotated[FileRequest, Depends(_file_request)]
