"""Output formats of exports, as a small registry.

A renderer turns the SELECT of an export into the COPY statements whose output is
the response body (`header`, `body`, `rows`), or produces the body itself from the
export's Source (`produce`: Parquet and Arrow read typed record batches). A new format
is one new module here that calls `register`, and one import below.
"""

# Registered in the order the catalog and the page list the formats: the text ones first.
from exporter.exports.renderers import csv, json, ndjson, tsv, xlsx

# isort: split
from exporter.exports.renderers import arrow, parquet
from exporter.exports.renderers.base import (
           CopyStatement,
           Renderer,
           all_renderers,
           by_extension,
           by_media_type,
)

DEFAULT: Renderer = json.JSON  # what `Accept: */*` (or none) gets, as from PostgREST
TEXT_DEFAULT: Renderer = csv.CSV  # what `Accept: text/*` gets

__all__ = ["DEFAULT", "TEXT_DEFAULT", "CopyStatement", "Renderer", "all_renderers", "arrow",
           "by_extension", "by_media_type", "json", "ndjson", "parquet", "tsv", "xlsx"]
