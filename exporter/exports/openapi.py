"""The export's inputs that FastAPI cannot see, declared for the OpenAPI schema."""

from __future__ import annotations

from typing import Any

from exporter.access.openapi import SIGNED_LINK
from exporter.exports.operators import NAMES
from exporter.openapi import header, query

_COUNT = {"type": "integer", "minimum": 0, "maximum": 2**63 - 1}

_EXPORT_QUERY = [
    query("select", "columns, comma-separated: select=id,amount; * for all; alias:column,"
                    " column::type, column->key->>key"),
    query("order", "order=column[->key][.asc|.desc][.nullsfirst|.nullslast],..."),
    query("limit", "at most this many rows", _COUNT),
    query("offset", "skip this many rows", _COUNT),
    {
        "name": "filters", "in": "query", "required": False, "style": "form", "explode": True,
        "description": f"column=operator.value, operator one of {' '.join(NAMES)}, "
                       "optionally preceded by not.; or=(a.eq.1,b.gt.2), and=(...),"
                       " not.or=(...), not.and=(...) for logic trees",
        "schema": {"type": "object", "additionalProperties": {"type": "string"}},
    },
]

EXPORT: dict[str, Any] = {"parameters": [
    *_EXPORT_QUERY,
    query("since", "the Export-Cursor header of an earlier export of this table: only the"
          " rows inserted or updated since its snapshot (tables and materialized views)",
          {"type": "string", "maxLength": 1024}),
    *SIGNED_LINK,
    header("Accept", "text/csv, application/json (a JSON array), application/x-ndjson or "
                     "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet "
                     "(XLSX) when the name has no extension"),
    # PostgREST's pages and counts (exports/pages.py, docs/postgrest.md).
    header("Range", "rows first-last or first- (from 0), as PostgREST; or bytes=N- to "
                    "resume a download"),
    header("Range-Unit", "items (rows), the default, or bytes"),
    header("Prefer", "count=exact|planned|estimated (total in Content-Range), "
                     "respond-async (a stored export)"),
]}

DOWNLOADS: dict[str, Any] = {"parameters": _EXPORT_QUERY}
