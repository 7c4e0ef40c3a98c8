"""The renderer type and the registry of formats (what a renderer is: the package's
docstring)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

from exporter.config import Settings
from exporter.export_names import register_format
from exporter.exports.copy import Output
from exporter.exports.query import ExportQuery


@dataclass(frozen=True)
class CopyStatement:
    """`COPY (query) TO STDOUT WITH (options)`, as asyncpg's copy_from_query takes it."""

    query: str
    options: dict[str, Any] = field(default_factory=dict)


class Source(Protocol):
    """Where an export's rows come from, inside its snapshot (exports/export.py)."""

    async def copy(self, statement: CopyStatement, output: Output) -> str:
        """Run a COPY into `output`; its status (`COPY 42`)."""

    def arrow(self, select: str) -> AbstractAsyncContextManager[Any]:
        """The rows of `select` as Arrow (exports/arrow_source.py's ArrowReader: its
        `schema`, then `await reader.next()` for each record batch, None at the end)."""

    async def copy_rows(self, body: Callable[[str], CopyStatement], select: str,
                        output: Output) -> int | None:
        """The COPY of `body(select)` into `output` (read in ranges, in their order, when
        the export is parallel: exports/parallel.py); how many rows it wrote."""

    @property
    def settings(self) -> Settings:
        """The server's settings (a format's own: EXPORTER_PARQUET_*)."""


def copied_rows(status: str) -> int | None:
    """The row count of a COPY's status."""
    return int(status.split()[-1]) if status.startswith("COPY") else None


@dataclass(frozen=True)
class Renderer:
    name: str
    extension: str  # the suffix of `/datasets/{name}.{extension}`
    media_type: str  # what `Accept` asks for
    content_type: str  # what the response says
    # Compressed inside (Parquet, XLSX: a ZIP): no content coding is negotiated on top
    # of it, and the catalog lists no compressed files of it.
    compressed: bool = False
    # Its rows are read through `Source.arrow`, on a connection of their own in the
    # export's snapshot: its SELECT may not depend on the export's own transaction.
    reads_arrow: bool = False
    # Each row ends with a line break (CSV, JSON, TSV...): a stored export counts its rows
    # as they go by; of a binary format only the COPY's final count is known.
    rows_by_line: bool = True
    # Its body may be read in ctid ranges at once (exports/parallel.py): a COPY whose
    # output is made in order of the rows, whatever reads them.
    splits: bool = True

    def for_query(self, query: ExportQuery) -> Renderer:
        """The renderer of one export: a format that types its cells by the result's
        columns (query.result_columns()) returns one that knows them."""
        return self

    def header(self, select: str) -> CopyStatement | None:
        """A COPY whose output goes before the rows (sent even when there are none)."""
        return None

    def body(self, select: str) -> CopyStatement:
        raise NotImplementedError

    def rows(self, prelude: Output, output: Output) -> Rows:
        """Where the body COPY's output goes on its way to the response (`prelude`
        waits for the first row, as the header's output does)."""
        return Rows(prelude, output)

    async def produce(self, source: Source, select: str, prelude: Output,
                      output: Output) -> int | None:
        """Write the export of `select` (how many rows, once all are written). Most
        formats are COPY output (`header`, `body`, `rows`); a format built from typed
        values (Arrow) reads `source.arrow` instead."""
        header = self.header(select)
        rows = self.rows(prelude, output)
        await rows.begin()
        if header is not None:
            await source.copy(header, prelude)
        count = await source.copy_rows(self.body, select, rows.write)
        await rows.end()  # not after a failure: the body ends broken
        return count


class Rows:
    """The body COPY's output, as it is; a format that frames its rows (a JSON array)
    changes it on the way. `end` is called only when the COPY ran out: after a failure
    the body stops where it was, without its ending."""

    def __init__(self, prelude: Output, output: Output) -> None:
        self.prelude = prelude
        self.output = output

    async def begin(self) -> None:
        pass

    async def write(self, data: bytes) -> None:
        await self.output(data)

    async def end(self) -> None:
        pass


_by_extension: dict[str, Renderer] = {}
_by_media_type: dict[str, Renderer] = {}


def register(renderer: Renderer, *aliases: str) -> Renderer:
    _by_extension[renderer.extension] = renderer
    register_format(renderer.extension)
    for media_type in (renderer.media_type, *aliases):
        _by_media_type[media_type] = renderer
    return renderer


def by_extension(extension: str) -> Renderer | None:
    return _by_extension.get(extension)


def by_media_type(media_type: str) -> Renderer | None:
    return _by_media_type.get(media_type)


def all_renderers() -> list[Renderer]:
    return list(_by_extension.values())
