"""PostgreSQL `LISTEN` on a connection of its own: what other processes changed.

Caches on the hot path (tokens, digests) stay valid only while this process hears every
change: `live` is true while the connection is up and answered a ping within
`STALE` seconds. Whenever it may have missed a notification (at start, after the
connection was lost), every `on_gap` callback runs once it listens again, so the caches
forget what they knew. Why: docs/internals.md, section `notices.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import asyncpg

log = logging.getLogger(__name__)

# Seconds between the pings that tell a silently dead connection from a quiet one.
PING_EVERY = 5.0
# A connection that answered no ping for this long is not trusted (caches go to the
# database until it answers again).
STALE = 11.0
# After a connection is lost, the first try is at once (the caches are off meanwhile).
RETRY_EVERY = (0.0, 0.2, 0.5, 1.0, 2.0)


class Notices:
    """One listening connection per process; callbacks run on the event loop."""

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._channels: dict[str, list[Callable[[str], None]]] = {}
        self._gaps: list[Callable[[], None]] = []
        self._conn: Any = None  # asyncpg.Connection
        self._answered = -STALE  # monotonic time of the last ping answered
        self._task: asyncio.Task[None] | None = None
        self._lost = asyncio.Event()

    def on(self, channel: str, callback: Callable[[str], None]) -> None:
        """Call `callback(payload)` for each notification on `channel` (before `start`)."""
        self._channels.setdefault(channel, []).append(callback)

    def on_gap(self, callback: Callable[[], None]) -> None:
        """Call `callback()` whenever notifications may have been missed."""
        self._gaps.append(callback)

    @property
    def live(self) -> bool:
        return self._conn is not None and time.monotonic() - self._answered < STALE

    async def start(self) -> None:
        """Listen now if the database answers, else keep trying in the background."""
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2):
                await self._connect()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._drop()

    async def _connect(self) -> None:
        conn = await asyncpg.connect(
            self._dsn, server_settings={"application_name": "exporter notices"})
        try:
            for channel in self._channels:
                await conn.add_listener(channel, self._dispatch)
            conn.add_termination_listener(lambda _conn: self._lost.set())
        except BaseException:
            conn.terminate()
            raise
        self._conn, self._answered = conn, time.monotonic()
        self._lost.clear()
        # Listening from here on: what changed before is forgotten.
        self._gap()

    def _dispatch(self, _conn: object, _pid: int, channel: str, payload: str) -> None:
        for callback in self._channels.get(channel, ()):
            try:
                callback(payload)
            except Exception:
                log.exception("notification on %s failed", channel)

    def _gap(self) -> None:
        for callback in self._gaps:
            try:
                callback()
            except Exception:
                log.exception("could not forget a cache")

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()
        self._gap()

    async def _run(self) -> None:
        failures = 0
        while True:
            try:
                if self._conn is None:
                    async with asyncio.timeout(5):
                        await self._connect()
                    if failures:
                        log.warning("listening for changes again")
                    failures = 0
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(PING_EVERY):
                        await self._lost.wait()
                if self._lost.is_set():
                    raise ConnectionError("the listening connection was closed")
                async with asyncio.timeout(STALE / 2):
                    await self._conn.execute("SELECT 1")
                self._answered = time.monotonic()
            except Exception as error:
                if self._conn is not None or not failures:
                    log.warning("not listening for changes (tokens and digests are read"
                                " from the database meanwhile): %s", error)
                self._drop()
                await asyncio.sleep(RETRY_EVERY[min(failures, len(RETRY_EVERY) - 1)])
                failures += 1
