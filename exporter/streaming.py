"""What every streamed body needs: watching for a client that leaves before the answer
starts, and clean-ups that must finish after it left."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Coroutine
from typing import Any, TypeVar

from starlette.types import Receive

T = TypeVar("T")


class ClientLeft(Exception):
    """The client went away while its request waited (for a slot, for the first row)."""


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
