"""The ASGI application: settings, engine and catalog wired to the routes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from exporter import __version__, health, metrics, tracing
from exporter.access import routes as access_routes
from exporter.access.limits import DownloadLimits, Instance, Limiter, new_instance_id
from exporter.access.links import LinkKeys, redact_query
from exporter.access.token_cache import TokenCache
from exporter.access.tokens import TokenStore
from exporter.audit import Audit, close_abandoned
from exporter.config import Settings
from exporter.db import (
    UnsupportedServer,
    check_server_version,
    create_engine,
    create_replica_engine,
    libpq_url_of,
)
from exporter.errors import DRIVER_ERRORS, ApiError, database_error
from exporter.exports import downloads
from exporter.exports import routes as export_routes
from exporter.exports.catalog import Catalog
from exporter.exports.export import end_running_exports
from exporter.files import routes as file_routes
from exporter.files.deps import files_of
from exporter.files.stream import ReadBudget
from exporter.health import Health, StoreHealth
from exporter.notices import Notices
from exporter.objects import ObjectStore, StoreOptions
from exporter.server.logs import AccessLogOfLeavers
from exporter.server.prefix import RootPath
from exporter.state import State
from exporter.stored import routes as stored_routes
from exporter.stored.bucket import BucketStorage
from exporter.stored.responses import ServedResumeCopies
from exporter.stored.service import StoredService
from exporter.stored.storages import storage_for
from exporter.streaming import ClientLeft, wait_detached
from exporter.web import page
from exporter.web import routes as web_routes
from exporter.web.cors import add_cors

log = logging.getLogger(__name__)

# Seconds the shutdown waits for the clean-ups of the last downloads (connections to
# release; their audit rows are then written by Audit.close), after uvicorn's grace
# for open responses (EXPORTER_SHUTDOWN_GRACE).
DETACHED_GRACE = 8.0


class _RedactSignatures(logging.Filter):
    """uvicorn's access log prints query strings, and a signed link's is a credential:
    its signature is redacted under whatever spelling of its name authenticated."""

    @staticmethod
    def _redact(text: str) -> str:
        path, question, query = text.partition("?")
        return f"{path}?{redact_query(query)}" if question else text

    def filter(self, record: logging.LogRecord) -> bool:
        if record.args and isinstance(record.args, tuple):
            record.args = tuple(self._redact(a) if isinstance(a, str) else a
                                for a in record.args)
        record.msg = self._redact(str(record.msg))
        return True


def redact_secrets_in_access_log() -> None:
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, _RedactSignatures) for f in access.filters):
        access.addFilter(_RedactSignatures())


class OneLineStartupRefusal:
    """Starlette reports a lifespan that fails with its traceback; a database too old
    is reported in one line instead, as the commands do. The server then exits with its
    own status for a failed start-up (uvicorn's 3, which gunicorn takes as "do not
    restart the worker")."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return
        held: list[Message] = []

        async def hold_failures(message: Message) -> None:
            if message["type"] == "lifespan.startup.failed":
                held.append(message)
            else:
                await send(message)

        try:
            await self.app(scope, receive, hold_failures)
        except UnsupportedServer as error:
            await send({"type": "lifespan.startup.failed", "message": f"exporter: {error}"})
            return
        except BaseException:
            # Any other failure is reported as Starlette reported it.
            for message in held:
                await send(message)
            raise
        for message in held:
            await send(message)


async def _close_abandoned(engine: AsyncEngine, instance: Instance) -> None:
    """Close the audit rows of processes that died mid-download (their lease ran out),
    then forget those processes and their slots. Live processes' rows stay as they are."""
    try:
        if closed := await close_abandoned(engine):
            log.warning("%d downloads left running by server processes that ended:"
                        " marked aborted", closed)
        await instance.prune()
    except Exception as error:
        log.error("could not close the downloads of ended server processes: %s", error)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    if settings.database_url is None:
        raise RuntimeError("EXPORTER_DATABASE_URL is not set: start it with `exporter serve`")
    database_url = settings.database_url

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        instance_id = new_instance_id()
        engine = create_engine(settings, database_url, instance=instance_id)
        replica = create_replica_engine(settings)
        catalog = Catalog(engine, settings.dataset_schema)
        try:
            async with engine.connect() as conn:
                await check_server_version(conn)
            await catalog.reload()
        except UnsupportedServer:
            await engine.dispose()
            if replica is not None:
                await replica.dispose()
            raise
        except Exception as error:
            # Serve anyway: /healthz says what is wrong and exports answer 503.
            log.error("could not read the catalog at start-up: %s", error)
        instance = Instance(engine, instance_id, settings.slot_lease)
        await instance.start()
        notices = Notices(libpq_url_of(engine))
        token_cache = TokenCache(notices, settings.token_cache_ttl)
        limiter = Limiter(engine, instance_id, settings.max_downloads_per_principal,
                          settings.limit_wait, settings.export_cap, settings.max_exports_wait,
                          linger=settings.slot_linger, notices=notices, instance=instance)
        await notices.start()
        await _close_abandoned(engine, instance)
        storage = storage_for(settings)
        stored = StoredService(engine, settings, storage, instance_id)
        files_store = (ObjectStore(settings.files_store, StoreOptions.from_settings(settings))
                       if settings.files_store else None)
        app.state.exporter = State(
            settings, engine, catalog,
            Audit(engine, flush_interval=settings.audit_flush_interval,
                  max_pending=settings.audit_max_pending),
            TokenStore(engine, token_cache),
            LinkKeys(engine, settings.link_secret),
            limiter,
            ReadBudget(settings.file_read_budget, settings.file_chunk_size,
                       settings.file_chunk_size_max),
            Health(database_url),
            replica=replica,
            replica_health=Health(settings.replica_url) if settings.replica_url else None,
            stored=stored,
            files_store=files_store,
            notices=notices,
            store_health=StoreHealth.of(
                settings, files=files_store,
                exports=storage.store if isinstance(storage, BucketStorage) else None),
        )
        if settings.exports_resume:
            app.state.exporter.resume_copies = ServedResumeCopies(
                stored, files_of(app.state.exporter))
        await stored.start_cleanup()
        sampler = metrics.Sampler(
            metrics.Sources(engine, replica, app.state.exporter.audit,
                            settings.exports_max_bytes), settings.metrics_interval)
        if settings.metrics:
            sampler.start()
        if replica is not None:
            log.info("exports read from the read replica (EXPORTER_REPLICA_URL)")
        yield
        await sampler.stop()
        # Exports cut by the shutdown end in detached tasks that still need the pool
        # (connections to let go, audit rows to close). uvicorn starts this before the
        # requests it cancelled have run their clean-up: those are ended here.
        await asyncio.sleep(0)
        # Stored exports running here end as failed (they are not resumed: see
        # exporter/stored/store.py), before their connections and audit rows go.
        await stored.stop()
        if ended := end_running_exports():
            log.warning("%d exports still running at shutdown: aborted", ended)
        if left := await wait_detached(DETACHED_GRACE):
            log.warning("%d clean-ups still running at shutdown", left)
        # After the clean-ups (they queue the last rows), before the pool goes.
        await app.state.exporter.audit.close()
        await instance.stop()
        await notices.stop()
        await app.state.exporter.health.close()
        if app.state.exporter.replica_health is not None:
            await app.state.exporter.replica_health.close()
        await engine.dispose()
        if replica is not None:
            await replica.dispose()
        if end_tracing is not None:
            end_tracing()

    redact_secrets_in_access_log()
    metrics.configure(dataset_labels=settings.metrics_dataset_labels)
    app = FastAPI(title="exporter", version=__version__, lifespan=lifespan)
    app.add_middleware(DownloadLimits, bytes_per_second=lambda: settings.max_bytes_per_second)
    app.add_middleware(OneLineStartupRefusal)
    # Outermost, so that preflights never take a download slot and every answer of the
    # routes, errors included, gets its CORS headers.
    add_cors(app, settings.cors_origins)
    if settings.metrics:
        # Inside RootPath, which copies the scope: the route the router notes is seen.
        app.add_middleware(metrics.RequestMetrics)
    # Outermost of all: every layer inside sees the prefix in place.
    app.add_middleware(RootPath, root_path=settings.root_path)
    # Around that, so that its lines name the path as uvicorn's own do.
    app.add_middleware(AccessLogOfLeavers)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        metrics.refused(error.status, error.reason)
        return error.response()

    @app.exception_handler(ClientLeft)
    async def client_left(request: Request, error: ClientLeft) -> Response:
        return Response(status_code=499)  # nobody is listening; uvicorn drops it

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

    # Wherever a route meets the database failing, the answer says so (never a 500).
    # Plain OSErrors are left out: a file that cannot be read is not the database's fault.
    for kind in (*DRIVER_ERRORS, ConnectionError):
        @app.exception_handler(kind)
        async def database_failed(request: Request, error: Exception) -> JSONResponse:
            log.warning("%s %s: database error: %s", request.method, request.url.path, error)
            answer = database_error(error)
            metrics.refused(answer.status, answer.reason)
            return answer.response()

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        body = ApiError(500, f"internal error: {type(error).__name__}").body()
        return JSONResponse(body, status_code=500)

    # The router tries each route in turn: files and exports, the requests that come in
    # bursts, first (no other path starts like theirs).
    app.include_router(file_routes.router)
    app.include_router(export_routes.router)
    app.include_router(health.router)
    app.include_router(page.router)
    app.include_router(access_routes.router)
    app.include_router(downloads.router)
    app.include_router(stored_routes.router)
    if settings.metrics:
        app.include_router(web_routes.router)
    # Last: the instrumentation wraps the whole app, middleware included.
    end_tracing = tracing.instrument(app, settings)
    return app
