"""A JSON array of `row_to_json` objects (PostgREST's default answer), streamed.

The rows come from NDJSON's COPY, one object per line; the array is made on the way:
`[` before the first row, json_agg's separator in place of each line break but the
last, `]` after it. The result is byte for byte what PostgreSQL's
`coalesce(json_agg(s), '[]')` writes for the same rows (`[{...}, \n {...}]`), without
ever holding more than a chunk. The closing `]` is written only when the COPY ran out,
so a failure mid-stream leaves an array that no JSON parser accepts.
"""

from __future__ import annotations

from dataclasses import dataclass

from exporter.exports.copy import Output
from exporter.exports.renderers.base import CopyStatement, Renderer, Rows, register
from exporter.exports.renderers.ndjson import NDJSON, QUOTE

# json_agg's own separator, so that the bytes equal what PostgreSQL aggregates.
SEPARATOR = b", \n "
# (QUOTE: a row that NDJSON's COPY quotes holds a `json` value with its own line breaks,
# which json_agg keeps, and so does the array.)


class ArrayRows(Rows):
    def __init__(self, prelude: Output, output: Output) -> None:
        super().__init__(prelude, output)
        self._row_ended = False  # a line break seen, not yet known to be the last
        self._quoted = False  # inside a quoted row (pieces split rows anywhere)

    async def begin(self) -> None:
        # With the first row (or the end): until then the answer can still be an error.
        await self.prelude(b"[")

    async def write(self, data: bytes) -> None:
        if not data:
            return
        if QUOTE in data or self._quoted:
            framed = self._unquoted(data)
        else:
            framed = data.replace(b"\n", SEPARATOR)
        if self._row_ended:
            framed = SEPARATOR + framed
        # The last line break of a piece may be the last of all: held back until more
        # comes. (A quoted row's own text ending so is held and given back the same way.)
        self._row_ended = not self._quoted and framed.endswith(SEPARATOR)
        if self._row_ended:
            framed = framed[: -len(SEPARATOR)]
        if framed:
            await self.output(framed)

    def _unquoted(self, data: bytes) -> bytes:
        """The quote bytes dropped; line breaks inside a quoted row kept as they are
        (json_agg keeps them), those between rows made separators."""
        parts = []
        quoted = self._quoted
        for i, part in enumerate(data.split(QUOTE)):
            if i:
                quoted = not quoted
            parts.append(part if quoted else part.replace(b"\n", SEPARATOR))
        self._quoted = quoted
        return b"".join(parts)

    async def end(self) -> None:
        await self.output(b"]")


@dataclass(frozen=True)
class JsonRenderer(Renderer):
    def body(self, select: str) -> CopyStatement:
        return NDJSON.body(select)

    def rows(self, prelude: Output, output: Output) -> Rows:
        return ArrayRows(prelude, output)


JSON = register(
    JsonRenderer("json", "json", "application/json", "application/json; charset=utf-8"),
)
