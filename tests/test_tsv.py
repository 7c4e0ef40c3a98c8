"""`.tsv`: COPY's text format, byte for byte what psql's `\\copy ... TO STDOUT` writes for
the same query, after a header line that equals `\\copy ... WITH (FORMAT text, HEADER)`'s;
with its compressed files, Accept, the catalog, OpenAPI and stored exports."""

from __future__ import annotations

import gzip
import os
from collections.abc import Iterator

import httpx
import pytest
import zstandard

from exporter.config import Settings
from tests.inprocess import InProcess
from tests.support import Server, psql, run_sql

TSV_TYPE = "text/tab-separated-values; charset=utf-8"


@pytest.fixture(scope="module")
def app(database_url: str) -> Iterator[InProcess]:
    settings = Settings(database_url=database_url, public_datasets=["*"], public_files=["*"])
    with InProcess(settings) as running:
        yield running


@pytest.fixture(scope="module")
def odd(database_url: str) -> str:
    """Values and column names that COPY's text format escapes, NULLs, non-ASCII text."""
    run_sql(
        database_url,
        "DROP TABLE IF EXISTS exports.tsv_odd",
        'CREATE TABLE exports.tsv_odd (id int PRIMARY KEY, "tab\tname" text,'
        ' "back\\slash" text, "new\nline" text, "Zoë \u2028 \x01\x02\x08\x0b\x0c v" text,'
        ' "quote""d" text, j json, b bytea, a text[], at timestamptz, n numeric, ok boolean)',
        "INSERT INTO exports.tsv_odd VALUES"
        " (1, E'tab\\there', E'back\\\\slash \\\\N', E'lf\\ncr\\r',"
        "  E'ctl \\x01\\x08\\x0b\\x0c\\x7f',"
        "  '\"q\"', E'{\"a\":\\n 1}', '\\x00ff', '{a,NULL,\"b c\"}',"
        "  '2026-12-05 11:19:00+00', 1.50, true),"
        " (2, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),"
        " (3, '', '\\N', 'Zoë Müller 李雷 🚀', '=1+2', '', 'null', '', '{}',"
        "  'infinity', 'NaN', false)",
    )
    return "SELECT * FROM exports.tsv_odd ORDER BY id"


def psql_text(database_url: str, query: str, options: str = "") -> bytes:
    return psql(database_url, "-c", f"\\copy ({query}) TO STDOUT {options}".rstrip())


@pytest.mark.parametrize(("path", "select"), [
    ("/datasets/tsv_odd.tsv?order=id", "SELECT * FROM exports.tsv_odd ORDER BY id"),
    ("/datasets/tsv_odd.tsv?id=gt.10", "SELECT * FROM exports.tsv_odd WHERE id > 10"),
    ("/datasets/orders.tsv?order=id&limit=300", "SELECT * FROM exports.orders ORDER BY id"
                                                " LIMIT 300"),
    ("/datasets/orders.tsv?select=key:id,note&order=id.desc&limit=50",
     "SELECT id AS key, note FROM exports.orders ORDER BY id DESC LIMIT 50"),
    # The same name twice: the header keeps both, as COPY's.
    ("/datasets/orders.tsv?select=a:id,a:note&order=id&limit=3",
     "SELECT id AS a, note AS a FROM exports.orders ORDER BY id LIMIT 3"),
    ("/datasets/daily_revenue.tsv?order=day", "SELECT * FROM exports.daily_revenue"
                                              " ORDER BY day"),
])
def test_tsv_is_what_psql_copy_writes(app: InProcess, database_url: str, odd: str,
                                      path: str, select: str) -> None:
    r = app.get(path, headers={"Accept-Encoding": "identity"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == TSV_TYPE
    assert ".tsv" in r.headers["content-disposition"]
    header, _, rows = r.content.partition(b"\n")
    # The rows: psql's `\copy (...) TO STDOUT`, the text format's defaults.
    assert rows == psql_text(database_url, select)
    # The header line: what COPY's own HEADER writes in text format.
    assert r.content == psql_text(database_url, select, "WITH (FORMAT text, HEADER)")
    assert header and b"\t" in header


def test_names_and_values_are_escaped_as_copy_escapes_them(app: InProcess, odd: str) -> None:
    body = app.get("/datasets/tsv_odd.tsv?order=id").content
    lines = body.split(b"\n")
    names = ("id\ttab\\tname\tback\\\\slash\tnew\\nline\tZoë \u2028 \x01\x02\\b\\v\\f v\t"
             'quote"d\tj\t')
    assert lines[0].startswith(names.encode())
    assert len(lines) == 5 and lines[-1] == b""  # a header, three rows, a final line break
    assert lines[2] == b"2" + b"\t\\N" * 11


def test_an_empty_result_is_the_header_line(app: InProcess, database_url: str,
                                            odd: str) -> None:
    r = app.get("/datasets/tsv_odd.tsv?id=lt.0")
    assert r.status_code == 200
    assert r.content == psql_text(database_url, "SELECT * FROM exports.tsv_odd WHERE id < 0",
                                  "WITH (FORMAT text, HEADER)")
    assert r.content.count(b"\n") == 1


def test_tsv_by_accept_compressed_and_counted(app: InProcess, database_url: str) -> None:
    select = "SELECT * FROM exports.orders ORDER BY id LIMIT 200"
    expected = psql_text(database_url, select, "WITH (FORMAT text, HEADER)")
    r = app.get("/datasets/orders?order=id&limit=200",
                headers={"Accept": "text/tab-separated-values", "Accept-Encoding": "identity"})
    assert r.status_code == 200 and r.headers["content-type"] == TSV_TYPE
    assert r.content == expected
    gz = app.get("/datasets/orders.tsv.gz?order=id&limit=200")
    assert gz.headers["content-type"] == "application/gzip"
    assert gzip.decompress(gz.content) == expected
    zst = app.get("/datasets/orders.tsv.zst?order=id&limit=200")
    assert zstandard.ZstdDecompressor().decompressobj().decompress(zst.content) == expected
    page = app.get("/datasets/orders.tsv?order=id", headers={"Range": "0-4",
                                                             "Prefer": "count=exact"})
    assert page.status_code == 206 and page.headers["content-range"] == "0-4/20000"
    assert page.content == psql_text(database_url, "SELECT * FROM exports.orders ORDER BY id"
                                     " LIMIT 5", "WITH (FORMAT text, HEADER)")


def test_catalog_and_openapi_name_tsv(app: InProcess) -> None:
    orders = {d["name"]: d for d in app.get("/datasets").json()["datasets"]}["orders"]
    assert orders["exports"]["tsv"] == app.url + "/datasets/orders.tsv"
    assert orders["compressed_exports"]["tsv.gz"] == app.url + "/datasets/orders.tsv.gz"
    spec = app.get("/openapi.json").json()
    get = spec["paths"]["/datasets/{name}"]["get"]
    assert "text/tab-separated-values" in get["responses"]["200"]["content"]


def test_a_stored_tsv_export(server: Server, database_url: str) -> None:
    from tests.test_access import bearer, new_token
    from tests.test_stored_exports import finished

    token = new_token(database_url, f"tsv-{os.urandom(3).hex()}", "datasets:*")
    manifest = finished(server, token, "/datasets/orders.tsv.gz?order=id&id=lte.500")
    assert manifest["format"] == "tsv" and manifest["rows"] == 500
    body = httpx.get(manifest["file_url"], headers=bearer(token), timeout=30)
    assert body.headers["content-type"] == "application/gzip"
    assert gzip.decompress(body.content) == psql_text(
        database_url, "SELECT * FROM exports.orders WHERE id <= 500 ORDER BY id",
        "WITH (FORMAT text, HEADER)")

