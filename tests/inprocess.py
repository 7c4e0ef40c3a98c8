"""The app in this process: `create_app` with explicit settings, its lifespan run on an
event loop of its own (in a thread), and requests through httpx's ASGITransport. The
database is the real one of the session (`database_url`); there is no uvicorn and no
socket, so a matrix of a hundred requests costs what its queries cost.

For what goes through the app and its database: status codes, headers, JSON errors,
small bodies (ASGITransport buffers a whole body). Streaming, disconnects, the HTTP
server's own limits and real clients (curl, wget) stay with tests/support.py's Server.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import httpx
from fastapi import FastAPI

from exporter.app import create_app
from exporter.config import Settings
from exporter.state import State
from tests.support import exports_folder

T = TypeVar("T")
BASE_URL = "http://testserver"


class InProcess:
    """`with InProcess(settings) as app:` then `app.get(path)`, `app.request(...)`."""

    def __init__(self, settings: Settings) -> None:
        if settings.exports_dir is None:
            # Stored exports (and the copies of streamed ones) out of the checkout.
            settings = settings.model_copy(update={"exports_dir": exports_folder(
                settings.database_url or "")})
        self.settings = settings
        self.app: FastAPI = create_app(settings)
        self.url = BASE_URL
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._client: httpx.AsyncClient | None = None
        self._stop: asyncio.Event | None = None
        self._lifespan: asyncio.Future[None] | None = None

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        """Run a coroutine on the app's loop (where its engine lives) and wait for it."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    @property
    def state(self) -> State:
        s: State = self.app.state.exporter
        return s

    def __enter__(self) -> InProcess:
        self._thread.start()
        try:
            self.run(self._started())
        except BaseException:
            self._close_loop()
            raise
        return self

    async def _started(self) -> None:
        # The lifespan runs in a task of its own until asked to stop, as a server runs it.
        ready = asyncio.Event()
        self._stop = asyncio.Event()
        failure: list[BaseException] = []

        async def lifespan() -> None:
            try:
                async with self.app.router.lifespan_context(self.app):
                    ready.set()
                    assert self._stop is not None
                    await self._stop.wait()
            except BaseException as error:
                failure.append(error)
                ready.set()
                raise

        self._lifespan = asyncio.ensure_future(lifespan())
        await ready.wait()
        if failure:
            raise failure[0]
        self._client = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app),
                                         base_url=BASE_URL, timeout=60)

    def __exit__(self, *exc: object) -> None:
        try:
            self.run(self._stopped())
        finally:
            self._close_loop()

    async def _stopped(self) -> None:
        if self._client is not None:
            await self._client.aclose()
        if self._stop is not None and self._lifespan is not None:
            self._stop.set()
            await self._lifespan

    def _close_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        assert self._client is not None, "use InProcess as a context manager"
        return self.run(self._client.request(method, path, **kwargs))

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", path, **kwargs)

    def head(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("HEAD", path, **kwargs)

    def options(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("OPTIONS", path, **kwargs)

    def call(self, function: Callable[[State], Awaitable[T]]) -> T:
        """`app.call(lambda st: st.tokens.create(...))`: use the app's own objects."""

        async def go() -> T:
            return await function(self.state)

        return self.run(go())
