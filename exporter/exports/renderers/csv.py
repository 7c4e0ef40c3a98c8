"""CSV exactly as PostgreSQL's `COPY ... WITH (FORMAT csv, HEADER)` writes it."""

from __future__ import annotations

from dataclasses import dataclass

from exporter.exports.renderers.base import CopyStatement, Renderer, register


@dataclass(frozen=True)
class CsvRenderer(Renderer):
    def header(self, select: str) -> CopyStatement:
        # The header comes from its own empty COPY, so that the first bytes of the
        # body are the first row: until then the answer can still be an error.
        return CopyStatement(f"SELECT * FROM ({select}) AS s LIMIT 0",
                             {"format": "csv", "header": True})

    def body(self, select: str) -> CopyStatement:
        return CopyStatement(select, {"format": "csv"})


CSV = register(
    CsvRenderer("csv", "csv", "text/csv", "text/csv; charset=utf-8; header=present")
)
