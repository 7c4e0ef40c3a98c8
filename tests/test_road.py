"""The road of an export (docs/internals.md, "The road of an export"): the path of
`GET /datasets/orders.csv?paid=is.true` from the route to the COPY, traced in process
with a profiler, never re-enters a module that is already below it on the call chain (it
doubled back through access, stored and exports' service before issue 20)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from types import FrameType
from typing import Any

import pytest

from exporter.config import Settings
from tests.inprocess import InProcess

ROUTE = "exporter.exports.routes"


@pytest.fixture(scope="module")
def app(database_url: str) -> Iterator[InProcess]:
    settings = Settings(database_url=database_url, public_datasets=["*"], public_files=["*"])
    with InProcess(settings) as running:
        yield running


def _chain(frame: FrameType | None) -> list[str]:
    """The exporter modules on the call (await) chain from `frame` down, nearest first."""
    modules: list[str] = []
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if module.startswith("exporter.") and (not modules or modules[-1] != module):
            modules.append(module)
        frame = frame.f_back
    return modules


def trace(app: InProcess, path: str) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """The modules the request's own calls entered, in order, and every call that
    entered a module already on its chain from another module."""
    hops: list[str] = []
    doubled: list[tuple[str, list[str]]] = []

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        if event != "call":
            return
        module = frame.f_globals.get("__name__", "")
        if not module.startswith("exporter."):
            return
        below = _chain(frame.f_back)
        if ROUTE not in below and module != ROUTE:
            return  # another task's work (the audit's flushes, a heartbeat)
        # From the route up: the middleware below it (limits, logs) is not the road.
        below = below[:below.index(ROUTE) + 1] if ROUTE in below else []
        if not hops or hops[-1] != module:
            hops.append(module)
        if below and below[0] != module and module in below:
            doubled.append((module, below))

    async def set_profile(hook: Any) -> None:
        sys.setprofile(hook)

    app.run(set_profile(profile))
    try:
        r = app.get(path, headers={"Accept-Encoding": "identity"})
    finally:
        app.run(set_profile(None))
    assert r.status_code == 200, r.text
    return hops, doubled


def test_the_road_of_an_export_never_doubles_back(app: InProcess) -> None:
    hops, doubled = trace(app, "/datasets/orders.csv?paid=is.true")
    assert not doubled, doubled
    # The hops docs/internals.md lists, in their order (the route reads the headers into
    # the request's record before the service runs, so a module may come more than once).
    order = ["exporter.exports.routes", "exporter.exports.deps", "exporter.exports.service",
             "exporter.exports.request", "exporter.access.admission", "exporter.exports.export",
             "exporter.exports.responses"]
    left = iter(hops)
    assert all(module in left for module in order), hops
