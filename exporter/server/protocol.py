"""Transport settings for every connection: at most one chunk of a body held per client.

An asyncio transport pauses its writer only when its buffer exceeds the high-water
mark (64 KiB by default) and resumes it under the low-water mark (16 KiB). A body that
yields small chunks to a client that reads slowly therefore stacks up to 64 KiB of
them in the server before anyone waits: with 16 KiB file reads that was five chunks,
80 KiB, per slow download. With both marks at zero, uvicorn's `send` waits until the
previous chunk has gone entirely into the socket (which keeps the client busy
meanwhile), so a connection holds no more than the one chunk its body last sent.
The kernel's socket buffers still smooth out fast clients.

The kernel, for its part, lets a socket's send buffer grow to `tcp_wmem`'s maximum
(4 MiB here) whatever the client's window: 1,000 clients that read nothing made the
server read and queue up to 4 MiB each (kernel memory, and reads that slowed every
other request: the 1,000th answer came after 58 s). TCP_NOTSENT_LOWAT bounds what
waits there unsent (`socket_notsent_lowat`, off by default: see exporter/config.py);
what is in flight is still bounded by the client's window.
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
