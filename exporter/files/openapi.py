"""The files route's inputs that FastAPI cannot see, declared for the OpenAPI schema."""

from __future__ import annotations

from typing import Any

from exporter.access.openapi import SIGNED_LINK
from exporter.openapi import header, query

FILES: dict[str, Any] = {"parameters": [
    query("limit", "a folder listing's page size", {"type": "integer", "minimum": 1}),
    query("offset", "a folder listing's first entry", {"type": "integer", "minimum": 0}),
    query("disposition", "attachment (the default) or inline",
          {"type": "string", "enum": ["attachment", "inline"]}),
    *SIGNED_LINK,
    header("Range", "bytes=first-last,..."),
    header("If-Range", "an entity tag or an HTTP date"),
    header("If-Match", "entity tags"),
    header("If-None-Match", "entity tags"),
    header("If-Modified-Since", "an HTTP date"),
    header("If-Unmodified-Since", "an HTTP date"),
]}
