"""What the /exports routes read by hand, declared for the OpenAPI schema."""

from __future__ import annotations

from typing import Any

from exporter.access.openapi import SIGNED_LINK
from exporter.openapi import header

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

STATUS: dict[str, Any] = {"responses": {
    "202": {"description": "running: progress (rows, bytes, estimated_rows, percent)"},
    "200": {"description": "complete: the manifest (rows, bytes, sha256, file_url, expires)"},
    "410": {"description": "failed or cancelled: the error says why"},
    "404": {"description": "no such export (or someone else's)"},
}}

FILE: dict[str, Any] = {"parameters": [
    *SIGNED_LINK,
    header("Range", "bytes=START-END, several ranges allowed"),
    header("If-Range", "the ETag: resume only the same file"),
]}
