"""Every route and every dependency of it is a coroutine function: FastAPI runs a plain function
in a worker thread, a hand-over there and back on each request for what is an attribute
read or a string check (a tenth of the CPU of a file request answered with
X-Accel-Redirect, when `get_state` and `file_path` were plain functions)."""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence

from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from starlette.routing import BaseRoute

from exporter.app import create_app
from exporter.config import Settings


def _calls(dependant: Dependant) -> Iterator[tuple[str, object]]:
    for sub in dependant.dependencies:
        yield getattr(sub.call, "__qualname__", repr(sub.call)), sub.call
        yield from _calls(sub)


def _api_routes(routes: Sequence[BaseRoute]) -> Iterator[APIRoute]:
    for route in routes:
        if isinstance(route, APIRoute):
            yield route
        # FastAPI 0.165 keeps an included router whole (`original_router`).
        inner = getattr(route, "original_router", None)
        if inner is not None:
            yield from _api_routes(inner.routes)


def test_no_dependency_runs_in_a_thread() -> None:
    app = create_app(Settings(database_url="postgresql+asyncpg://unused@127.0.0.1/unused"))
    routes = list(_api_routes(app.routes))
    assert len(routes) > 10
    seen = {name: call for route in routes for name, call in _calls(route.dependant)}
    assert "_state" in seen and "_file_request" in seen
    plain = sorted(name for name, call in seen.items()
                   if not inspect.iscoroutinefunction(call))
    assert plain == []
    # The routes themselves, for the same reason.
    assert [r.path for r in routes if not inspect.iscoroutinefunction(r.endpoint)] == []
