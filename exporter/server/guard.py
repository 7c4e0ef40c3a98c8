"""Bounds on the request head that uvicorn's httptools protocol does not have.

httptools keeps a header that has not ended in memory (growing it by concatenation),
and uvicorn never times out a head that trickles in. This subclass counts the bytes of
each request head before handing them to the parser, answers 431 past
`EXPORTER_MAX_HEADER_BYTES`, and 408 (or a plain close when nothing came) when a head
is not complete within `EXPORTER_HEADER_TIMEOUT` seconds. It relies only on the
protocol's asyncio callbacks, the parser callbacks `on_headers_complete` /
`on_message_complete`, and `transport`, `cycle` and `logger` (uvicorn is pinned below 0.60).

It also offers ASGI's zero-copy send on connections that can take it (server/sendfile.py),
through the cycle's `send`.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from exporter import metrics
from exporter.config import get_settings
from exporter.errors import error_body
from exporter.server import sendfile
from exporter.server.protocol import tune_transport

# After a refusal the client may still be sending (a 100 MB header, say): closing at once
# with unread data makes the kernel send a reset, and the client may never read the
# answer. So the rest is read and dropped for at most this long, as nginx's lingering close.
LINGER_SECONDS = 2.0

_REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}


def _admitted(state: ServerState) -> set[HttpToolsProtocol]:
    """The connections served, of this process's server."""
    admitted: set[HttpToolsProtocol] | None = getattr(state, "exporter_admitted", None)
    if admitted is None:
        admitted = set()
        state.exporter_admitted = admitted  # type: ignore[attr-defined]
    return admitted


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    def __init__(self, config: Config, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        settings = get_settings()
        self.max_head_bytes = settings.max_header_bytes
        self.head_timeout = settings.header_timeout
        self._head_bytes = 0  # of the head being received
        self._head_pending = True  # between requests, the next head is awaited
        self._head_timer: asyncio.TimerHandle | None = None
        self._refused = False
        self.max_connections = settings.max_connections
        self._zero_copy = False  # whether this connection takes zero-copy sends

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        tune_transport(transport)
        self._zero_copy = sendfile.supported(transport)
        self._admit()
        # A connection that never sends a byte is bounded too.
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        _admitted(self.server_state).discard(self)
        super().connection_lost(exc)

    def _admit(self) -> bool:
        """Whether this connection is one of the `max_connections` served. uvicorn's own
        test counts every open connection when a request arrives, so a burst of more than
        the cap opened before its first request got 503 on every one; as nginx's
        worker_connections, the first come are served and only the rest refused (a
        refused one is admitted at its next request if room was made)."""
        admitted = _admitted(self.server_state)
        if self not in admitted and len(admitted) < self.max_connections:
            admitted.add(self)
        return self in admitted

    def data_received(self, data: bytes) -> None:
        while data:
            if self._refused:
                return  # lingering: read and dropped
            if not self._head_pending:
                super().data_received(data)
                return
            if self._head_timer is None:
                self._arm_head_timer()
            if self._head_bytes >= self.max_head_bytes:
                self._refuse(431, f"the request head is larger than {self.max_head_bytes}"
                             " bytes (EXPORTER_MAX_HEADER_BYTES)")
                return
            # Only what fits goes to the parser: the head may end inside it, and what
            # follows (a body, the next request) is fed by the next turn of the loop.
            room = self.max_head_bytes - self._head_bytes
            piece, data = data[:room], data[room:]
            self._head_bytes += len(piece)
            super().data_received(piece)
            if self.transport.is_closing():
                return  # the parser refused it (400)

    def on_headers_complete(self) -> None:
        self._head_pending = False
        self._cancel_head_timer()
        if self._admit():
            self.limit_concurrency = None
        else:
            # uvicorn's 503 (its test, with a limit of 0, always true), outside the app.
            self.limit_concurrency = 0
            metrics.refused(503, "connections")
        if self._zero_copy:
            self.scope["extensions"] = {**self.scope.get("extensions", {}),
                                        sendfile.ZEROCOPY_SEND: {}}
        previous = self.cycle
        super().on_headers_complete()
        if self._zero_copy and self.cycle is not None and self.cycle is not previous:
            # The cycle's task looks `send` up when it starts, after this returns.
            cycle = self.cycle
            cycle.send = sendfile.sender(cycle, cycle.send)  # type: ignore[method-assign,assignment]

    def on_message_complete(self) -> None:
        super().on_message_complete()
        # Whatever comes next is the next request's head. Its bytes already fed with this
        # one's (pipelined) are not counted: a pipelined head may reach twice the bound.
        self._head_pending = True
        self._head_bytes = 0

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or not self._head_pending:
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # A pipelined head arriving while a long response is sent: that response
            # is not cut; the head is checked again later.
            self._arm_head_timer()
            return
        if self._head_bytes == 0:
            self.transport.close()  # nothing asked, nothing to answer
            return
        self._refuse(408, f"the request head did not arrive within {self.head_timeout:g} s"
                     " (EXPORTER_HEADER_TIMEOUT)")

    def _refuse(self, status: int, message: str) -> None:
        self._refused = True
        self._cancel_head_timer()
        client = f"{self.client[0]}:{self.client[1]} - " if self.client else ""
        self.logger.warning("%s%d: %s", client, status, message)
        if self.cycle is not None and not self.cycle.response_complete:
            # An answer now would land inside the body of the response being sent.
            self.transport.close()
            return
        body = json.dumps(error_body(status, message)).encode()
        self.transport.write(b"".join([
            b"HTTP/1.1 %d %s\r\n" % (status, _REASONS[status]),
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n\r\n",
            body,
        ]))
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self.loop.call_later(LINGER_SECONDS, self.transport.close)
        else:
            self.transport.close()
