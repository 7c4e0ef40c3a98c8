"""NDJSON: one `row_to_json` object per line, as PostgreSQL writes it."""

from __future__ import annotations

from dataclasses import dataclass

from exporter.exports.renderers.base import Copy, Renderer, register


@dataclass(frozen=True)
class NdjsonRenderer(Renderer):
    def body(self, select: str) -> Copy:
        # COPY's text format would escape every backslash of the JSON. CSV format
        # writes a value untouched unless it holds the quote or delimiter byte or a
        # line break, and JSON text never holds \x01, \x02 or a raw newline.
        return Copy(
            f"SELECT row_to_json(s) FROM ({select}) AS s",
            {"format": "csv", "quote": "\x01", "delimiter": "\x02"},
        )


NDJSON = register(
    NdjsonRenderer("ndjson", "ndjson", "application/x-ndjson", "application/x-ndjson"),
    "application/ndjson",
    "application/jsonl",
)
