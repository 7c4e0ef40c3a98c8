"""Per-principal caps: concurrent downloads, and bytes per second per download.

A route takes a slot before any query runs; the middleware gives it back when the
response is over, however it ended, and paces the body's `send` calls when a
bandwidth cap is set. Pacing `send` makes the body generator wait, and so the
database or the file reader behind it: memory does not grow.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from exporter.errors import ApiError

_STATE_KEY = "exporter.download_slot"


class Limiter:
    """Counts the downloads in progress per principal, in this server process."""

    def __init__(self, per_principal: int) -> None:
        self.per_principal = per_principal
        self._active: Counter[str] = Counter()

    def acquire(self, scope: Scope, key: str) -> None:
        """Take a slot for this request, or answer 429 at once."""
        if self._active[key] >= self.per_principal:
            raise ApiError(
                429, f"at most {self.per_principal} downloads at a time; try again shortly",
                headers={"Retry-After": "5"},
            )
        self._active[key] += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._active[key] -= 1
                if self._active[key] <= 0:
                    del self._active[key]

        scope.setdefault("state", {})[_STATE_KEY] = release

    def active(self, key: str) -> int:
        return self._active[key]


class DownloadLimits:
    """ASGI middleware: frees a request's slot at its end and paces limited downloads."""

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

        async def paced(message: Message) -> None:
            nonlocal sent
            rate = self.bytes_per_second()
            if rate > 0 and message["type"] == "http.response.body" and _STATE_KEY in scope.get(
                "state", {}
            ):
                sent += len(message.get("body", b""))
                ahead = sent / rate - (loop.time() - started)
                if ahead > 0:
                    await asyncio.sleep(ahead)
            await send(message)

        try:
            await self.app(scope, receive, paced)
        finally:
            release = scope.get("state", {}).get(_STATE_KEY)
            if release is not None:
                release()
