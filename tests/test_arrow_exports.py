"""`.parquet` and `.arrow` exports read from a signed link by pyarrow, polars and DuckDB, as
a user would: the values equal what psql gives for the same query, every type of the
table included (docs/api.md, "Parquet and Arrow")."""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import pathlib
import shutil
import subprocess
import tempfile
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from exporter.db import libpq_url
from exporter.embedded import psql_path
from tests.support import Server, fetch, run_sql, wait_until
from tests.test_access import bearer, make_link, new_token
from tests.test_stored_exports import finished

TABLE = "arrow_types"
# Every type the issue names, NULLs, non-ASCII text, text that a spreadsheet would run.
COLUMNS = """
    id int PRIMARY KEY, small smallint, big bigint, single real, double double precision,
    amount numeric(12,2), wide numeric(60,10), free numeric, at timestamptz,
    local timestamp, day date, clock time, span interval, key uuid, doc json, docb jsonb,
    ints int[], texts text[], blob bytea, ok boolean, note text, address inet"""
ROWS = """
    (1, 1, 9007199254740993, 1.5, 0.1, 1234567890.12, 12345678901234567890123456789.0123456789,
     0.1000000000000000000001, '2026-12-05 11:19:00.123456+00', '2026-12-05 11:19:00.5',
     '2026-02-28', '23:59:59.999999', '1 year 2 mons 3 days 04:05:06.789012', gen_random_uuid(),
     '{"b": 1,  "a": [1, 2]}', '{"b": 1, "a": "Zoë"}', ARRAY[1, NULL, 3],
     ARRAY['a', NULL, 'with, comma', 'quote"d', ''], '\\x00ff10', true, 'Zoë Müller 李雷 🚀',
     '10.0.0.1/8'),
    (2, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
     NULL, NULL, NULL, NULL, NULL, NULL, NULL),
    (3, -32768, -9223372036854775808, 'NaN', '-Infinity', -0.01, 0, 'NaN',
     '1970-01-01 00:00:00+00', '0001-01-01 00:00:00', '9999-12-31', '00:00:00',
     '-1 mons -2 days -00:00:00.000001', '00000000-0000-0000-0000-000000000000',
     '"=1+2"', '[]', ARRAY[]::int[], ARRAY[]::text[], '\\x', false, '=SUM(A1:A2)', '::1'),
    (4, 0, 0, 0, 0, 0, 0, '-Infinity', '2026-06-01 12:00:00+02', '2026-06-01 12:00:00',
     '2026-06-01', '12:00:00', '0', gen_random_uuid(), 'null', 'null', ARRAY[2147483647],
     ARRAY['line
break', 'tab	here'], '\\xdeadbeef', NULL, '', NULL)"""
# psql's text for the comparison: each column as text a test can read back exactly.
PSQL_SELECT = """
    SELECT id, small, big, single, double, amount, wide, free, at, local, day, clock,
           (extract(year FROM span) * 12 + extract(month FROM span))::int AS span_months,
           extract(day FROM span)::int AS span_days,
           (extract(epoch FROM span - date_trunc('day', span)) * 1000000)::bigint
               AS span_micros,
           key, doc, docb, array_to_json(ints) AS ints, array_to_json(texts) AS texts,
           blob, ok, note, address
    FROM exports.arrow_types"""
PSQL_ENV = {"PGTZ": "UTC", "PGDATESTYLE": "ISO, YMD", "PGCLIENTENCODING": "UTF8"}


@pytest.fixture(scope="module")
def table(database_url: str) -> None:
    run_sql(database_url, f"DROP TABLE IF EXISTS exports.{TABLE}",
            f"CREATE TABLE exports.{TABLE} ({COLUMNS})",
            f"INSERT INTO exports.{TABLE} VALUES {ROWS}")


@pytest.fixture(scope="module")
def token(database_url: str) -> str:
    return new_token(database_url, f"arrow-{os.urandom(3).hex()}", "datasets:*")


@pytest.fixture(scope="module")
def duckdb_connection() -> Iterator[Any]:
    """DuckDB with its httpfs extension, loaded from the wheel of its exact version (no
    network: DuckDB would otherwise download it)."""
    import duckdb
    import duckdb_extension_httpfs

    folder = pathlib.Path(tempfile.mkdtemp())
    found = next(pathlib.Path(duckdb_extension_httpfs.__file__).parent.glob(
        "extensions/*/httpfs.duckdb_extension"))
    shutil.copy(found, folder / "httpfs.duckdb_extension")
    connection = duckdb.connect()
    connection.sql(f"LOAD '{folder / 'httpfs.duckdb_extension'}'")
    # An export URL streams (no length, no ranges): DuckDB reads it whole, as docs/api.md
    # says (without it DuckDB asks ranges and fails with "Server sent back more data
    # than expected"). A stored export's file URL needs no such thing: see below.
    connection.sql("SET force_download = true")
    try:
        yield connection
    finally:
        connection.close()
        shutil.rmtree(folder)


def psql_rows(database_url: str, where: str = "ORDER BY id") -> list[dict[str, str | None]]:
    """The rows as psql prints them (CSV, NULL as an unquoted empty field)."""
    import csv

    out = subprocess.run(
        [str(psql_path()), "-X", "-q", "-v", "ON_ERROR_STOP=1", libpq_url(database_url), "-c",
         f"\\copy ({PSQL_SELECT} {where}) TO STDOUT WITH (FORMAT csv, HEADER, FORCE_QUOTE *)"],
        env={**os.environ, **PSQL_ENV}, stdout=subprocess.PIPE, check=True).stdout
    reader = csv.reader(io.StringIO(out.decode(), newline=""))
    header = next(reader)
    # FORCE_QUOTE: a quoted empty field is '', an unquoted one NULL; csv drops the quotes,
    # so the raw text tells them apart by the column count of `""` fields.
    rows = []
    raw_lines = _csv_records(out.decode())
    for record, raw in zip(reader, raw_lines[1:], strict=True):
        row: dict[str, str | None] = {}
        for name, value, field in zip(header, record, raw, strict=True):
            row[name] = None if field == "" else value
        rows.append(row)
    return rows


def _csv_records(text: str) -> list[list[str]]:
    """Each record's fields as written (quotes kept), to tell NULL from ''."""
    records: list[list[str]] = []
    fields: list[str] = []
    field = ""
    quoted = False
    i = 0
    while i < len(text):
        c = text[i]
        if quoted:
            field += c
            if c == '"':
                if text[i + 1:i + 2] == '"':
                    field += '"'
                    i += 1
                else:
                    quoted = False
        elif c == '"':
            quoted = True
            field += c
        elif c == ",":
            fields.append(field)
            field = ""
        elif c == "\n":
            fields.append(field)
            records.append(fields)
            fields, field = [], ""
        else:
            field += c
        i += 1
    return records


def _float(text: str) -> float:
    return float({"Infinity": "inf", "-Infinity": "-inf"}.get(text, text))


def expected(row: dict[str, str | None]) -> dict[str, Any]:
    """psql's text as the Python values the Arrow columns hold."""
    def of(name: str, convert: Callable[[str], Any]) -> Any:
        value = row[name]
        return None if value is None else convert(value)

    def numeric(name: str, decimal: bool) -> Any:
        value = row[name]
        if value is None or not decimal:
            return value  # unconstrained or too wide: PostgreSQL's own text
        return Decimal(value)

    span = None
    if row["span_months"] is not None:
        span = {"months": int(row["span_months"]), "days": int(row["span_days"] or 0),
                "microseconds": int(row["span_micros"] or 0)}
    return {
        "id": of("id", int), "small": of("small", int), "big": of("big", int),
        "single": of("single", _float), "double": of("double", _float),
        "amount": numeric("amount", True), "wide": numeric("wide", False),
        "free": numeric("free", False),
        "at": of("at", dt.datetime.fromisoformat),
        "local": of("local", dt.datetime.fromisoformat),
        "day": of("day", dt.date.fromisoformat), "clock": of("clock", dt.time.fromisoformat),
        "span": span, "key": of("key", uuid.UUID), "doc": row["doc"], "docb": row["docb"],
        "ints": of("ints", json.loads), "texts": of("texts", json.loads),
        "blob": of("blob", lambda v: bytes.fromhex(v[2:])),
        "ok": of("ok", lambda v: v == "t"), "note": row["note"], "address": row["address"],
    }


def same(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        for name, value in w.items():
            have = g[name]
            if isinstance(value, float) and value != value:  # NaN
                assert have != have, name
            elif isinstance(value, dt.datetime) and value.tzinfo is not None:
                assert have == value and have.utcoffset() == dt.timedelta(0), name
            elif name == "key" and isinstance(have, bytes):
                assert uuid.UUID(bytes=have) == value, name  # polars: uuid as 16 bytes
            else:
                assert have == value, (name, have, value)


def signed(server: Server, token: str, path: str) -> str:
    return make_link(server, token, path)


def arrow_table(url: str, extension: str) -> pa.Table:
    """pyarrow, as a user would: the body from the URL, then the reader."""
    with urllib.request.urlopen(url, timeout=60) as response:
        assert response.status == 200
        data = response.read()
    if extension == "parquet":
        return pq.read_table(io.BytesIO(data))
    return pa.ipc.open_stream(data).read_all()


# --- The types, through three readers ---------------------------------------------------


@pytest.mark.parametrize("extension", ["parquet", "arrow"])
def test_pyarrow_reads_every_type_as_psql_gives_it(server: Server, database_url: str,
                                                   table: None, token: str,
                                                   extension: str) -> None:
    link = signed(server, token, f"/datasets/{TABLE}.{extension}?order=id")
    got = arrow_table(link, extension)
    types = {f.name: f.type for f in got.schema}
    assert types["amount"] == pa.decimal128(12, 2)
    assert types["wide"] == pa.string() and types["free"] == pa.string()  # documented
    assert types["at"] == pa.timestamp("us", "UTC") and types["local"] == pa.timestamp("us")
    assert types["day"] == pa.date32() and types["clock"] == pa.time64("us")
    assert types["span"] == pa.struct([("months", pa.int32()), ("days", pa.int32()),
                                       ("microseconds", pa.int64())])
    assert types["key"].extension_name == "arrow.uuid"
    assert types["doc"].extension_name == "arrow.json"
    assert types["ints"] == pa.list_(pa.int32()) or types["ints"].value_type == pa.int32()
    assert types["blob"] == pa.binary() and types["ok"] == pa.bool_()
    assert types["big"] == pa.int64() and types["single"] == pa.float32()
    assert types["address"] == pa.string()  # read as its text
    rows = got.to_pylist()
    for row in rows:  # the uuid extension reads as uuid.UUID
        row["key"] = row["key"] if row["key"] is None else uuid.UUID(str(row["key"]))
    same(rows, [expected(r) for r in psql_rows(database_url)])


def test_polars_reads_both_from_the_link(server: Server, database_url: str, table: None,
                                         token: str) -> None:
    import polars as pl

    want = [expected(r) for r in psql_rows(database_url)]
    # A streamed export has no length and serves no ranges, which polars' URL reader
    # needs: the body is read first (a stored export's file URL is read directly, below).
    with urllib.request.urlopen(signed(server, token, f"/datasets/{TABLE}.parquet?order=id"),
                                timeout=60) as response:
        parquet = pl.read_parquet(response.read())
    with urllib.request.urlopen(signed(server, token, f"/datasets/{TABLE}.arrow?order=id"),
                                timeout=60) as response:
        stream = pl.read_ipc_stream(response.read())
    for frame in (parquet, stream):
        assert frame.schema["amount"] == pl.Decimal(12, 2)
        assert frame.schema["at"] == pl.Datetime("us", "UTC")
        rows = frame.to_dicts()
        for row in rows:
            row["doc"] = row["doc"] if row["doc"] is None else str(row["doc"])
            row["docb"] = row["docb"] if row["docb"] is None else str(row["docb"])
        same(rows, want)


def test_duckdb_reads_both_from_the_link(server: Server, database_url: str, table: None,
                                         token: str, duckdb_connection: Any) -> None:
    want = [expected(r) for r in psql_rows(database_url)]
    link = signed(server, token, f"/datasets/{TABLE}.parquet?order=id")
    parquet = duckdb_connection.sql(f"SELECT * FROM read_parquet('{link}') ORDER BY id")
    kinds = dict(zip(parquet.columns, (str(t) for t in parquet.types), strict=True))
    assert kinds["amount"] == "DECIMAL(12,2)" and kinds["key"] == "UUID"
    assert kinds["at"] == "TIMESTAMP WITH TIME ZONE" and kinds["docb"] == "JSON"
    assert kinds["ints"] == "INTEGER[]" and kinds["blob"] == "BLOB"
    with urllib.request.urlopen(signed(server, token, f"/datasets/{TABLE}.arrow?order=id"),
                                timeout=60) as response:
        stream = pa.ipc.open_stream(response.read())
    arrow = duckdb_connection.from_arrow(stream).order("id")
    for relation in (parquet, arrow):
        names = relation.columns
        rows = [dict(zip(names, values, strict=True)) for values in relation.fetchall()]
        for row in rows:
            if row["at"] is not None:
                row["at"] = row["at"].astimezone(dt.UTC)
            row["span"] = row["span"] if row["span"] is None else dict(row["span"])
        same(rows, want)


# --- The export road, as for CSV ----------------------------------------------------------


@pytest.mark.parametrize("extension", ["parquet", "arrow"])
def test_filters_select_order_and_an_empty_result(server: Server, database_url: str,
                                                  table: None, token: str,
                                                  extension: str) -> None:
    got = arrow_table(signed(server, token, f"/datasets/{TABLE}.{extension}"
                             "?select=id,note,amount&id=in.(1,3,4)&order=id.desc"), extension)
    assert got.column_names == ["id", "note", "amount"]
    assert got.to_pylist() == [
        {"id": 4, "note": "", "amount": Decimal("0.00")},
        {"id": 3, "note": "=SUM(A1:A2)", "amount": Decimal("-0.01")},
        {"id": 1, "note": "Zoë Müller 李雷 🚀", "amount": Decimal("1234567890.12")},
    ]
    empty = arrow_table(signed(server, token, f"/datasets/{TABLE}.{extension}?id=lt.0"),
                        extension)
    assert empty.num_rows == 0 and empty.column_names[:3] == ["id", "small", "big"]
    assert empty.schema.field("amount").type == pa.decimal128(12, 2)


@pytest.mark.parametrize(("extension", "media_type"), [
    ("parquet", "application/vnd.apache.parquet"),
    ("arrow", "application/vnd.apache.arrow.stream"),
])
def test_accept_negotiation_headers_and_catalog(server: Server, table: None, token: str,
                                               extension: str, media_type: str) -> None:
    r = httpx.get(f"{server.url}/datasets/{TABLE}?order=id",
                  headers={**bearer(token), "Accept": media_type,
                           "Accept-Encoding": "gzip"}, timeout=60)
    assert r.status_code == 200
    assert r.headers["content-type"] == media_type
    assert f".{extension}" in r.headers["content-disposition"]
    # Parquet is compressed inside: no content coding on top of it.
    assert ("content-encoding" in r.headers) is (extension == "arrow")
    assert arrow_table_of(r.content, extension).num_rows == 4
    listing = httpx.get(f"{server.url}/datasets", headers=bearer(token), timeout=60).json()
    mine = next(d for d in listing["datasets"] if d["name"] == TABLE)
    assert mine["exports"][extension] == f"{server.url}/datasets/{TABLE}.{extension}"


def arrow_table_of(data: bytes, extension: str) -> pa.Table:
    if extension == "parquet":
        return pq.read_table(io.BytesIO(data))
    return pa.ipc.open_stream(data).read_all()


def test_a_stored_parquet_export(server: Server, table: None, token: str,
                                 duckdb_connection: Any) -> None:
    m = finished(server, token, f"/datasets/{TABLE}.parquet?order=id")
    assert m["format"] == "parquet" and m["filename"].endswith(".parquet") and m["rows"] == 4
    body = httpx.get(m["file_url"], headers=bearer(token), timeout=30)
    assert body.status_code == 200
    assert body.headers["content-type"] == "application/vnd.apache.parquet"
    got = pq.read_table(io.BytesIO(body.content))
    assert got.column("id").to_pylist() == [1, 2, 3, 4]
    assert got.schema.field("amount").type == pa.decimal128(12, 2)
    # The file URL has a length and ranges: polars and DuckDB read it from a signed link.
    import polars as pl

    link = signed(server, token, m["file_url"].removeprefix(server.url))
    assert pl.read_parquet(link)["id"].to_list() == [1, 2, 3, 4]
    # DuckDB as it comes: a HEAD for the length, then ranges of the file.
    duckdb_connection.sql("SET force_download = false")
    try:
        total = duckdb_connection.sql(f"SELECT sum(id) FROM read_parquet('{link}')").fetchone()
    finally:
        duckdb_connection.sql("SET force_download = true")
    assert total == (10,)


def test_a_cut_arrow_stream_looks_broken(server: Server, database_url: str,
                                         token: str) -> None:
    """The first record batch arrives while the query runs; then the database fails
    mid-stream: the body stops without its last chunk, and what arrived is no whole Arrow
    stream."""
    # (generate_series in the select list streams; in FROM it is materialised first.)
    run_sql(database_url, "CREATE OR REPLACE VIEW exports.arrow_endless AS"
                          " SELECT generate_series(1, 100000000) AS id, repeat('x', 1000) AS pad")
    received = bytearray()
    backend = ("SELECT pid FROM pg_stat_activity WHERE query ILIKE '%arrow_endless%'"
               " AND query ILIKE 'COPY%' AND pid <> pg_backend_pid()")
    with httpx.stream("GET", f"{server.url}/datasets/arrow_endless.arrow",
                      headers={**bearer(token), "Accept-Encoding": "identity"},
                      timeout=60) as r:
        assert r.status_code == 200
        chunks = r.iter_raw()
        first = None
        while first is None:  # the first record batch, whole, while the query still runs
            received += next(chunks)
            try:
                first = pa.ipc.open_stream(bytes(received)).read_next_batch()
            except (OSError, pa.ArrowInvalid, StopIteration):
                continue
        assert first.num_rows > 0 and first.column("id")[0].as_py() == 1
        assert wait_until(lambda: fetch(database_url, backend), 30)
        for row in fetch(database_url, backend):
            run_sql(database_url, f"SELECT pg_terminate_backend({row['pid']})")
        with pytest.raises(httpx.RemoteProtocolError):
            for chunk in chunks:
                received += chunk
    # The schema and some batches came, never Arrow's end-of-stream marker.
    assert received.startswith(b"\xff\xff\xff\xff")
    assert not received.endswith(b"\xff\xff\xff\xff\x00\x00\x00\x00")


def test_a_client_that_leaves_ends_the_drivers_query(server: Server, database_url: str,
                                                     token: str) -> None:
    """The driver's connection is the export's: when the client leaves (a gzip answer
    keeps no resume copy to finish), its query is cancelled and the connection closed."""
    run_sql(database_url, "CREATE OR REPLACE VIEW exports.arrow_leaving AS"
                          " SELECT generate_series(1, 100000000) AS id, repeat('y', 1000) AS pad")
    backend = ("SELECT pid FROM pg_stat_activity WHERE query ILIKE '%arrow_leaving%'"
               " AND pid <> pg_backend_pid()")
    with httpx.stream("GET", f"{server.url}/datasets/arrow_leaving.arrow",
                      headers={**bearer(token), "Accept-Encoding": "gzip"}, timeout=60) as r:
        assert r.status_code == 200
        # Read on until the driver's query shows (a client that reads nothing would be
        # cut by the idle rule instead of leaving).
        seen = False
        for _ in r.iter_raw():
            if seen := bool(fetch(database_url, backend)):
                break
        assert seen
    assert wait_until(lambda: not fetch(database_url, backend), 30)


def test_nan_in_a_decimal_column_is_a_clear_error(server: Server, database_url: str,
                                                 token: str) -> None:
    run_sql(database_url, "CREATE OR REPLACE VIEW exports.arrow_nan AS"
                          " SELECT 'NaN'::numeric(5,2) AS x")
    r = httpx.get(f"{server.url}/datasets/arrow_nan.parquet", headers=bearer(token), timeout=60)
    assert r.status_code == 422, r.text
    assert "select=...,x::text" in r.text
    r = httpx.get(f"{server.url}/datasets/arrow_nan.parquet?select=x::text",
                  headers=bearer(token), timeout=60)
    assert pq.read_table(io.BytesIO(r.content)).to_pylist() == [{"x": "NaN"}]


def test_head_cursor_since_and_audit_as_for_csv(server: Server, database_url: str, table: None,
                                                token: str) -> None:
    head = httpx.head(f"{server.url}/datasets/{TABLE}.parquet", headers=bearer(token),
                      timeout=60)
    assert head.status_code == 200
    assert head.headers["content-type"] == "application/vnd.apache.parquet"
    r = httpx.get(f"{server.url}/datasets/{TABLE}.arrow?order=id", headers=bearer(token),
                  timeout=60)
    cursor = r.headers["export-cursor"]
    run_sql(database_url, f"UPDATE exports.{TABLE} SET note = 'changed' WHERE id = 2")
    try:
        changed = arrow_table(signed(server, token, f"/datasets/{TABLE}.parquet"
                                     f"?select=id,note&since={cursor}"), "parquet")
        assert changed.to_pylist() == [{"id": 2, "note": "changed"}]
    finally:
        run_sql(database_url, f"UPDATE exports.{TABLE} SET note = NULL WHERE id = 2")
    rows = fetch(database_url, "SELECT format, rows, status FROM exporter.downloads"
                               " WHERE target = $1 AND format = 'arrow' ORDER BY id DESC LIMIT 1",
                 TABLE)
    assert wait_until(lambda: fetch(database_url, "SELECT 1 FROM exporter.downloads WHERE"
                                    " target = $1 AND format = 'arrow' AND status = 'complete'"
                                    " AND rows = 4", TABLE), 30), rows


def test_parquet_row_groups_are_bounded_in_bytes(make_module_server: type[Server],
                                                 database_url: str) -> None:
    """EXPORTER_PARQUET_ROW_GROUP_BYTES (1 MiB, its least) cuts the demo table's 20,000 rows
    (several MiB as Arrow) into several groups, each about that size."""
    limit = 1024 * 1024
    with make_module_server({"EXPORTER_PARQUET_ROW_GROUP_BYTES": str(limit),
                             "EXPORTER_PUBLIC_DATASETS": '["*"]'}) as s:
        r = httpx.get(f"{s.url}/datasets/orders.parquet?order=id", timeout=60)
    assert r.status_code == 200
    parquet = pq.ParquetFile(io.BytesIO(r.content))
    meta = parquet.metadata
    assert meta.num_rows == 20_000 and meta.num_row_groups >= 3
    assert meta.row_group(0).column(0).compression == "ZSTD"
    # A group is written once it reaches the limit: at most the limit and one batch more.
    sizes = [parquet.read_row_group(i).nbytes for i in range(meta.num_row_groups)]
    assert max(sizes) <= limit * 1.5, sizes
    assert parquet.read(columns=["id"]).column("id").to_pylist() == list(range(1, 20_001))
