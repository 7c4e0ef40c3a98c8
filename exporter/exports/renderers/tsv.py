"""TSV: COPY's text format exactly as PostgreSQL writes it, after a header line.

The rows are `COPY (...) TO STDOUT` as psql's `\\copy` writes them: tab-separated, NULL
as `\\N`, backslash, tab, line breaks and the other control characters escaped with a
backslash. The header line holds the column names escaped the same way, which is what
`COPY ... TO STDOUT WITH (FORMAT text, HEADER)` writes (PostgreSQL 15 and later) and what
`COPY ... FROM ... WITH (FORMAT text, HEADER)` skips: `text/tab-separated-values` (IANA)
starts with the field names, and spreadsheets, pandas and DuckDB expect them.
"""

from __future__ import annotations

from dataclasses import dataclass

from exporter.exports.renderers.base import CopyStatement, Renderer, register

# COPY's text format escapes these bytes of a value (backslash first), names included:
# the byte's code, and what it becomes. (By code: PostgreSQL's E'' strings know no \v.)
_ESCAPES = [(92, "\\\\"), (8, "\\b"), (12, "\\f"), (10, "\\n"), (13, "\\r"), (9, "\\t"),
            (11, "\\v")]


def _escaped(expression: str) -> str:
    for code, escaped in _ESCAPES:
        literal = escaped.replace("\\", "\\\\")  # as an E'' string spells it
        expression = f"replace({expression}, chr({code}), E'{literal}')"
    return expression


# The header COPY writes its one value as it is (text format would escape the tabs
# between the names): CSV format quotes a value only for a line break, its quote or its
# delimiter, and these two are bytes the escaping above has removed from every name.
_ONE_VALUE = {"format": "csv", "quote": "\b", "delimiter": "\f"}


@dataclass(frozen=True)
class TsvRenderer(Renderer):
    def header(self, select: str) -> CopyStatement:
        # The names from the query itself, in order, duplicates kept (`json`, not
        # `jsonb`): one row of NULLs from an outer join that never matches, so the
        # query's rows are never read. COPY's own HEADER in text format needs
        # PostgreSQL 15; this works on every supported version.
        names = (
            "SELECT row_to_json(t) FROM (SELECT s.* FROM (SELECT 1) AS one"
            f" LEFT JOIN ({select}) AS s ON false) AS t"
        )
        line = (
            f"SELECT string_agg({_escaped('k.name')}, E'\\t' ORDER BY k.n)"
            f" FROM json_object_keys(({names})) WITH ORDINALITY AS k(name, n)"
        )
        return CopyStatement(line, _ONE_VALUE)

    def body(self, select: str) -> CopyStatement:
        return CopyStatement(select, {"format": "text"})


TSV = register(
    TsvRenderer("tsv", "tsv", "text/tab-separated-values",
                "text/tab-separated-values; charset=utf-8"),
)
