"""The ASGI application: settings, engine and catalog wired to the routes."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from exporter import __version__
from exporter.audit import Audit
from exporter.catalog import Catalog
from exporter.config import Settings
from exporter.db import create_engine
from exporter.errors import ApiError
from exporter.routes import datasets, files, health
from exporter.state import State

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    if settings.database_url is None:
        raise RuntimeError("EXPORTER_DATABASE_URL is not set: start it with `exporter serve`")
    database_url = settings.database_url

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = create_engine(settings, database_url)
        catalog = Catalog(engine, settings.dataset_schema)
        try:
            await catalog.reload()
        except Exception as error:
            # Serve anyway: /healthz says what is wrong and exports answer 503.
            log.error("could not read the catalog at start-up: %s", error)
        app.state.exporter = State(settings, engine, catalog, Audit(engine))
        yield
        await engine.dispose()

    app = FastAPI(title="exporter", version=__version__, lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        body = ApiError(error.status_code, str(error.detail)).body()
        return JSONResponse(body, status_code=error.status_code, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        parameter = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        body = ApiError(400, str(first.get("msg", "invalid request")), parameter=parameter).body()
        return JSONResponse(body, status_code=400)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        body = ApiError(500, f"internal error: {type(error).__name__}").body()
        return JSONResponse(body, status_code=500)

    app.include_router(health.router)
    app.include_router(datasets.router)
    app.include_router(files.router)
    return app
