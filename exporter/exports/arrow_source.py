"""An export's rows as Arrow record batches: the ADBC PostgreSQL driver reading the
export's SELECT inside the export's own snapshot, in a thread of its own.

Why ADBC, measured (docs/benchmarks.md, "Where Arrow rows come from"): it reads binary
COPY into Arrow in C, with the types of the result, where COPY's CSV through pyarrow's
CSV reader was no faster and cannot carry arrays, intervals or bytea exactly, and
decoding binary COPY in Python was slower than either. The export's pool connection
(asyncpg) keeps its snapshot, checks and counts; it exports the snapshot
(`pg_export_snapshot`) and the driver's connection imports it (`SET TRANSACTION
SNAPSHOT`), so the rows are exactly those a CSV export of the same request sends. That
connection is the export's: opened for it, under its admission lease (the export slot it
already holds), closed with it; a cancelled export cancels its query (`adbc_cancel`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from exporter.errors import ApiError
from exporter.exports import arrow_types

log = logging.getLogger(__name__)

# What the driver gathers into one record batch at most (its own default is 16 MiB): the
# first batch of an Arrow stream leaves after this much, and a Parquet row group is made
# of several (a quarter of EXPORTER_PARQUET_ROW_GROUP_BYTES, when that is less).
BATCH_BYTES = 8 << 20
# asyncpg's Type.kind of an array column.
_ARRAY = "array"


class ArrowReader:
    """One export's rows through the driver; every driver call runs in its one thread."""

    def __init__(self, url: str, batch_bytes: int) -> None:
        self._url = url
        self._batch_bytes = batch_bytes
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="arrow-export")
        self._connection: Any = None
        self._cursor: Any = None
        self._reader: Any = None
        self._busy = False
        self.schema: Any = None  # what the batches hold (arrow_types.target_schema)

    async def _call(self, function: Any, *args: Any) -> Any:
        self._busy = True
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, function,
                                                                    *args)
        except Exception as error:
            raise _api_error(error) from error
        finally:
            self._busy = False

    async def open(self, snapshot: str, select: str, max_duration: float) -> None:
        await self._call(self._open, snapshot, select, max_duration)

    def _open(self, snapshot: str, select: str, max_duration: float) -> None:
        import adbc_driver_postgresql.dbapi as dbapi  # heavy, used here only

        # autocommit: the transaction is this one, begun by hand, so that its snapshot can
        # be set before its first query.
        self._connection = dbapi.connect(self._url, autocommit=True)
        cursor = self._cursor = self._connection.cursor()
        cursor.adbc_statement.set_options(
            **{"adbc.postgresql.batch_size_hint_bytes": str(self._batch_bytes)})
        cursor.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        cursor.execute(f"SET TRANSACTION SNAPSHOT '{snapshot}'")
        # As the export's own COPY: bounded by EXPORTER_EXPORT_MAX_DURATION on the server
        # too, should this process not stop it.
        cursor.execute(f"SET LOCAL statement_timeout = {int(max_duration * 1000)}")
        cursor.execute(select)
        self._reader = cursor.fetch_record_batch()
        self.schema = arrow_types.target_schema(self._reader.schema)

    async def next(self) -> Any:
        """The next record batch in `schema`, or None after the last."""
        return await self._call(self._next)

    def _next(self) -> Any:
        try:
            batch = self._reader.read_next_batch()
        except StopIteration:
            return None
        return arrow_types.convert_batch(batch, self.schema)

    def close(self) -> None:
        """Cancel a query still running, close the connection in the driver's thread,
        without waiting (the caller may be a cancelled task)."""
        if self._busy and self._cursor is not None:
            with contextlib.suppress(Exception):
                self._cursor.adbc_cancel()
        self._pool.submit(self._close)
        self._pool.shutdown(wait=False)

    def _close(self) -> None:
        for thing in (self._reader, self._cursor, self._connection):
            if thing is not None:
                try:
                    thing.close()
                except Exception as error:  # the export is over either way
                    log.debug("closing an Arrow export's connection: %s", error)


@contextlib.asynccontextmanager
async def reading(driver: Any, url: str, select: str, *, max_duration: float,
                  row_group_bytes: int) -> AsyncIterator[ArrowReader]:
    """The rows of `select` in the snapshot of `driver`'s transaction (the export's
    asyncpg connection), read through the driver at `url`."""
    select = await _readable(driver, select)
    snapshot = await driver.fetchval("SELECT pg_export_snapshot()")
    reader = ArrowReader(url, min(BATCH_BYTES, row_group_bytes // 4))
    try:
        await reader.open(snapshot, select, max_duration)
        yield reader
    finally:
        reader.close()


async def _readable(driver: Any, select: str) -> str:
    """`select`, with the columns the driver reads only as raw bytes cast to text."""
    statement = await driver.prepare(select)
    columns = []
    cast = False
    for attribute in statement.get_attributes():
        kind = attribute.type
        element = None
        if kind.kind == _ARRAY:
            element = kind.name.removesuffix("[]")  # asyncpg's `int4[]`
        name = f"s.{_quoted(attribute.name)}"
        how = arrow_types.needs_text(kind.name, element)
        if how is not None:
            cast = True
            # The type's output function, as psql shows it: a cast to text may differ
            # (inet's adds the netmask). An array's text, read back as text[], keeps
            # each element's.
            if element is not None:
                value = f"{name}::text::text[]"
            else:
                value = f"CASE WHEN {name} IS NULL THEN NULL ELSE format('%s', {name}) END"
            name = f"{value} AS {_quoted(attribute.name)}"
        columns.append(name)
    if not cast:
        return select
    return f"SELECT {', '.join(columns)} FROM ({select}) AS s"


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _api_error(error: Exception) -> Exception:
    """The driver's errors as the export's (its others as they are)."""
    import adbc_driver_manager

    if isinstance(error, arrow_types.Unrepresentable):
        return ApiError(422, str(error))
    if not isinstance(error, adbc_driver_manager.Error):
        return error
    message = str(error).splitlines()[0] if str(error) else type(error).__name__
    code = getattr(error, "sqlstate", None)
    if code == "57014":
        return ApiError(504, f"the query was cancelled by the database: {message}")
    if isinstance(error, adbc_driver_manager.OperationalError) and code is None:
        return ApiError(503, f"the database is unavailable: {message}",
                        headers={"Retry-After": "5"})
    return ApiError(502, f"the database could not run the query: {message}")
