"""The audit trail: one row per download, written when it starts and when it ends.

Writes are batched: `start` and `finish` only queue, and one flusher task per process
writes what was queued `flush_interval` seconds after it came (and at least BUSY_GAP
after the last batch) in one transaction (starts as one INSERT, ends of rows already
written as one UPDATE, each of arrays: one column per parameter, so that one prepared
statement serves every batch size and the driver, not Python, encodes the values; a
download that started and ended between two flushes is one INSERT). Each download used
to cost two transactions of its own, with a pool check-out each, on the event loop's
time.

Ids come from the table's identity sequence at flush time, so they still grow with time
across processes (a download's row has a larger id than any row written before it
started). `Download.id` is None until its row is written.

If the database cannot be written (down, or slow), the rows stay queued and are
retried, and downloads go on: a database that is merely busy never refuses one. The
queue is bounded: once `max_pending` rows wait, `start` refuses new downloads (the
caller answers 503) rather than let them go unrecorded; each refusal is counted
(`overflowed`, for /healthz and metrics) and logged at ERROR (the first of a run of
them, then every OVERFLOW_LOG_EVERY seconds). At shutdown `close` writes what is left.

A row the database refuses (a CHECK, a NUL byte) is dropped, not retried for ever: it
would hold back every other row. That is an error someone must see: logged at ERROR,
counted (`refused`), and /healthz says `degraded` for REFUSED_WINDOW seconds after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncEngine

from exporter import metrics
from exporter.tables import APP_SCHEMA

log = logging.getLogger(__name__)

COMPLETE, ABORTED, FAILED = "complete", "aborted", "failed"
# A file handed to the reverse proxy (X-Accel-Redirect): it sends the bytes, so the row
# ends when the app's part does, with no byte count.
PROXIED = "proxied"
# Seconds between the tries of a flush that failed (the last one repeats); at shutdown,
# after the last of them, what is still queued is given up (and logged).
FINISH_RETRIES = (0.5, 1.0, 2.0)
FLUSH_INTERVAL = 0.05
# The shortest time between two batches of one process: under a steady stream of
# downloads, at most two batches a second for their audit.
BUSY_GAP = 0.5
MAX_PENDING = 10_000
# Seconds /healthz stays `degraded` after the database refused an audit row.
REFUSED_WINDOW = 600.0
# Seconds between the ERROR lines while downloads are refused for a full queue.
OVERFLOW_LOG_EVERY = 10.0

_NEXT_IDS = sa.text(
    f"SELECT nextval(pg_get_serial_sequence('{APP_SCHEMA}.downloads', 'id')) AS id"
    " FROM generate_series(1, :n)"
)


@dataclass
class Download:
    """What is known of one download while it runs."""

    kind: str  # export | file | stored
    target: str
    client: str | None
    format: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    range: str | None = None
    id: int | None = None  # the row's, once written
    bytes: int = 0
    rows: int | None = None
    principal: str | None = None
    link_expires: datetime | None = None
    started: float = field(default_factory=time.monotonic)  # for the log line
    started_at: datetime | None = None  # set by Audit.start: queued for the audit


@dataclass(frozen=True)
class _End:
    status: str
    http_status: int | None
    error: str | None
    rows: int | None
    bytes: int
    ended_at: datetime


class AuditUnavailable(ConnectionError):
    """The audit trail cannot be written now: the download is refused (503)."""

    readable = True  # its words are the client's (errors.describe)


# The row's columns as the flusher writes them (`instance` is the server's default), each
# bound as one array for the batch, in the order of _start_row's and _end_row's tuples;
# their types are the table's (tests/test_audit.py checks).
_STARTS = (("id", "bigint"), ("kind", "text"), ("target", "text"), ("format", "text"),
           ("params", "jsonb"), ("range", "text"), ("client", "text"), ("status", "text"),
           ("principal", "text"), ("link_expires", "timestamptz"),
           ("started_at", "timestamptz"), ("http_status", "integer"), ("rows", "bigint"),
           ("bytes", "bigint"), ("error", "text"), ("ended_at", "timestamptz"))
_ENDS = (("id", "bigint"), ("status", "text"), ("http_status", "integer"), ("rows", "bigint"),
         ("bytes", "bigint"), ("error", "text"), ("ended_at", "timestamptz"))


def _arrays(columns: tuple[tuple[str, str], ...]) -> str:
    # jsonb travels as text: asyncpg's jsonb codec wants str, and the cast is per element.
    return ", ".join(f"CAST(:{name} AS text[])::jsonb[]" if kind == "jsonb"
                     else f"CAST(:{name} AS {kind}[])" for name, kind in columns)


_INSERT = sa.text(
    f"INSERT INTO {APP_SCHEMA}.downloads ({', '.join(name for name, _ in _STARTS)})"
    f" SELECT * FROM unnest({_arrays(_STARTS)})")
_UPDATE = sa.text(
    f"UPDATE {APP_SCHEMA}.downloads d SET"
    f" {', '.join(f'{name} = e.{name}' for name, _ in _ENDS[1:])}"
    f" FROM unnest({_arrays(_ENDS)}) AS e({', '.join(name for name, _ in _ENDS)})"
    " WHERE d.id = e.id")


def _start_row(d: Download, new_id: int, end: _End | None) -> tuple[Any, ...]:
    params = json.dumps(d.params)
    if end is None:
        return (new_id, d.kind, d.target, d.format, params, d.range, d.client, "running",
                d.principal, d.link_expires, d.started_at, None, None, 0, None, None)
    return (new_id, d.kind, d.target, d.format, params, d.range, d.client, end.status,
            d.principal, d.link_expires, d.started_at, end.http_status, end.rows, end.bytes,
            end.error, end.ended_at)


def _end_row(d: Download, e: _End) -> tuple[Any, ...]:
    return (d.id, e.status, e.http_status, e.rows, e.bytes, e.error, e.ended_at)


def _columns(names: tuple[tuple[str, str], ...], rows: list[tuple[Any, ...]]
             ) -> dict[str, list[Any]]:
    return {name: list(values)
            for (name, _), values in zip(names, zip(*rows, strict=True), strict=True)}


class Audit:
    def __init__(self, engine: AsyncEngine, *, flush_interval: float = FLUSH_INTERVAL,
                 max_pending: int = MAX_PENDING) -> None:
        self._engine = engine
        self._interval = flush_interval
        self._max_pending = max_pending
        self._starts: list[Download] = []  # rows not written yet, in start order
        self._ends: dict[int, tuple[Download, _End]] = {}  # by id() of the Download
        self._wake = asyncio.Event()
        self._closing = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self._failure: BaseException | None = None  # of the last flush, if it failed
        # Rows the database refused and that were dropped, since the process started.
        self.refused = 0
        self.last_refused: datetime | None = None
        self.last_refused_error: str | None = None
        self._last_refused_at: float | None = None  # monotonic
        # Downloads refused because `max_pending` rows waited, since the process started.
        self.overflowed = 0
        self._overflow_logged: float | None = None  # monotonic; None: not refusing

    @property
    def pending(self) -> int:
        return len(self._starts) + len(self._ends)

    @property
    def refusing(self) -> bool:
        """Whether the database refused a row within the last REFUSED_WINDOW seconds."""
        return (self._last_refused_at is not None
                and time.monotonic() - self._last_refused_at < REFUSED_WINDOW)

    @property
    def overflowing(self) -> bool:
        """Whether the last download asked for was refused for a full queue."""
        return self._overflow_logged is not None

    def _dropped(self, error: BaseException) -> None:
        self.refused += 1
        self.last_refused = datetime.now(UTC)
        self.last_refused_error = f"{type(error).__name__}: {error}".splitlines()[0][:500]
        self._last_refused_at = time.monotonic()
        log.error("audit row refused by the database, dropped (%d since start): %s",
                  self.refused, error)

    async def start(self, d: Download) -> None:
        """Queue the download's row; raises AuditUnavailable when `max_pending` rows
        wait (or at shutdown)."""
        if self._closing.is_set():
            raise AuditUnavailable("the server is shutting down")
        if self.pending >= self._max_pending:
            self._overflow()
            raise AuditUnavailable(f"{self.pending} audit rows wait to be written")
        if self._overflow_logged is not None:
            self._overflow_logged = None
            log.warning("downloads are audited again (%d refused since start)",
                        self.overflowed)
        d.started_at = datetime.now(UTC)
        self._starts.append(d)
        metrics.download_started(d.kind)
        self._kick()

    def _overflow(self) -> None:
        self.overflowed += 1
        now = time.monotonic()
        if self._overflow_logged is None or now - self._overflow_logged >= OVERFLOW_LOG_EVERY:
            self._overflow_logged = now
            log.error("download refused: %d audit rows wait to be written"
                      " (EXPORTER_AUDIT_MAX_PENDING), the database is down or too slow"
                      " (%d refused since start): %s", self.pending, self.overflowed,
                      self._failure or "no error yet")

    async def finish(
        self, d: Download, status: str, *, http_status: int | None = None,
        error: str | None = None,
    ) -> None:
        if d.started_at is None:  # never queued (refused, or no start at all)
            return
        log_finished(d, status, http_status)
        metrics.download_ended(d.kind, status, d.target, d.rows)
        self._ends[id(d)] = (d, _End(status, http_status, error, d.rows, d.bytes,
                                     datetime.now(UTC)))
        self._kick()

    async def close(self, within: float = 8.0) -> None:
        """Write what is queued (at shutdown, after the downloads' clean-ups and before the
        engine is disposed); rows still unwritten after `within` seconds are logged lost."""
        self._closing.set()
        self._kick()
        flusher = self._flusher
        if flusher is None:
            return
        try:
            async with asyncio.timeout(within):
                await asyncio.shield(flusher)
        except TimeoutError:
            flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await flusher
        if self.pending:
            log.error("%d audit rows could not be written before shutdown: lost", self.pending)

    def _kick(self) -> None:
        self._wake.set()
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        retries = 0
        loop = asyncio.get_running_loop()
        flushed = -BUSY_GAP
        while True:
            await self._wake.wait()
            # Let a batch gather, and no sooner than BUSY_GAP after the last one (a
            # steady stream of downloads then costs a few transactions a second, not one
            # per interval); at shutdown, write at once.
            gather = max(self._interval, flushed + BUSY_GAP - loop.time())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(gather):  # wait_for may swallow a cancellation
                    await self._closing.wait()
            self._wake.clear()
            flushed = loop.time()
            try:
                await self._flush()
            except Exception as error:
                if self._failure is None:
                    log.warning("could not write %d audit rows; retrying: %s",
                                self.pending, error)
                self._failure = error
                wait = FINISH_RETRIES[min(retries, len(FINISH_RETRIES) - 1)]
                retries += 1
                if self._closing.is_set() and retries > len(FINISH_RETRIES):
                    log.error("could not write %d audit rows at shutdown: %s",
                              self.pending, error)
                    return
                await asyncio.sleep(wait)
                self._wake.set()
                continue
            if self._failure is not None:
                log.warning("audit rows written again")
            self._failure, retries = None, 0
            if self._closing.is_set() and not self.pending:
                return

    async def _flush(self) -> None:
        starts, self._starts = self._starts, []
        ends, self._ends = self._ends, {}
        if not starts and not ends:
            return
        try:
            await self._write(starts, ends)
        except BaseException:
            # Back in the queue, ahead of what came meanwhile (a newer end wins).
            self._starts[:0] = starts
            self._ends = {**ends, **self._ends}
            raise

    async def _write(self, starts: list[Download], ends: dict[int, tuple[Download, _End]]
                     ) -> None:
        try:
            await self._write_batch(starts, ends)
        except (sa_exc.DataError, sa_exc.IntegrityError) as error:
            # One download's start and end (or end alone) at a time, to find the row the
            # database refuses (a NUL byte in a text, say): that one is dropped, not
            # retried for ever, which would hold back every other row.
            units = [([d], {id(d): ends[id(d)]} if id(d) in ends else {}) for d in starts]
            started = {id(d) for d in starts}
            units += [([], {key: end}) for key, end in ends.items() if key not in started]
            if len(units) == 1:
                self._dropped(error)
                return
            for unit_starts, unit_ends in units:
                try:
                    await self._write(unit_starts, unit_ends)
                except Exception as unit_error:
                    # Not raised: the units before it are written and must not be again.
                    log.warning("could not write an audit row yet; retrying: %s", unit_error)
                    self._starts.extend(unit_starts)
                    self._ends = {**unit_ends, **self._ends}

    async def _write_batch(self, starts: list[Download],
                           ends: dict[int, tuple[Download, _End]]) -> None:
        started = {id(d) for d in starts}
        updates: list[tuple[Any, ...]] = []
        for key, (d, end) in ends.items():
            if key in started:
                continue
            if d.id is None:  # its start was refused by the database and dropped
                log.error("end of a download whose audit row was dropped: %s %s",
                          d.kind, d.target)
                continue
            updates.append(_end_row(d, end))
        async with self._engine.begin() as conn:
            ids: list[int] = []
            if starts:
                ids = sorted((await conn.execute(_NEXT_IDS, {"n": len(starts)})).scalars())
                rows = []
                for d, new_id in zip(starts, ids, strict=True):
                    merged = ends.get(id(d))
                    rows.append(_start_row(d, new_id, merged[1] if merged else None))
                await conn.execute(_INSERT, _columns(_STARTS, rows))
            if updates:
                await conn.execute(_UPDATE, _columns(_ENDS, updates))
        for d, new_id in zip(starts, ids, strict=True):
            d.id = new_id


def log_finished(d: Download, status: str, http_status: int | None) -> None:
    """One log line per finished download; its fields also as `download` for JSON logs."""
    fields = {"id": d.id, "principal": d.principal or "anonymous", "kind": d.kind,
              "target": d.target, "bytes": d.bytes, "status": status,
              "http_status": http_status,
              "duration": round(time.monotonic() - d.started, 3)}
    # A download that ends before its row is written has no id yet: the line then names
    # none (it said "download None").
    named = "download %(id)s" if d.id is not None else "download"
    log.info(named + " %(status)s: %(principal)s %(kind)s %(target)s, %(bytes)d bytes in"
             " %(duration).3f s", fields, extra={"download": fields})


async def close_abandoned(engine: AsyncEngine) -> int:
    """At start: the rows left `running` by server processes whose lease ran out (killed,
    host lost) are closed as aborted; how many. Rows of live processes, and rows written
    before processes had ids, stay as they are."""
    async with engine.begin() as conn:
        result = await conn.execute(sa.text(
            "UPDATE exporter.downloads d SET status = :aborted, ended_at = now(),"
            " error = 'the server process ended during the download'"
            " WHERE d.status = 'running' AND d.instance IS NOT NULL"
            " AND NOT EXISTS (SELECT 1 FROM exporter.instances i"
            "                 WHERE i.id = d.instance AND i.expires_at > now())"),
            {"aborted": ABORTED})
    return int(result.rowcount)
