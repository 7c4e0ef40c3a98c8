"""ASGI's zero-copy send (`http.response.zerocopysend`) on uvicorn's httptools protocol:
bytes of an open file go from the page cache into the client's socket with `os.sendfile`,
never through the process.

Why it works this way: docs/internals.md, section `server/sendfile.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import anyio

ZEROCOPY_SEND = "http.response.zerocopysend"
BODY_TYPES = frozenset({"http.response.body", ZEROCOPY_SEND})
# The key of a zero-copy message that this server sets to the bytes sent so far.
SENT = "exporter.sent"

# Bytes asked of one sendfile call: what the socket takes of it is sent, the rest waits
# for room. Larger asks cost nothing: the kernel stops where the send buffer is full.
_MOST_PER_CALL = 16 * 1024 * 1024
# What sendfile says of a file it cannot read from (a file system without the kernel's
# splice reads: some FUSE ones; most of /proc): its bytes are read and written instead,
# at most this many per call.
_NO_SENDFILE = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP})
_READ_AT_MOST = 256 * 1024


class ClientGone(ConnectionError):
    """The client's connection broke while file bytes were sent to it."""


def body_bytes(message: Mapping[str, Any]) -> int:
    """How many body bytes an ASGI message sends (either kind of body message)."""
    if message["type"] == ZEROCOPY_SEND:
        return int(message["count"])
    return len(message.get("body", b""))


def sent_of(message: Mapping[str, Any]) -> int:
    """How much of a zero-copy message went out before its send failed or was cancelled
    (this server writes it into the message as it goes)."""
    return int(message.get(SENT, 0))


def supported(transport: asyncio.BaseTransport) -> bool:
    """Whether file bytes can go into this connection's socket as they are: a plain
    stream socket (not TLS, whose bytes the process must encrypt)."""
    sock = transport.get_extra_info("socket")
    return (hasattr(os, "sendfile") and sock is not None
            and transport.get_extra_info("sslcontext") is None
            and sock.type == socket.SOCK_STREAM)


class _Cycle:
    """What this module uses of uvicorn's RequestResponseCycle (httptools_impl)."""

    scope: dict[str, Any]
    transport: asyncio.Transport
    response_started: bool
    response_complete: bool
    disconnected: bool
    chunked_encoding: bool | None
    expected_content_length: int
    message_event: asyncio.Event


def sender(cycle: Any, send: Callable[[Any], Awaitable[None]]
           ) -> Callable[[Any], Awaitable[None]]:
    """`send` of `cycle` (uvicorn's, passed in) that also takes zero-copy messages."""

    async def send_any(message: Any) -> None:
        if message["type"] != ZEROCOPY_SEND:
            await send(message)
            return
        await _send_file(cycle, message)
        if not message.get("more_body", False):
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    return send_any


async def _send_file(cycle: _Cycle, message: dict[str, Any]) -> None:
    if cycle.disconnected:
        # Unlike uvicorn's own send, which returns: the sender counts what was sent.
        raise ClientGone("the client is gone")
    if not cycle.response_started or cycle.response_complete:
        raise RuntimeError(f"unexpected ASGI message {ZEROCOPY_SEND!r}")
    count = int(message["count"])
    if cycle.scope["method"] == "HEAD":
        cycle.expected_content_length = 0
        return
    if cycle.chunked_encoding or count > cycle.expected_content_length:
        # Only a body of a declared length: a chunk's framing would be bytes of ours.
        raise RuntimeError("a zero-copy send needs a Content-Length it stays within")
    cycle.expected_content_length -= count
    file = message["file"]
    fd = file if isinstance(file, int) else file.fileno()
    offset = message.get("offset")
    await _copy(cycle, fd, offset if offset is not None else os.lseek(fd, 0, os.SEEK_CUR),
                count, message)


async def _copy(cycle: _Cycle, fd: int, offset: int, count: int,
                message: dict[str, Any]) -> None:
    """`count` bytes of `fd` from `offset` into the cycle's socket.

    On duplicates of the socket's descriptor and of the file's: uvloop closes its socket
    when the connection ends, and the body its file when the client left, and either
    number may then name another client's socket or another file at once, while a call
    in a worker thread still holds it. Each call runs in a worker thread, as a file read
    does: sendfile reads what the page cache lacks from the disk, and the loop must not
    wait for that.
    """
    transport = cycle.transport
    loop = asyncio.get_running_loop()
    own = os.dup(transport.get_extra_info("socket").fileno())
    try:
        source = os.dup(fd)  # the body closes its file when the client left, at once
    except OSError:
        os.close(own)
        raise
    call: asyncio.Future[int] | None = None

    def close(done: asyncio.Future[int] | None = None) -> None:
        os.close(own)
        os.close(source)
        if done is not None and not done.cancelled():
            done.exception()  # nobody awaits it any more: not "never retrieved"

    try:
        while count:
            # The status line and headers first: what uvloop still holds of them.
            if transport.get_write_buffer_size() == 0:
                call = loop.run_in_executor(None, _sendfile, own, source, offset, count,
                                            message)
                sent = await asyncio.shield(call)
                if sent < 0:
                    cycle.disconnected = True  # what uvicorn sets when it sees the loss
                    cycle.message_event.set()
                    raise ClientGone("the client's connection broke")
                offset += sent
                count -= sent
                if not count:
                    return
            if transport.is_closing():
                raise ClientGone("the connection was closed")
            await _writable(loop, own)
    except asyncio.CancelledError:
        # The client left while a call ran: its bytes are in the message once it returned
        # (the thread writes them), which takes no longer than the call; the sender reads
        # them when this raises. Shielded from Starlette's cancel scope, which cancels
        # every await until the response task ends.
        if call is not None and not call.done():
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                await call
        raise
    finally:
        if call is not None and not call.done():
            # Cancelled while the thread still sends: closed when it returned.
            call.add_done_callback(close)
        else:
            close()


def _sendfile(out: int, fd: int, offset: int, count: int, message: dict[str, Any]) -> int:
    """One call's bytes sent (0: no room now), or -1 for a broken connection. How far the
    message got is written into it here, in the thread: for the sender to read when its
    send fails or is cancelled (the client left while this call ran), so that its audit
    counts what left."""
    try:
        sent = _send_some(out, fd, offset, min(count, _MOST_PER_CALL))
    except BlockingIOError:
        return 0
    except (BrokenPipeError, ConnectionResetError):
        return -1
    if sent == 0:
        # The file ends before the range does (truncated since it was opened).
        raise EOFError(f"the file ended {count} bytes early")
    message[SENT] = message.get(SENT, 0) + sent
    return sent


def _send_some(out: int, fd: int, offset: int, count: int) -> int:
    try:
        return os.sendfile(out, fd, offset, count)
    except OSError as error:
        if error.errno not in _NO_SENDFILE:
            raise
    # What the socket does not take of the chunk read is read again by the next call.
    chunk = os.pread(fd, min(count, _READ_AT_MOST), offset)
    return os.write(out, chunk) if chunk else 0


async def _writable(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    """Until the socket has room (or is closed: then the next call says so)."""
    ready = loop.create_future()
    loop.add_writer(fd, ready.set_result, None)
    try:
        await ready
    finally:
        loop.remove_writer(fd)
