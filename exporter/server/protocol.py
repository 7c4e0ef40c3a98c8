"""Transport settings for every connection: at most one chunk of a body held per client.

Why it works this way: docs/internals.md, section `server/protocol.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

from exporter.config import get_settings

HIGH_WATER = 0
LOW_WATER = 0


def tune_transport(transport: asyncio.Transport) -> None:
    """Called by the server's protocol (exporter/server/guard.py) for each new connection."""
    # uvloop's transports have the method without being asyncio.WriteTransport.
    transport.set_write_buffer_limits(high=HIGH_WATER, low=LOW_WATER)
    lowat = get_settings().socket_notsent_lowat
    sock = transport.get_extra_info("socket")
    if lowat and sock is not None:
        # Linux only (AttributeError elsewhere); a unix socket has no such option.
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, lowat)
