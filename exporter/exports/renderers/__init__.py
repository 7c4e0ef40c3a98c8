"""Output formats of exports, as a small registry.

A renderer turns the SELECT of an export into the COPY statements whose output is
the response body. A new format is one new module here that calls `register`, and
one import below.
"""

from exporter.exports.renderers import csv, json, ndjson, xlsx
from exporter.exports.renderers.base import (
           CopyStatement,
           Renderer,
           all_renderers,
           by_extension,
           by_media_type,
)

DEFAULT: Renderer = csv.CSV  # what `Accept: */*` gets

__all__ = ["DEFAULT", "CopyStatement", "Renderer", "all_renderers", "by_extension", "by_media_type",
           "json", "ndjson", "xlsx"]
