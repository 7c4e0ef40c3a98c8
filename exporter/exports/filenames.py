"""The name an export's file is saved under (Content-Disposition, a stored export's
`filename`): the dataset, the snapshot time, and what tells two URLs of that dataset apart,
so that downloads started together (`curl --parallel -OJ`) never share a file."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

from exporter.exports.renderers import Renderer

# Hex digits of the query's hash in a name: one chance in four billion that two queries
# started in the same second share a name.
QUERY_DIGITS = 8


def filename(dataset: str, renderer: Renderer, at: datetime, query: str = "") -> str:
    """`orders-20261205T111843Z.csv` for the whole dataset (a URL without a query);
    `orders-20261205T111843Z-1a2b3c4d.csv` for a query, the digits those of
    `query_tag(query)`. `query` is the URL's canonical query (ExportRequest.query_string)."""
    stamp = f"{dataset}-{at.astimezone(UTC):%Y%m%dT%H%M%SZ}"
    if query:
        stamp += f"-{query_tag(query)}"
    return f"{stamp}.{renderer.extension}"


def query_tag(query: str) -> str:
    """The first hex digits of the SHA-256 of a canonical query's text."""
    return hashlib.sha256(query.encode()).hexdigest()[:QUERY_DIGITS]
