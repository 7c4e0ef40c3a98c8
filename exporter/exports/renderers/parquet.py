"""Apache Parquet: the export's record batches (exports/arrow_source.py, in the types of
exports/arrow_types.py) in row groups of at most EXPORTER_PARQUET_ROW_GROUP_BYTES,
compressed with EXPORTER_PARQUET_COMPRESSION (zstd), streamed as each group is written;
the footer, which readers need to find the groups, goes last. Encoding runs in a worker
thread. A Parquet file without its footer is unreadable, so an export that fails midway
can never pass for a whole one.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from exporter.exports.copy import Output
from exporter.exports.renderers.arrow import Sink, send
from exporter.exports.renderers.base import Renderer, Source, register


def _write_group(writer: Any, batches: list[Any]) -> None:
    import pyarrow

    table = pyarrow.Table.from_batches(batches)
    writer.write_table(table, row_group_size=max(table.num_rows, 1))


@dataclass(frozen=True)
class ParquetRenderer(Renderer):
    # Compressed inside: an HTTP content coding on top would cost CPU for nothing.
    compressed: bool = True
    reads_arrow: bool = True
    rows_by_line: bool = False

    async def produce(self, source: Source, select: str, prelude: Output,
                      output: Output) -> int | None:
        import pyarrow.parquet  # a heavy import, only when one runs

        settings = source.settings
        codec = settings.parquet_compression
        rows = 0
        async with source.arrow(select) as reader:
            sink = Sink()
            writer = pyarrow.parquet.ParquetWriter(
                sink, reader.schema, compression=codec if codec != "none" else None)
            await prelude(sink.take())  # the magic bytes, with the first row
            pending: list[Any] = []
            size = 0
            while (batch := await reader.next()) is not None:
                if rows == 0:
                    await output(b"")  # the first row is there: the answer is a 200
                rows += batch.num_rows
                pending.append(batch)
                size += batch.nbytes
                if size >= settings.parquet_row_group_bytes:
                    await asyncio.to_thread(_write_group, writer, pending)
                    await send(output, sink.take())
                    pending, size = [], 0
            if pending:
                await asyncio.to_thread(_write_group, writer, pending)
            await asyncio.to_thread(writer.close)  # the footer
            await send(output, sink.take())
        return rows


PARQUET = register(
    ParquetRenderer("parquet", "parquet", "application/vnd.apache.parquet",
                    "application/vnd.apache.parquet"),
)
