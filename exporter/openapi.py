"""What the routes read by hand from the request, declared for the OpenAPI schema.

The routes take the Request and parse the query string and headers themselves (the
filter grammar has open-ended names), so FastAPI cannot see those inputs. Declaring
them here changes no behaviour: it documents the API and lets a schema-driven fuzzer
(tests/test_fuzz_api.py) reach the parsers behind them.
"""

from __future__ import annotations

from typing import Any

from exporter.access.links import BY, EXPIRES, SIGNATURE


def _query(name: str, description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": description,
            "schema": schema or {"type": "string"}}


def _header(name: str, description: str) -> dict[str, Any]:
    return {"name": name, "in": "header", "required": False, "description": description,
            "schema": {"type": "string"}}


_COUNT = {"type": "integer", "minimum": 0, "maximum": 2**63 - 1}

_SIGNED_LINK = [
    _query(EXPIRES, "a signed link's expiry, seconds since the epoch"),
    _query(BY, "a signed link's maker"),
    _query(SIGNATURE, "a signed link's signature"),
]

_EXPORT_QUERY = [
    _query("select", "columns, comma-separated: select=id,amount"),
    _query("order", "order=column[.asc|.desc][.nullsfirst|.nullslast],..."),
    _query("limit", "at most this many rows", _COUNT),
    _query("offset", "skip this many rows", _COUNT),
    {
        "name": "filters", "in": "query", "required": False, "style": "form", "explode": True,
        "description": "column=operator.value, operator one of eq neq gt gte lt lte like "
                       "ilike in is, optionally preceded by not.",
        "schema": {"type": "object", "additionalProperties": {"type": "string"}},
    },
]

EXPORT: dict[str, Any] = {"parameters": [
    *_EXPORT_QUERY, *_SIGNED_LINK,
    _header("Accept", "text/csv or application/x-ndjson when the name has no extension"),
]}

DOWNLOADS: dict[str, Any] = {"parameters": _EXPORT_QUERY}

FILES: dict[str, Any] = {"parameters": [
    _query("limit", "a folder listing's page size", {"type": "integer", "minimum": 1}),
    _query("offset", "a folder listing's first entry", {"type": "integer", "minimum": 0}),
    _query("disposition", "attachment (the default) or inline",
           {"type": "string", "enum": ["attachment", "inline"]}),
    *_SIGNED_LINK,
    _header("Range", "bytes=first-last,..."),
    _header("If-Range", "an entity tag or an HTTP date"),
    _header("If-Match", "entity tags"),
    _header("If-None-Match", "entity tags"),
    _header("If-Modified-Since", "an HTTP date"),
    _header("If-Unmodified-Since", "an HTTP date"),
]}

LINKS: dict[str, Any] = {"requestBody": {
    "required": True,
    "content": {"application/json": {"schema": {
        "type": "object",
        "required": ["url"],
        "properties": {
            "url": {"type": "string", "description": "a path on this server, with its query",
                    "example": "/datasets/orders.csv?id=gt.5"},
            "expires_in": {"type": "string", "description": "90s, 15m, 12h, 30d or 2w",
                           "example": "15m"},
        },
    }}},
}}
