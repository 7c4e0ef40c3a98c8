"""Caps: concurrent downloads per principal, concurrent exports per process, bytes per
second per download, and how long an export may wait on a client that reads nothing.

A route takes its slots before any query runs; the middleware gives them back when the
response is over, however it ended. A request over a cap waits a little in a FIFO
queue (a download tool opening 6 or 8 connections at once then finishes without
retries), and stops waiting when its client leaves.

The middleware also paces the body's `send` calls when a bandwidth cap is set (pacing
makes the body generator wait, and so the database or the file reader behind it) and
bounds how long an export's `send` may wait on a client that reads nothing: uvicorn's
`send` only waits while the socket's buffer is full, so a long wait there is exactly
"data is waiting and the client takes none of it".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from exporter.errors import ApiError

log = logging.getLogger(__name__)

_RELEASES = "exporter.download_slots"
_WATCH = "exporter.export_watch"
RETRY_AFTER = "5"
MAX_DURATION = "the export ran longer than EXPORTER_EXPORT_MAX_DURATION"
# Waiters per principal beyond its cap: more connections than any download tool opens
# at once, few enough that one client cannot park thousands of requests here.
WAITERS_PER_SLOT = 4


class Slots:
    """`limit` holders at a time; the others wait in order of arrival."""

    def __init__(self, limit: int, max_waiting: int) -> None:
        self.limit = limit
        self.max_waiting = max_waiting
        self.active = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @property
    def idle(self) -> bool:
        return self.active == 0 and not self._waiters

    def try_take(self) -> bool:
        if self.active < self.limit and not self._waiters:
            self.active += 1
            return True
        return False

    async def take(self, wait: float) -> bool:
        """True with a slot; False when none came within `wait` seconds or too many wait."""
        if self.try_take():
            return True
        if wait <= 0 or len(self._waiters) >= self.max_waiting:
            return False
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        got = False
        try:
            async with asyncio.timeout(wait):
                await waiter
            got = True
        except TimeoutError:
            pass
        finally:
            if not got:
                if waiter.done() and not waiter.cancelled():
                    # Handed a slot just as it gave up (timeout or cancellation): pass it on.
                    self.release()
                else:
                    waiter.cancel()
                    with contextlib.suppress(ValueError):
                        self._waiters.remove(waiter)
        return got

    def release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot goes to it directly: no one can cut in
                return
        self.active -= 1


class ClientLeft(Exception):
    """The client went away while its request waited for a slot."""


class Limiter:
    """The slots of this server process: per principal (`limit_key`) and for exports."""

    def __init__(self, per_principal: int, wait: float, max_exports: int,
                 exports_wait: float) -> None:
        self.per_principal = per_principal
        self.wait = wait
        self.exports_wait = exports_wait
        self._principals: dict[str, Slots] = {}
        self.exports = Slots(max_exports, max_waiting=max_exports)

    async def acquire(self, request: Request, key: str, *, export: bool = False) -> None:
        """Take the principal's slot (and an export slot), waiting a little if need be.

        429 or 503 with Retry-After when none came in time; ClientLeft if the client
        went away meanwhile. The middleware gives the slots back.
        """
        slots = self._principals.get(key)
        if slots is None:
            slots = self._principals[key] = Slots(
                self.per_principal, WAITERS_PER_SLOT * self.per_principal)
        try:
            got = slots.try_take() or await _unless_disconnected(slots.take(self.wait),
                                                                 request.receive)
        finally:
            if slots.idle:
                self._principals.pop(key, None)
        if not got:
            raise ApiError(
                429, f"at most {self.per_principal} downloads at a time; try again shortly",
                headers={"Retry-After": RETRY_AFTER})
        on_request_end(request.scope, lambda: self._give_back(key, slots))
        if not export:
            return
        got = self.exports.try_take() or await _unless_disconnected(
            self.exports.take(self.exports_wait), request.receive)
        if not got:
            raise ApiError(503, "the server is running as many exports as it may;"
                           " try again shortly", headers={"Retry-After": RETRY_AFTER})
        on_request_end(request.scope, self.exports.release)

    def _give_back(self, key: str, slots: Slots) -> None:
        slots.release()
        if slots.idle and self._principals.get(key) is slots:
            del self._principals[key]

    def active(self, key: str) -> int:
        slots = self._principals.get(key)
        return 0 if slots is None else slots.active


async def _unless_disconnected(take: Coroutine[Any, Any, bool], receive: Receive) -> bool:
    """The outcome of `take`, or ClientLeft if the client disconnects first."""

    async def disconnected() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(take)
    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task  # gives back a slot handed over meanwhile
    if task.cancelled():
        raise ClientLeft
    return task.result()


def on_request_end(scope: Scope, release: Callable[[], None]) -> None:
    """Call `release` once when the request is over, however it ended (see the middleware)."""
    done = False

    def once() -> None:
        nonlocal done
        if not done:
            done = True
            release()

    scope.setdefault("state", {}).setdefault(_RELEASES, []).append(once)


@dataclass
class ExportWatch:
    """What the middleware needs to cut an export whose client stalls."""

    idle_timeout: float  # 0: never
    deadline: float | None  # loop time; None: never
    cut: Callable[[str], None]  # told why, before the response is cut

    def limit(self, now: float) -> tuple[float, str] | None:
        """How long the next `send` may wait, and why it is cut past that."""
        limits: list[tuple[float, str]] = []
        if self.idle_timeout > 0:
            limits.append((self.idle_timeout,
                           f"the client read nothing for {self.idle_timeout:g} s"))
        if self.deadline is not None:
            limits.append((max(0.0, self.deadline - now), MAX_DURATION))
        return min(limits) if limits else None


def watch_export(scope: Scope, watch: ExportWatch) -> None:
    scope.setdefault("state", {})[_WATCH] = watch


class ResponseCut(Exception):
    """An export's response was cut on purpose; its body is left unfinished."""


class DownloadLimits:
    """ASGI middleware: frees a request's slots at its end, paces limited downloads,
    and cuts exports whose clients stall."""

    def __init__(self, app: ASGIApp, bytes_per_second: Callable[[], int]) -> None:
        self.app = app
        self.bytes_per_second = bytes_per_second

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        started = loop.time()
        sent = 0
        state = scope.setdefault("state", {})

        async def guarded(message: Message) -> None:
            nonlocal sent
            if message["type"] != "http.response.body":
                await send(message)
                return
            rate = self.bytes_per_second()
            if rate > 0 and _RELEASES in state:
                sent += len(message.get("body", b""))
                ahead = sent / rate - (loop.time() - started)
                if ahead > 0:
                    await asyncio.sleep(ahead)
            watch: ExportWatch | None = state.get(_WATCH)
            limit = None if watch is None else watch.limit(loop.time())
            if limit is None:
                await send(message)
                return
            seconds, reason = limit
            try:
                async with asyncio.timeout(seconds):
                    # uvicorn waits for room before it writes: cut here, nothing is half sent.
                    await send(message)
            except TimeoutError:
                assert watch is not None
                watch.cut(reason)
                raise ResponseCut(reason) from None

        try:
            await self.app(scope, receive, guarded)
        except ResponseCut as cut:
            # Returning without the final chunk makes uvicorn close the connection: the
            # client sees a broken download (curl exit 18, wget 4), not a short file.
            log.warning("%s %s: cut: %s", scope["method"], scope["path"], cut)
        finally:
            for release in state.get(_RELEASES, []):
                release()
