"""What the /exports routes read by hand, declared for the OpenAPI schema."""

from __future__ import annotations

from typing import Any

from exporter.access.openapi import SIGNED_LINK
from exporter.openapi import header, query

START: dict[str, Any] = {
    "requestBody": {"required": True, "content": {"application/json": {"schema": {
        "type": "object", "required": ["url"],
        "properties": {
            "url": {"type": "string",
                    "description": "an export's path and query:"
                                   " /datasets/orders.csv.gz?amount=gt.5&order=id"},
            "coding": {"type": "string", "enum": ["gzip", "zstd"],
                       "description": "compress the stored file"},
        }}}}},
}

LISTING: dict[str, Any] = {"parameters": [
    query("limit", "at most this many, newest first (1 to 1000, default 100)",
          {"type": "integer", "minimum": 1, "maximum": 1000}),
    query("kind", "async: prepared exports only; copy: the copies streamed exports keep"
          " for resuming (kind streamed in the answer); absent: both",
          {"type": "string", "enum": ["async", "copy", "streamed"]}),
]}
STATUS: dict[str, Any] = {"responses": {
    "202": {"description": "running: progress (rows, bytes, estimated_rows, percent)"},
    "200": {"description": "complete: the manifest (rows, bytes, sha256, file_url, expires)"},
    "410": {"description": "failed or cancelled: the error says why"},
    "404": {"description": "no such export, someone else's, or one of a dataset the caller"
                           " may no longer read"},
}}

FILE: dict[str, Any] = {"parameters": [
    *SIGNED_LINK,
    header("Range", "bytes=START-END, several ranges allowed"),
    header("If-Range", "the ETag: resume only the same file"),
]}
