"""Unit tests of exporter/exports/filenames.py: the name an export's file is saved under.
(tests/test_exports.py saves eight exports at once with `curl --parallel -OJ`.)"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from exporter.exports import renderers
from exporter.exports.filenames import filename, query_tag

AT = datetime(2026, 12, 5, 11, 18, 43, 250_000, tzinfo=UTC)
CSV = renderers.by_extension("csv")
NDJSON = renderers.by_extension("ndjson")


def test_the_whole_dataset_is_named_by_dataset_and_snapshot_time() -> None:
    assert CSV is not None and NDJSON is not None
    assert filename("orders", CSV, AT) == "orders-20261205T111843Z.csv"
    assert filename("orders", NDJSON, AT, "") == "orders-20261205T111843Z.ndjson"
    # The time is the snapshot's in UTC, whatever zone it came in.
    paris = AT.astimezone(timezone(timedelta(hours=1)))
    assert filename("orders", CSV, paris) == "orders-20261205T111843Z.csv"


def test_a_query_adds_eight_hex_digits_of_its_sha256() -> None:
    assert CSV is not None
    # sha256(b"id=lt.20000&order=id") begins 7c8e7ce9...
    assert query_tag("id=lt.20000&order=id") == "7c8e7ce9"
    assert filename("orders", CSV, AT, "id=lt.20000&order=id") == \
        "orders-20261205T111843Z-7c8e7ce9.csv"
    # README's example.
    assert filename("orders", CSV, datetime(2026, 11, 24, 10, 15, tzinfo=UTC),
                    "paid=is.true") == "orders-20261124T101500Z-259be143.csv"


def test_eight_filters_started_in_one_second_get_eight_names() -> None:
    assert CSV is not None
    queries = [f"id=lt.{n}&order=id" for n in range(1, 9)]
    names = {filename("orders", CSV, AT + timedelta(milliseconds=n), q)
             for n, q in enumerate(queries)}
    assert len(names) == 8
    assert all(n.startswith("orders-20261205T111843Z-") and n.endswith(".csv") for n in names)
    # Another spelling of the same query is another URL: another name.
    assert filename("orders", CSV, AT, "order=id&id=lt.1") != \
        filename("orders", CSV, AT, "id=lt.1&order=id")
