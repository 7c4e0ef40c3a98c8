"""Access's inputs that FastAPI cannot see, declared for the OpenAPI schema."""

from __future__ import annotations

from typing import Any

from exporter.access.links import BY, EXPIRES, SIGNATURE
from exporter.openapi import query

# Accepted by every route that serves a download.
SIGNED_LINK = [
    query(EXPIRES, "a signed link's expiry, seconds since the epoch"),
    query(BY, "a signed link's maker"),
    query(SIGNATURE, "a signed link's signature"),
]

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
