"""NDJSON: one `row_to_json` object per line, as PostgreSQL writes it."""

from __future__ import annotations

from dataclasses import dataclass

from exporter.exports.copy import Output
from exporter.exports.renderers.base import CopyStatement, Renderer, Rows, register

# The COPY's quote byte. JSON text holds a raw line break only as whitespace, and only
# inside a `json` value kept as it was typed; CSV format then wraps that row in this
# byte. JSON text never holds the byte itself (control characters are escaped in
# strings), so it only ever opens and closes such a row.
QUOTE = b"\x01"


class LineRows(Rows):
    """One object per line, always: a quoted row loses its quotes, and its line
    breaks (whitespace, in JSON) become spaces."""

    def __init__(self, prelude: Output, output: Output) -> None:
        super().__init__(prelude, output)
        self._quoted = False  # inside a quoted row (pieces split rows anywhere)

    async def write(self, data: bytes) -> None:
        if QUOTE not in data and not self._quoted:
            await self.output(data)
            return
        parts = []
        quoted = self._quoted
        for i, part in enumerate(data.split(QUOTE)):
            if i:
                quoted = not quoted
            parts.append(part.replace(b"\n", b" ").replace(b"\r", b" ") if quoted else part)
        self._quoted = quoted
        if joined := b"".join(parts):
            await self.output(joined)


@dataclass(frozen=True)
class NdjsonRenderer(Renderer):
    def body(self, select: str) -> CopyStatement:
        # COPY's text format would escape every backslash of the JSON. CSV format
        # writes a value untouched unless it holds the quote or delimiter byte or a
        # line break, and JSON text never holds \x01, \x02 or a raw newline.
        return CopyStatement(
            f"SELECT row_to_json(s) FROM ({select}) AS s",
            {"format": "csv", "quote": "\x01", "delimiter": "\x02"},
        )

    def rows(self, prelude: Output, output: Output) -> Rows:
        return LineRows(prelude, output)


NDJSON = register(
    NdjsonRenderer("ndjson", "ndjson", "application/x-ndjson", "application/x-ndjson"),
    "application/ndjson",
    "application/jsonl",
)
