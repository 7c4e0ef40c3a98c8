"""The one grammar of an export's name, `dataset[.format][.coding]`, as the export routes,
stored exports, scopes and signed links read it (exporter/export_names.py)."""

from __future__ import annotations

import pytest

import exporter.exports.renderers  # noqa: F401  (the formats register their extensions)
from exporter.compression import GZIP, ZSTD
from exporter.export_names import ExportName, coding_hint, dataset_names, readings


@pytest.mark.parametrize(("name", "expected"), [
    ("orders", (ExportName("orders"),)),
    ("orders.csv", (ExportName("orders", "csv"), ExportName("orders.csv"))),
    ("orders.csv.gz", (ExportName("orders", "csv", GZIP), ExportName("orders.csv.gz"))),
    ("orders.ndjson.zst", (ExportName("orders", "ndjson", ZSTD),
                           ExportName("orders.ndjson.zst"))),
    ("x.csv.csv", (ExportName("x.csv", "csv"), ExportName("x.csv.csv"))),
    # A coding counts only after a format; an unknown suffix is part of the name.
    ("orders.gz", (ExportName("orders.gz"),)),
    ("orders.xyz", (ExportName("orders.xyz"),)),
    ("orders.xyz.gz", (ExportName("orders.xyz.gz"),)),
    ("orders.csv.gz.csv", (ExportName("orders.csv.gz", "csv"),
                           ExportName("orders.csv.gz.csv"))),
    (".csv", (ExportName(".csv"),)),
    ("orders.", (ExportName("orders."),)),
])
def test_readings(name: str, expected: tuple[ExportName, ...]) -> None:
    assert readings(name) == expected


def test_scopes_and_links_read_names_as_the_exports_do() -> None:
    assert dataset_names("orders.csv.gz") == ["orders", "orders.csv.gz"]
    assert dataset_names("orders.gz") == ["orders.gz"]
    assert ExportName("orders", "csv", GZIP).suffix == ".csv.gz"
    assert ExportName("orders").suffix == ""


def test_a_coding_without_a_format_is_hinted() -> None:
    assert "orders.csv.gz" in coding_hint("orders.gz")
    assert coding_hint("orders.csv.gz") == ""
    assert coding_hint("orders") == ""
