"""A JSON array of `row_to_json` objects (PostgREST's default answer), streamed.

The rows come from the same COPY as NDJSON's, one object per line; the array is made
on the way: `[` before the first row, the separator in place of each line break but
the last, `]` after it. The result is byte for byte what PostgreSQL's
`coalesce(json_agg(s), '[]')` writes for the same rows (`[{...}, \\n {...}]`), without
ever holding more than a chunk. The closing `]` is written only when the COPY ran out,
so a failure mid-stream leaves an array that no JSON parser accepts.
"""

from __future__ import annotations

from dataclasses import dataclass

from exporter.exports.renderers.base import Copy, Output, Renderer, Rows, register

# json_agg's own separator, so that the bytes equal what PostgreSQL aggregates.
SEPARATOR = b", \n "


class ArrayRows(Rows):
    def __init__(self, prelude: Output, output: Output) -> None:
        super().__init__(prelude, output)
        self._row_ended = False  # a line break seen, not yet known to be the last

    async def begin(self) -> None:
        # With the first row (or the end): until then the answer can still be an error.
        await self.prelude(b"[")

    async def write(self, data: bytes) -> None:
        if not data:
            return
        framed = data.replace(b"\n", SEPARATOR)
        if self._row_ended:
            framed = SEPARATOR + framed
        # The last line break of a piece may be the last of all: held back until more comes.
        self._row_ended = framed.endswith(SEPARATOR)
        if self._row_ended:
            framed = framed[: -len(SEPARATOR)]
        if framed:
            await self.output(framed)

    async def end(self) -> None:
        await self.output(b"]")


@dataclass(frozen=True)
class JsonRenderer(Renderer):
    def body(self, select: str) -> Copy:
        # As NDJSON (see there for the COPY options). A raw line break in JSON text can
        # only be whitespace (in strings it is escaped), and only a `json` value keeps its
        # own: made a space, so that each row stays one line and the CSV format never
        # quotes it.
        return Copy(
            f"SELECT translate(row_to_json(s)::text, E'\\n\\r', '  ') FROM ({select}) AS s",
            {"format": "csv", "quote": "\x01", "delimiter": "\x02"},
        )

    def rows(self, prelude: Output, output: Output) -> Rows:
        return ArrayRows(prelude, output)


JSON = register(
    JsonRenderer("json", "json", "application/json", "application/json; charset=utf-8"),
)
