"""Prometheus metrics: the instruments, and the small calls the rest of the code makes.

Counted where things happen (a request answered, a chunk sent, a download started or
ended, a COPY finished, a slot taken or given back, a refusal), each a few microseconds;
sampled every EXPORTER_METRICS_INTERVAL seconds (and before each answer of /metrics on
the app's port): the pool, the audit queue, the stored exports and their bytes. Labels
are bounded: route templates, never paths; dataset names only with
EXPORTER_METRICS_DATASET_LABELS.

With several worker processes (`exporter serve --workers N`) every process writes its
values into files of PROMETHEUS_MULTIPROC_DIR (prometheus-client's multiprocess mode,
set up by exporter/server/metrics.py) and a scrape adds them up. How: docs/internals.md,
section `metrics.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import glob
import logging
import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from exporter import __version__
from exporter.server.sendfile import BODY_TYPES, ZEROCOPY_SEND, body_bytes, sent_of
from exporter.tables import stored_exports

if TYPE_CHECKING:
    from exporter.audit import Audit

log = logging.getLogger(__name__)

# `_created` series double every counter's lines and say nothing a scrape's own time
# does not (multiprocess mode has none anyway).
disable_created_metrics()  # type: ignore[no-untyped-call]

MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"

# --- requests -------------------------------------------------------------------------

_FAST = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60)
_LONG = (.005, .01, .05, .1, .5, 1, 5, 10, 30, 60, 300, 900, 3600, 14400)

REQUESTS = Counter(
    "exporter_http_requests", "HTTP requests answered, by route template, method and status"
    " (499: the client left before the answer started)", ["route", "method", "status"])
FIRST_BYTE = Histogram(
    "exporter_http_first_byte_seconds", "Seconds from a request's arrival to the start of its"
    " answer (status line and headers), by route template", ["route"], buckets=_FAST)
DURATION = Histogram(
    "exporter_http_request_duration_seconds", "Seconds from a request's arrival to the end"
    " of its answer (the last body byte taken by the socket), by route template", ["route"],
    buckets=_LONG)
SENT = Counter(
    "exporter_sent_bytes", "Bytes of response bodies sent, by kind: file (/files/...),"
    " export (/datasets/...), stored (/exports/{id}/file), other (the API, the page)",
    ["kind"])
SENDFILE = Counter(
    "exporter_sendfile_bytes", "Of exporter_sent_bytes_total, the bytes of files the kernel"
    " sent from the page cache (sendfile), which never passed through the process; none"
    " on a connection that cannot take them (TLS)")
REFUSED = Counter(
    "exporter_refused", "Requests refused with 429 or 503, by status and reason",
    ["status", "reason"])

# --- downloads and exports ------------------------------------------------------------

ACTIVE = Gauge(
    "exporter_downloads_active", "Downloads in progress (audit rows running), by kind;"
    " a stored export being written counts as an export", ["kind"],
    multiprocess_mode="livesum")
DOWNLOADS = Counter(
    "exporter_downloads", "Downloads ended, by kind and audit status (complete, aborted,"
    " failed, proxied)", ["kind", "status"])
ROWS = Counter("exporter_export_rows", "Rows of exports whose COPY ran to its end")
COPY_SECONDS = Histogram(
    "exporter_export_copy_seconds", "Seconds from a COPY's start to its last row or its"
    " failure, slow clients' waits included (not counted: COPYs stopped because their"
    " client left)", buckets=_LONG)
DATASET_ROWS = Counter(
    "exporter_dataset_export_rows", "Rows of exports by dataset"
    " (EXPORTER_METRICS_DATASET_LABELS)", ["dataset"])
DATASET_EXPORTS = Counter(
    "exporter_dataset_exports", "Exports ended, by dataset (EXPORTER_METRICS_DATASET_LABELS)",
    ["dataset"])

# --- sampled --------------------------------------------------------------------------

SLOTS = Gauge(
    "exporter_slots_held", "Download slots in use on this server, by cap: principal (per"
    " principal), exports (deployment-wide)", ["cap"], multiprocess_mode="livesum")
POOL_IN_USE = Gauge(
    "exporter_db_pool_connections_in_use", "Pool connections checked out", ["pool"],
    multiprocess_mode="livesum")
POOL_WAITING = Gauge(
    "exporter_db_pool_waiting", "Requests waiting for a pool connection", ["pool"],
    multiprocess_mode="livesum")
POOL_MAX = Gauge(
    "exporter_db_pool_connections_max", "Pool size plus overflow", ["pool"],
    multiprocess_mode="livesum")
AUDIT_PENDING = Gauge(
    "exporter_audit_rows_pending", "Audit rows waiting to be written",
    multiprocess_mode="livesum")
# The deployment's, read from the database: every process reports the same, the most
# recent reading wins.
STORED = Gauge(
    "exporter_stored_exports", "Stored exports (and resume copies: kind streamed) in the"
    " database, by kind and state", ["kind", "state"], multiprocess_mode="livemostrecent")
STORED_BYTES = Gauge(
    "exporter_stored_bytes", "Bytes the stored exports hold against the quota (running and"
    " complete), by kind", ["kind"], multiprocess_mode="livemostrecent")
STORED_QUOTA = Gauge(
    "exporter_stored_quota_bytes", "EXPORTER_EXPORTS_MAX_BYTES (0: no quota)",
    multiprocess_mode="livemostrecent")
INFO = Gauge("exporter_build_info", "1, labelled with the server's version", ["version"],
             multiprocess_mode="livemax")

STORED_KINDS = ("async", "streamed")
STORED_STATES = ("running", "complete", "failed", "cancelled")
_HOLDING = ("running", "complete")


@dataclass
class _Options:
    dataset_labels: bool = False


_options = _Options()


def configure(*, dataset_labels: bool) -> None:
    """The settings the calls below read (the app's, at its creation)."""
    _options.dataset_labels = dataset_labels
    INFO.labels(__version__).set(1)


# --- the calls ------------------------------------------------------------------------

def refused(status: int, reason: str | None) -> None:
    """A 429 or 503 answer (other statuses are not refusals: not counted here)."""
    if status in (429, 503):
        REFUSED.labels(str(status), reason or "other").inc()


def download_started(kind: str) -> None:
    _child(ACTIVE, kind).inc()


def download_ended(kind: str, status: str, target: str, rows: int | None) -> None:
    _child(ACTIVE, kind).dec()
    _child(DOWNLOADS, kind, status).inc()
    if _options.dataset_labels and kind == "export":
        DATASET_EXPORTS.labels(target).inc()
        if rows:
            DATASET_ROWS.labels(target).inc(rows)


def copy_ended(rows: int | None, seconds: float) -> None:
    """A COPY's producer returned `rows` (None: it failed or was stopped)."""
    COPY_SECONDS.observe(seconds)
    if rows:
        ROWS.inc(rows)


def slot_taken(cap: str, count: int = 1) -> None:
    _child(SLOTS, cap).inc(count)


def slot_given_back(cap: str) -> None:
    _child(SLOTS, cap).dec()


# --- requests, as ASGI middleware -------------------------------------------------------

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# What a route's bodies are, for exporter_sent_bytes_total.
_KINDS = {"/files/{path:path}": "file", "/datasets/{name:path}": "export",
          "/exports/{export_id}/file": "stored", "/exports/{export_id}/{name}": "stored"}
UNMATCHED = "unmatched"  # no route: a 404, a preflight, a refusal before routing


@functools.cache
def _child(metric: Any, *labels: str) -> Any:
    """`metric.labels(*labels)`, looked up once: labels() validates and locks each time
    (about 1 µs), and the hot path asks for the same few again and again. The label sets
    are bounded, so the cache is too."""
    return metric.labels(*labels)


def route_of(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else UNMATCHED


class RequestMetrics:
    """ASGI middleware: each request counted by route template, method and status, with
    its time to the answer's start and to its end, and its body bytes by kind.

    Inside RootPath (which copies the scope), so that the route the router writes into
    the scope is seen here."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 0
        sent: Counter | None = None  # of the route's kind, once the answer started

        async def counted(message: Message) -> None:
            nonlocal status, sent
            kind = message["type"]
            if kind in BODY_TYPES:
                done = False
                try:
                    await send(message)
                    done = True
                finally:
                    # A zero-copy send that broke off counts what of it left.
                    size = body_bytes(message) if done else sent_of(message)
                    if size and sent is not None:
                        sent.inc(size)
                        if kind == ZEROCOPY_SEND:
                            SENDFILE.inc(size)
                return
            if kind == "http.response.start":
                status = message["status"]
                route = route_of(scope)
                _child(FIRST_BYTE, route).observe(time.perf_counter() - started)
                sent = _child(SENT, _KINDS.get(route, "other"))
            await send(message)

        try:
            await self.app(scope, receive, counted)
        except BaseException:
            # Answered by the server error middleware outside this one (500), or by
            # nobody (cancelled).
            status = status or 500
            raise
        finally:
            route = route_of(scope)
            method = scope["method"] if scope["method"] in _METHODS else "other"
            _child(REQUESTS, route, method, str(status or 499)).inc()
            _child(DURATION, route).observe(time.perf_counter() - started)


# --- sampling ---------------------------------------------------------------------------

@dataclass
class Sources:
    """What is sampled: the pools, the audit queue, the stored exports' table."""

    engine: AsyncEngine
    replica: AsyncEngine | None
    audit: Audit
    quota: int
    # Seconds a reading of the database may take.
    timeout: float = 2.0


def _pool(name: str, engine: AsyncEngine) -> None:
    pool: Any = engine.pool
    checkedout = getattr(pool, "checkedout", None)
    if checkedout is None:  # not a QueuePool (NullPool: nothing to count)
        return
    POOL_IN_USE.labels(name).set(checkedout())
    POOL_MAX.labels(name).set(pool.size() + max(0, getattr(pool, "_max_overflow", 0)))
    # SQLAlchemy counts no waiters: they are the getters of the asyncio.Queue under its
    # AsyncAdaptedQueue (created on first use; absent, nobody waited yet).
    queue = getattr(getattr(pool, "_pool", None), "__dict__", {}).get("_queue")
    POOL_WAITING.labels(name).set(len(getattr(queue, "_getters", ())))


async def _stored(engine: AsyncEngine) -> None:
    t = stored_exports.c
    holding = t.status.in_(_HOLDING)
    query = sa.select(t.kind, t.status, sa.func.count(),
                      sa.func.coalesce(sa.func.sum(t.bytes).filter(holding), 0)
                      ).group_by(t.kind, t.status)
    async with engine.connect() as conn:
        rows = (await conn.execute(query)).all()
    counts = {(kind, state): 0 for kind in STORED_KINDS for state in STORED_STATES}
    held = dict.fromkeys(STORED_KINDS, 0)
    for kind, state, count, size in rows:
        counts[(kind, state)] = int(count)
        held[kind] = held.get(kind, 0) + int(size)
    for (kind, state), count in counts.items():
        STORED.labels(kind, state).set(count)
    for kind, size in held.items():
        STORED_BYTES.labels(kind).set(size)


async def sample(sources: Sources) -> None:
    """Read what is sampled now; the database part within `sources.timeout` seconds (a
    failure leaves its values as they were, and is logged at debug level: /healthz is
    where an unreachable database is told)."""
    _pool("primary", sources.engine)
    if sources.replica is not None:
        _pool("replica", sources.replica)
    AUDIT_PENDING.set(sources.audit.pending)
    STORED_QUOTA.set(sources.quota)
    try:
        async with asyncio.timeout(sources.timeout):
            await _stored(sources.engine)
    except Exception as error:
        log.debug("could not read the stored exports for the metrics: %s", error)


class Sampler:
    """Samples every `interval` seconds, for scrapes that do not go through this process
    (another worker's, the separate bind's)."""

    def __init__(self, sources: Sources, interval: float) -> None:
        self.sources = sources
        self.interval = interval
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await sample(self.sources)
            await asyncio.sleep(self.interval)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


# --- exposition -------------------------------------------------------------------------

_LIVE_FILE = re.compile(r"gauge_live\w+_(\d+)\.db")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Aggregate(Collector):
    """Every process's values in `path`, added up; the live gauges of processes that are
    gone (a worker killed and replaced) dropped first. Their counters stay: a counter of
    the deployment never goes down when a worker is restarted."""

    def __init__(self, path: str) -> None:
        self.path = path

    def collect(self) -> Iterable[Metric]:
        for name in glob.glob(os.path.join(self.path, "gauge_live*.db")):
            found = _LIVE_FILE.fullmatch(os.path.basename(name))
            if found and not _alive(int(found[1])):
                with contextlib.suppress(FileNotFoundError):
                    mark_process_dead(int(found[1]), self.path)  # type: ignore[no-untyped-call]
        files = glob.glob(os.path.join(self.path, "*.db"))
        merged: Iterable[Metric] = MultiProcessCollector.merge(  # type: ignore[no-untyped-call]
            files, accumulate=True)
        return merged


def registry() -> CollectorRegistry:
    """What a scrape reads: every worker's values in multiprocess mode, else this
    process's."""
    path = os.environ.get(MULTIPROC_DIR)
    if not path:
        return REGISTRY
    aggregate = CollectorRegistry(auto_describe=False)
    aggregate.register(Aggregate(path))
    return aggregate


def exposition(accept: str | None) -> tuple[bytes, str]:
    """The text format (or OpenMetrics, if `accept` asks for it) and its media type.
    Reads files in multiprocess mode: run it in a thread."""
    try:
        encoder, media_type = choose_encoder(accept or "")
    except (TypeError, ValueError):
        # prometheus-client compares an OpenMetrics `version=abc` as a number and fails:
        # such an Accept gets the text format, as one that asks for nothing.
        encoder, media_type = choose_encoder("")
    return encoder(registry()), media_type


async def scrape(sources: Sources, accept: str | None) -> tuple[bytes, str]:
    """GET /metrics: this process sampled now, then the exposition (of every worker's
    values in multiprocess mode, the others' as they last sampled)."""
    await sample(sources)
    return await asyncio.to_thread(exposition, accept)
