"""What every streamed body needs: watching for a client that leaves before the answer
starts, counting and auditing what was sent, and clean-ups that must finish after the
client left."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Mapping,
)
from dataclasses import dataclass
from typing import Any, TypeVar

from starlette.responses import StreamingResponse
from starlette.types import Receive, Send

from exporter.audit import ABORTED, COMPLETE, FAILED, Download
from exporter.server.sendfile import ZEROCOPY_SEND, ClientGone, sent_of

log = logging.getLogger(__name__)

T = TypeVar("T")

# A piece of a response body. Files read from the page cache are handed on in the
# buffer they were read into (files/stream.py), which Starlette and uvicorn send as
# they send bytes.
Chunk = bytes | memoryview


@dataclass(slots=True)
class FileSpan:
    """`count` bytes of an open file from `offset`, in a body: the server sends them from
    the page cache into the socket (server/sendfile.py), and they are never read here.
    `sent`: how many of them left, when the send ended early (BodyResponse says)."""

    fd: int
    offset: int
    count: int
    sent: int = 0

    def __len__(self) -> int:
        return self.count


Piece = Chunk | FileSpan
C = TypeVar("C", bytes, Chunk, Piece)


class ResponseCut(Exception):
    """A response was cut on purpose (a stalled client, a time limit); its body is left
    unfinished, and its download recorded as failed."""


class ClientLeft(Exception):
    """The client went away while its request waited (for a slot, for the first row);
    answered 499, to nobody (app.py)."""


@dataclass(frozen=True)
class Client:
    """The client of a request as services see it, in plain values (access/deps.py's
    `ClientDep` reads them): its address, the query string as sent (what the audit
    records), `receive` to notice it leaving, and the request's own state, where what
    must last until its response ends is held (access/admission.py)."""

    host: str | None
    receive: Receive
    state: dict[str, Any]
    params: tuple[tuple[str, str], ...] = ()


async def unless_disconnected(work: Awaitable[T], receive: Receive) -> T:
    """The outcome of `work`, run while watching the client; ClientLeft (and `work`
    cancelled) if the client goes away first.

    Before the response starts nothing else listens for `http.disconnect`, and a
    request may wait a long time for a download slot or for an export's first row.
    """

    async def disconnected() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task  # its own clean-up: a slot handed over meanwhile is given back
    if task.cancelled():
        raise ClientLeft
    return task.result()  # raises what the work raised


# Clean-ups that run after the client left, when the request's own task is cancelled
# (and with it every await in a `finally`); kept here so the loop does not drop them.
_detached: set[asyncio.Task[None]] = set()


def run_detached(work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
    """Finish `work` outside the current (possibly cancelled) task."""
    task = asyncio.get_running_loop().create_task(work)
    _detached.add(task)
    task.add_done_callback(_detached.discard)
    return task


async def wait_detached(within: float) -> int:
    """Wait for the pending clean-ups (at shutdown, before the pool goes); how many were
    still running after `within` seconds."""
    if not _detached:
        return 0
    _, pending = await asyncio.wait(set(_detached), timeout=within)
    return len(pending)


async def audited(chunks: AsyncGenerator[C, None], download: Download,
                  end: Callable[[str, str | None], object], *,
                  complete: Callable[[], bool] | None = None,
                  drain: bool = False) -> AsyncIterator[C]:
    """`chunks` as a response body that counts the bytes sent into `download.bytes` and
    calls `end(status, error)` exactly once, however the body ends.

    A failure (an exception from `chunks`, a cut) is `failed` and re-raised, so that
    the response is cut short and looks broken to the client. Otherwise the body is
    `complete` if `complete()` says so, or, without it, if `chunks` ran to its end;
    else `aborted` (the client left: Starlette cancels the body, or closes it).

    `drain`: after each chunk an empty one, which makes uvicorn's `send` wait until the
    socket took the chunk (exporter.server.protocol); a chunk is counted only then, and
    `chunks` is asked for the next one only then, so that a slow client holds one chunk.
    """
    status: str | None = None
    error: str | None = None
    ran_out = False
    span: FileSpan | None = None  # one being sent, if its send ends early: what left counts
    try:
        async for chunk in chunks:
            size = len(chunk)
            if isinstance(chunk, FileSpan):
                span = chunk
            yield chunk
            span = None
            if drain and size:
                yield b""
            download.bytes += size
            del chunk  # not held while `chunks` reads the next one
        ran_out = True
    except ResponseCut as cut:
        status, error = FAILED, f"cut: {cut}"
        raise
    except Exception as exc:
        status, error = FAILED, f"{type(exc).__name__}: {exc}"
        log.error("%s %s of %s failed after %d bytes: %s", download.kind, download.id,
                  download.target, download.bytes, error)
        raise
    finally:
        if span is not None:
            download.bytes += span.sent
        # Its own clean-up first (it never awaits, so this runs in a cancelled task too).
        await chunks.aclose()
        if status is None:
            # A body sent in full may still see CancelledError (with Content-Length set):
            # a `complete` rule by bytes says what happened, not the exception.
            done = complete() if complete is not None else ran_out
            status = COMPLETE if done else ABORTED
        end(status, error)


class BodyResponse(StreamingResponse):
    """A streamed answer whose body may hold spans of an open file (`FileSpan`), sent
    with the server's zero-copy send (offered only where the server has it: the files'
    bodies ask `zero_copy`)."""

    def __init__(self, content: AsyncIterable[Piece], status_code: int = 200,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(content, status_code, headers)  # type: ignore[arg-type]
        self._pieces = content

    async def stream_response(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})
        body = self._pieces.__aiter__()
        assert isinstance(body, AsyncGenerator)  # audited's: closed, or thrown into
        try:
            async for piece in body:
                if not isinstance(piece, FileSpan):
                    await send({"type": "http.response.body", "body": piece,
                                "more_body": True})
                    continue
                message: dict[str, Any] = {
                    "type": ZEROCOPY_SEND, "file": piece.fd, "offset": piece.offset,
                    "count": piece.count, "more_body": True}
                try:
                    await send(message)
                except BaseException as error:
                    piece.sent = sent_of(message)  # for the body's count (audited)
                    if isinstance(error, ClientGone):
                        return  # the download is aborted
                    if isinstance(error, Exception):
                        # Into the body, which records the download failed; the answer
                        # breaks.
                        await body.athrow(error)
                    raise  # cancelled (the client left): closed below
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            # Ended now, also when a send was cancelled (the client left), rather than
            # when the generator is collected. Its clean-up never waits (audited).
            await body.aclose()


def zero_copy(scope: Mapping[str, Any]) -> bool:
    """Whether the server offers the zero-copy send on this request's connection."""
    return ZEROCOPY_SEND in scope.get("extensions", {})
