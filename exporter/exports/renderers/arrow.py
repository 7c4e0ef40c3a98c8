"""Apache Arrow's IPC stream format: the export's record batches as they are read, the
first one before the query ends (docs/api.md, "Parquet and Arrow").

The rows come through the ADBC driver in the export's snapshot (exports/arrow_source.py),
in the types of exports/arrow_types.py. Serialising a batch runs in a worker thread, so
the event loop only moves bytes. The stream ends with Arrow's end-of-stream marker; an
export that fails midway is cut before it (and without HTTP's last chunk), so a reader
sees a broken stream, never a short whole one.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from exporter.exports.copy import Output
from exporter.exports.renderers.base import Renderer, Source, register

# The pieces a serialised batch goes out in: the stream's queue bounds them.
PIECE = 256 * 1024


class Sink:
    """A file for pyarrow's writers, emptied by `take` after each write."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._position = 0
        self.closed = False

    def write(self, data: Any) -> int:
        piece = bytes(data)
        self._parts.append(piece)
        self._position += len(piece)
        return len(piece)

    def tell(self) -> int:
        return self._position

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def take(self) -> bytes:
        data = b"".join(self._parts)
        self._parts.clear()
        return data


async def send(output: Output, data: bytes) -> None:
    for start in range(0, len(data), PIECE):
        await output(data[start:start + PIECE])


@dataclass(frozen=True)
class ArrowRenderer(Renderer):
    reads_arrow: bool = True
    rows_by_line: bool = False

    async def produce(self, source: Source, select: str, prelude: Output,
                      output: Output) -> int | None:
        import pyarrow  # a heavy import, only when an Arrow export runs

        rows = 0
        async with source.arrow(select) as reader:
            sink = Sink()
            writer = pyarrow.ipc.new_stream(sink, reader.schema)
            # The schema waits for the first batch: until then the answer can still be
            # an error.
            await prelude(sink.take())
            while (batch := await reader.next()) is not None:
                rows += batch.num_rows
                await asyncio.to_thread(writer.write_batch, batch)
                await send(output, sink.take())
            writer.close()  # the end-of-stream marker
            await send(output, sink.take())
        return rows


ARROW = register(
    ArrowRenderer("arrow", "arrow", "application/vnd.apache.arrow.stream",
                  "application/vnd.apache.arrow.stream"),
)
