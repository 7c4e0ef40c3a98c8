"""One export read as several ctid ranges, each by a PostgreSQL backend of its own, all in
the export's snapshot, sent in block order: the bytes of one COPY, read faster.

Why and how (docs/internals.md, `exports/parallel.py`): the export's own connection exports
its snapshot (`pg_export_snapshot`), pool connections import it (`SET TRANSACTION
SNAPSHOT`, REPEATABLE READ READ ONLY) and each reads a range of heap blocks (a TID Range
Scan, PostgreSQL 14+); a partitioned table's pieces are its partitions, in the order of
one COPY's plan, the large ones cut in ranges too (exports/partitions.py). The piece being
sent goes straight to the response; those ahead wait in a `Spool` (memory, then a
temporary file), whose bound makes their COPY wait in turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import json
import logging
import os
import tempfile
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from exporter.config import Settings
from exporter.db import driver_connection, on_this_host
from exporter.exports import cursor, partitions, sql
from exporter.exports.copy import Output
from exporter.exports.query import ExportQuery
from exporter.exports.renderers.base import CopyStatement, copied_rows

log = logging.getLogger(__name__)

# PostgreSQL scans a ctid range without reading the rest from version 14 on.
TID_RANGE_SCANS_FROM = (14,)
# Bytes moved to or from a spool's file in one call (in a worker thread).
FILE_BLOCK = 256 << 10
# Plans whose order is an index's, not the heap's: such an export stays one COPY.
_INDEX_ORDER = {"Index Scan", "Index Only Scan"}

# Asks for `n` more export slots for the request's lease, returns how many it got.
TakeSlots = Callable[[int], Any]


def wanted(query: ExportQuery, settings: Settings, *, splits: bool, per_principal: int,
           replica: bool) -> int:
    """How many ranges an export asks for, from what is known before any round trip (1:
    one COPY): a table or materialized view whose heap is large enough, the whole of its
    rows in no order but the heap's (`limit`, `offset`, `order` and pages of items keep
    one COPY), and not on the read replica."""
    n = min(settings.export_parallel, per_principal, _cores_to_spare(settings))
    pages = query.dataset.pages
    if (n < 2 or not splits or replica or pages is None
            or pages < settings.export_parallel_min_pages
            or query.order or query.limit is not None or query.offset):
        return 1
    return n


def _cores_to_spare(settings: Settings) -> int:
    """Ranges this machine can feed. PostgreSQL on the same machine (the embedded one, a
    unix socket, loopback) shares its cores with this server: on 2 cores, two ranges made a
    CSV export 0.8x one COPY (docs/benchmarks.md, issue 25). Then half the cores, unless
    EXPORTER_EXPORT_PARALLEL was set; a database elsewhere has its own."""
    if "export_parallel" in settings.model_fields_set or not on_this_host(settings.database_url):
        return settings.export_parallel
    return max(1, (os.cpu_count() or 1) // 2)


class Spool:
    """One range's output on its way: in memory up to `memory` bytes, then in an unlinked
    temporary file up to `disk` bytes; past both, its writer (the range's COPY) waits.
    Read once, in the order written."""

    def __init__(self, memory: int, disk: int, folder: Path, piece: int) -> None:
        self._memory_cap = memory
        self._disk_cap = disk
        self._folder = folder
        self._piece = piece  # the most one read gives (a response chunk)
        self._memory: deque[bytes] = deque()
        self._in_memory = 0
        # The file path: what is in the file ([read, end)), then what waits to be written.
        self._fd: int | None = None
        # The file's calls run in worker threads, which a cancelled export does not stop:
        # the descriptor is closed under this lock, never under a call still using it
        # (its number could already name another export's file or socket).
        self._lock = threading.Lock()
        self._closed = False
        self._read = 0
        self._end = 0
        self._pending = bytearray()
        # What gathers in memory before it is written to the file, in one call.
        self._flush_at = min(FILE_BLOCK, max(1, disk // 4))
        self._flushing = 0  # bytes being written to the file
        self._file_used = False  # a file call was ever started
        self._on_disk = 0  # unread bytes of the file path
        self._ended = False
        self._failure: BaseException | None = None
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()

    def _file_path_empty(self) -> bool:
        return self._on_disk == 0

    async def write(self, data: bytes) -> None:
        """The COPY's output callback: waits while the spool is full."""
        while True:
            if self._failure is not None:
                raise self._failure
            self._writable.clear()
            size = len(data)
            if self._file_path_empty() and self._in_memory < self._memory_cap:
                self._memory.append(bytes(data))
                self._in_memory += size
                self._readable.set()
                return
            if self._disk_cap > 0 and (self._on_disk == 0
                                       or self._on_disk + size <= self._disk_cap):
                self._pending += data
                self._on_disk += size
                self._readable.set()
                if len(self._pending) >= self._flush_at and not self._flushing:
                    await self._flush()
                return
            await self._writable.wait()

    async def _flush(self) -> None:
        data, offset = self._pending, self._end
        self._pending = bytearray()  # the writer waits for this flush: nothing to copy
        self._flushing = len(data)
        self._file_used = True
        try:
            await asyncio.to_thread(self._write_file, data, offset)
        finally:
            self._flushing = 0
        self._end += len(data)
        self._readable.set()

    def end(self) -> None:
        """The range's COPY ran out."""
        self._ended = True
        self._readable.set()

    def fail(self, error: BaseException) -> None:
        """A range failed: the reader and the writer raise `error` when they next look."""
        if self._failure is None:
            self._failure = error
        self._readable.set()
        self._writable.set()

    async def pieces(self) -> AsyncIterator[bytes]:
        """What was written, in order, until the writer ends (or anything fails)."""
        while True:
            self._readable.clear()
            if self._failure is not None:
                raise self._failure
            if self._memory:
                yield self._from_memory()
            elif self._read < self._end:
                block = await asyncio.to_thread(
                    self._read_file, min(FILE_BLOCK, self._end - self._read), self._read)
                self._read += len(block)
                self._consumed_from_disk(len(block))
                for piece in _pieces(block, self._piece):
                    yield piece
            elif self._pending and not self._flushing:
                data, self._pending = self._pending, bytearray()
                self._consumed_from_disk(len(data))
                for piece in _pieces(data, self._piece):
                    yield piece
            elif self._ended and not self._flushing and self._on_disk == 0:
                return
            else:
                await self._readable.wait()

    def _from_memory(self) -> bytes:
        taken: list[bytes] = []
        size = 0
        while self._memory and (not taken or size + len(self._memory[0]) <= self._piece):
            piece = self._memory.popleft()
            taken.append(piece)
            size += len(piece)
        self._in_memory -= size
        self._writable.set()
        return taken[0] if len(taken) == 1 else b"".join(taken)

    def _consumed_from_disk(self, size: int) -> None:
        self._on_disk -= size
        if self._read == self._end and not self._flushing:
            self._read = self._end = 0  # all read: the file is written from its start again
        self._writable.set()

    def _write_file(self, data: bytearray, offset: int) -> None:
        with self._lock:
            if self._closed:
                raise OSError(errno.EBADF, "the spool is closed")
            if self._fd is None:
                self._fd = _temporary_file(self._folder)
            os.pwrite(self._fd, data, offset)

    def _read_file(self, size: int, offset: int) -> bytes:
        with self._lock:
            if self._closed or self._fd is None:
                raise OSError(errno.EBADF, "the spool is closed")
            return os.pread(self._fd, size, offset)

    def _close_file(self) -> None:
        with self._lock:
            self._closed = True
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def close(self) -> None:
        """Close the file in a worker thread (once no call uses it), without waiting."""
        if not self._file_used:
            self._closed = True  # no thread ever had the file: nothing to wait for
            return
        asyncio.get_running_loop().run_in_executor(None, self._close_file)


def _pieces(data: bytes | bytearray, size: int) -> list[bytes]:
    view = memoryview(data)
    return [bytes(view[start:start + size]) for start in range(0, len(data), size)]


def _temporary_file(folder: Path) -> int:
    """A file with no name: gone with its descriptor, whatever happens to the process."""
    folder.mkdir(parents=True, exist_ok=True)
    descriptor, path = tempfile.mkstemp(dir=folder, prefix="spool-")
    os.unlink(path)
    return descriptor


@dataclasses.dataclass(frozen=True)
class Piece:
    """A part of an export read by one COPY: heap blocks of the dataset, or of one of its
    partitions (`FROM ONLY`, exports/partitions.py)."""

    blocks: sql.Blocks
    partition: partitions.Partition | None = None


@dataclasses.dataclass
class _Worker:
    """A pool connection in the export's snapshot, reading ranges."""

    conn: AsyncConnection
    driver: Any
    query: ExportQuery  # the export's query, with this transaction's `since` reference
    pid: int  # its backend's (asyncpg forgets it once the connection is closed)


class Ranges:
    """An export's pieces and the connections open in its snapshot that read them: `copy`
    reads them all, `release` lets the extra connections go."""

    def __init__(self, engine: AsyncEngine, settings: Settings, main_driver: Any,
                 query: ExportQuery, pieces: list[Piece], workers: list[_Worker],
                 label: str) -> None:
        self._engine = engine
        self._settings = settings
        self._main = main_driver
        self._query = query
        self.pieces = pieces
        self._workers = workers
        self._label = label
        self._tasks: list[asyncio.Task[int | None]] = []

    @property
    def count(self) -> int:
        """How many backends read the export (its connection and the extra ones)."""
        return 1 + len(self._workers)

    async def copy(self, body: Callable[[str], CopyStatement], output: Output) -> int | None:
        """Every piece's COPY of `body`, on the export's backends at once, written to
        `output` in the pieces' order; the rows in all. Pieces go to the backends in
        order, a piece only once the one `count` places before it was sent, so that at
        most `count` spools hold output at a time (the bound of one piece per backend).
        The first failure of any piece cancels them all and is raised."""
        s = self._settings
        memory = s.export_chunk_size * s.export_buffer_chunks
        # The spools that may hold a file at once: those ahead of the first piece, or, when
        # backends take further pieces, as many as the backends.
        files = self.count - 1 if len(self.pieces) <= self.count else self.count
        spools = [Spool(memory, 0 if i == 0 else s.export_parallel_spool // max(1, files),
                        s.exports_folder, s.export_chunk_size)
                  for i in range(len(self.pieces))]
        sent = [asyncio.Event() for _ in self.pieces]
        taken = iter(range(len(self.pieces)))
        readers = [(self._main, self._query), *((w.driver, w.query) for w in self._workers)]

        async def read(driver: Any, query: ExportQuery) -> int | None:
            rows: int | None = 0
            for i in taken:
                if i >= self.count:
                    await sent[i - self.count].wait()
                piece = self.pieces[i]
                count = await self._read(
                    driver, body(sql.select_sql(query, piece.blocks, piece.partition)),
                    spools[i])
                rows = None if rows is None or count is None else rows + count
            return rows

        self._tasks = [asyncio.ensure_future(read(d, q)) for d, q in readers]
        drivers = [d for d, _ in readers]

        def stop() -> None:
            for task, driver in zip(self._tasks, drivers, strict=True):
                if not task.done():
                    # Its connection closed in the same step (exports/copy.py's
                    # `CopyStream.cut` says why); its backend is cancelled by pid besides
                    # (`release`, export.py's `_cancel_backend`).
                    task.cancel()
                    driver.terminate()

        def failed(task: asyncio.Task[int | None]) -> None:
            if task.cancelled() or task.exception() is None:
                return
            error = task.exception()
            assert error is not None
            for spool in spools:
                spool.fail(error)
            stop()

        for task in self._tasks:
            task.add_done_callback(failed)
        try:
            for spool, done in zip(spools, sent, strict=True):
                async for piece in spool.pieces():
                    await output(piece)
                done.set()
            rows: int | None = 0
            for task in self._tasks:
                count = await task
                rows = None if rows is None or count is None else rows + count
            return rows
        finally:
            stop()
            with contextlib.suppress(BaseException):
                await asyncio.gather(*self._tasks, return_exceptions=True)
            for spool in spools:
                spool.close()

    @staticmethod
    async def _read(driver: Any, statement: CopyStatement, spool: Spool) -> int | None:
        status = await driver.copy_from_query(statement.query, output=spool.write,
                                              **statement.options)
        spool.end()
        return copied_rows(status)

    async def release(self, *, clean: bool) -> None:
        """Let the extra connections go: back to the pool after a complete export, else
        their queries cancelled on the server and their sockets closed at once."""
        workers, self._workers = self._workers, []
        for task in self._tasks:
            task.cancel()
        if not workers:
            return
        if not clean:
            await self._cancel_backends([w.pid for w in workers])
        await asyncio.gather(*(_let_go(w, clean) for w in workers))

    async def _cancel_backends(self, pids: list[int]) -> None:
        # As exports/export.py's _cancel_backend: the cancel request asyncpg sends for a
        # cancelled COPY dies with the connection.
        try:
            async with asyncio.timeout(2), self._engine.connect() as conn:
                await conn.execute(text("SELECT pg_cancel_backend(p) FROM unnest("
                                        "CAST(:pids AS int[])) AS p"), {"pids": pids})
        except Exception as error:
            log.info("export %s: could not cancel its backends %s: %s", self._label, pids,
                     error)


async def _let_go(worker: _Worker, clean: bool) -> None:
    try:
        if not clean:
            raise RuntimeError("export did not finish")
        async with asyncio.timeout(5):
            await worker.conn.rollback()
        await worker.conn.close()
    except BaseException:
        worker.driver.terminate()
        with contextlib.suppress(Exception):
            await worker.conn.invalidate()
            await worker.conn.close()


async def open_ranges(conn: AsyncConnection, main_driver: Any, engine: AsyncEngine,
                      settings: Settings, query: ExportQuery, wanted_ranges: int,
                      take_slots: TakeSlots, xmax: int | None, label: str) -> Ranges | None:
    """The export's ranges (read by its own connection and the extra ones), or None for
    one COPY: PostgreSQL before 14, a plan in an index's order (or, for a partitioned
    table, not an Append of heap scans: exports/partitions.py), no slot to spare, a heap
    of fewer blocks than ranges, or a connection that could not join the snapshot."""
    if (conn.dialect.server_version_info or (0,)) < TID_RANGE_SCANS_FROM:
        return None
    leaves: list[partitions.Partition] | None = None
    if query.dataset.partitioned:
        leaves = await partitions.leaves(conn, query)
        if leaves is None:
            return None
    elif (query.filters or query.trees) and not await _heap_ordered(conn, query):
        return None
    # This process's pool too, with two connections left for the app's own queries (as
    # Settings.export_cap): a check-out that would wait is one COPY instead.
    room = (settings.pool_size + settings.pool_max_overflow - 2
            - int(getattr(engine.pool, "checkedout", lambda: 0)()))
    if min(wanted_ranges - 1, room) < 1:
        return None
    extra = await take_slots(min(wanted_ranges - 1, room))
    if extra < 1:
        return None
    ds = query.dataset
    heaps: list[partitions.Partition] = leaves or [(ds.schema, ds.name)]
    # The heaps' real sizes, read in the export's transaction (the catalog's estimate may
    # be old).
    row: Any = (await conn.exec_driver_sql(
        "SELECT pg_export_snapshot(), ARRAY(SELECT pg_relation_size(CAST(r AS regclass))"
        " / current_setting('block_size')::bigint"
        " FROM unnest(CAST($1 AS text[])) WITH ORDINALITY AS u(r, o) ORDER BY o)",
        ([sql.qualified(*h) for h in heaps],))).one()
    snapshot, sizes = str(row[0]), [int(p) for p in row[1]]
    pieces = [Piece(blocks, None if leaves is None else leaves[heap])
              for heap, blocks in split(sizes, extra + 1)]
    n = min(extra + 1, len(pieces))
    if n < 2:
        return None
    joining = [asyncio.ensure_future(_join(engine, settings, snapshot, query, xmax))
               for _ in range(n - 1)]
    try:
        await asyncio.wait(joining)
    except BaseException:
        # Cancelled (the client left, the first row's deadline): what joined goes back.
        await _abandon(joining)
        raise
    failures = [t.exception() for t in joining if t.exception() is not None]
    if failures:
        log.warning("export %s: one COPY, a connection could not join its snapshot: %s",
                    label, failures[0])
        await _abandon(joining)
        return None
    workers = [t.result() for t in joining]
    if leaves is None:
        log.info("export %s: %d ctid ranges of %d blocks", label, n, sizes[0])
    else:
        log.info("export %s: %d ctid ranges of %d partitions (%d blocks) on %d backends",
                 label, len(pieces), len(leaves), sum(sizes), n)
    return Ranges(engine, settings, main_driver, query, pieces, workers, label)


def split(sizes: list[int], n: int) -> list[tuple[int, sql.Blocks]]:
    """Heaps of `sizes` pages (a table's one, or a partitioned table's leaves in order)
    cut into about `n` equal block ranges, each heap's in block order: a heap gets its
    share of `n` (a heap alone gets `n`, never more than its pages), a small one one
    range; the last range of a heap is open-ended (a heap that grew since is read whole:
    what was written after the snapshot is not visible)."""
    total = sum(sizes)
    pieces: list[tuple[int, sql.Blocks]] = []
    for heap, pages in enumerate(sizes):
        k = max(1, min(pages, round(pages * n / total))) if total else 1
        bounds = [pages * i // k for i in range(k)]
        pieces += [(heap, (bounds[i], bounds[i + 1] if i + 1 < k else None))
                   for i in range(k)]
    return pieces


async def _abandon(joining: list[asyncio.Task[_Worker]]) -> None:
    for task in joining:
        task.cancel()
    await asyncio.gather(*joining, return_exceptions=True)
    await asyncio.gather(*(_let_go(t.result(), True) for t in joining
                           if not t.cancelled() and t.exception() is None))


async def _heap_ordered(conn: AsyncConnection, query: ExportQuery) -> bool:
    """Whether PostgreSQL reads the export in heap order (a sequential or bitmap scan), so
    that its ranges in block order give the bytes of one COPY: not an index's order."""
    plan = (await conn.exec_driver_sql(
        f"EXPLAIN (FORMAT JSON, COSTS OFF) {sql.select_sql(query)}")).scalar_one()
    nodes = json.loads(plan) if isinstance(plan, str) else plan
    found: set[str] = set()
    stack: list[Any] = [n["Plan"] for n in nodes]
    while stack:
        node = stack.pop()
        found.add(str(node.get("Node Type")))
        stack.extend(node.get("Plans", []))
    return not found & _INDEX_ORDER


async def _join(engine: AsyncEngine, settings: Settings, snapshot: str, query: ExportQuery,
                xmax: int | None) -> _Worker:
    """A pool connection in a REPEATABLE READ READ ONLY transaction with the export's
    snapshot, bounded as the export's own COPY (EXPORTER_EXPORT_MAX_DURATION)."""
    conn = await engine.connect()
    try:
        conn = await conn.execution_options(isolation_level="REPEATABLE READ",
                                            postgresql_readonly=True)
        driver: Any = await driver_connection(conn)
        # The snapshot's name is PostgreSQL's own (hex digits and dashes).
        await conn.exec_driver_sql(
            f"SET TRANSACTION SNAPSHOT {sql.quote_literal(snapshot)}")
        row: Any = (await conn.exec_driver_sql(cursor.AHEAD_SQL, (
            sql.timeout_setting(settings.export_max_duration),))).one()
        if query.since_reference is not None:
            # `since` counts from this transaction's own age() reference.
            reference = None if xmax is None else cursor.reference_of(xmax, int(row[1]))
            query = dataclasses.replace(query, since_reference=reference)
    except BaseException:
        with contextlib.suppress(Exception):
            await conn.invalidate()
            await conn.close()
        raise
    return _Worker(conn, driver, query, driver.get_server_pid())

