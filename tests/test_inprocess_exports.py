"""The export grammar and its answers as matrices, in process: the app with its lifespan
and the session's real database, through httpx's ASGITransport (tests/inprocess.py).
Status, JSON error and selected rows of each request; the bytes of whole exports, over a
real server and against psql, stay in tests/test_exports.py.

Runs on every PostgreSQL of `--postgres` (tests/conftest.py): the value checks differ
between versions."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from urllib.parse import quote

import pytest

from exporter.access.links import canonical_query, split_query
from exporter.config import Settings
from exporter.exports.filenames import query_tag
from tests.inprocess import InProcess
from tests.support import fetch

CSV_TYPE = "text/csv; charset=utf-8; header=present"
OPERATORS = ("eq, neq, gt, gte, lt, lte, like, ilike, in, is, isdistinct, match, imatch, cs,"
             " cd, ov, fts, plfts, phfts, wfts")


@pytest.fixture(scope="module")
def app(database_url: str) -> Iterator[InProcess]:
    settings = Settings(database_url=database_url, public_datasets=["*"], public_files=["*"])
    with InProcess(settings) as running:
        yield running


# --- formats and headers (moved from tests/test_exports.py) ---------------------------


@pytest.mark.parametrize(
    ("accept", "status", "content_type"),
    [
        ("text/csv", 200, CSV_TYPE),
        ("application/x-ndjson", 200, "application/x-ndjson"),
        ("application/x-ndjson;q=0.9, text/csv;q=0.5", 200, "application/x-ndjson"),
        # As PostgREST answers: `*/*` (curl, wget, postgrest-js) and no Accept get JSON.
        ("*/*", 200, "application/json; charset=utf-8"),
        (None, 200, "application/json; charset=utf-8"),
        ("", 200, "application/json; charset=utf-8"),
        ("application/*", 200, "application/json; charset=utf-8"),
        ("text/*", 200, CSV_TYPE),
        ("text/csv, */*;q=0.8", 200, CSV_TYPE),
        ("text/html, */*;q=0.8", 200, "application/json; charset=utf-8"),
        # PostgREST's default answer: a JSON array (exports/renderers/json.py).
        ("application/json", 200, "application/json; charset=utf-8"),
        ("text/html, image/png", 406, "application/json"),
    ],
)
def test_format_from_accept(
    app: InProcess, accept: str | None, status: int, content_type: str
) -> None:
    headers = {"Accept": accept} if accept is not None else {}
    r = app.get("/datasets/orders?limit=2", headers=headers)
    assert r.status_code == status
    assert r.headers["content-type"] == content_type


def test_not_acceptable_says_what_is(app: InProcess) -> None:
    r = app.get("/datasets/orders?limit=2", headers={"Accept": "text/csv;q=0, image/png"})
    assert r.status_code == 406
    error = r.json()["error"]
    assert error["status"] == 406
    assert "text/csv" in error["message"] and "application/x-ndjson" in error["message"]


@pytest.mark.parametrize(("path", "content_type", "body"), [
    ("/datasets/orders.csv?select=id,customer&order=id&limit=2", CSV_TYPE,
     b"id,customer\n1,"),
    ("/datasets/orders.ndjson?select=id&order=id&limit=2", "application/x-ndjson",
     b'{"id":1}\n{"id":2}\n'),
    ("/datasets/orders.csv?select=id&limit=0", CSV_TYPE, b"id\n"),
    ("/datasets/orders.ndjson?limit=0", "application/x-ndjson", b""),
])
def test_format_by_suffix(app: InProcess, path: str, content_type: str, body: bytes) -> None:
    r = app.get(path)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == content_type
    assert r.content.startswith(body) if body else r.content == b""
    suffix = path.split("?")[0].rsplit(".", 1)[1]
    # The query's tag is that of its canonical form (`select=id%2Ccustomer&...`).
    tag = query_tag(canonical_query(split_query(path.partition("?")[2])[0]))
    assert re.fullmatch(rf'attachment; filename="orders-\d{{8}}T\d{{6}}Z-{tag}\.{suffix}"',
                        r.headers["content-disposition"])
    assert "content-length" not in r.headers


@pytest.mark.parametrize("path", [
    "/datasets/orders.csv?id=gt.3", "/datasets/orders.ndjson", "/datasets/orders",
])
def test_head_gives_the_get_headers_and_no_body(app: InProcess, path: str) -> None:
    got, head = app.get(path + ("&" if "?" in path else "?") + "limit=1"), app.head(path)
    assert head.status_code == got.status_code == 200
    assert head.content == b""
    assert head.headers["content-type"] == got.headers["content-type"]
    assert head.headers["content-disposition"].split("-")[0] == \
        got.headers["content-disposition"].split("-")[0]


# --- mistakes: 400 naming the parameter, 404 ---------------------------------------------


@pytest.mark.parametrize(
    ("query", "parameter"),
    [  # moved from tests/test_exports.py
        ("nosuchcolumn=eq.1", "nosuchcolumn"),
        ("id=between.1", "id"),
        ("id=gt", "id"),
        ("id=gt.abc", "id"),
        ("id=gt.99999999999999999999999", "id"),
        ("created_at=gte.yesterday-ish", "created_at"),
        ("order_uuid=eq.not-a-uuid", "order_uuid"),
        ("paid=is.maybe", "paid"),
        ("note=is.true", "note"),
        ("id=in.1,2", "id"),
        ("id=in.(1,x)", "id"),
        ("select=id,nope", "select"),
        ("select=", "select"),
        ("order=nope", "order"),
        ("order=id.sideways", "order"),
        ("limit=-1", "limit"),
        ("limit=ten", "limit"),
        ("offset=1.5", "offset"),
        ("limit=1&limit=2", "limit"),
        ("details=eq.{bad json", "details"),
        ("note=eq.nul%00byte", "note"),
    ],
)
def test_bad_parameters_get_400_naming_the_parameter(
    app: InProcess, query: str, parameter: str
) -> None:
    r = app.get("/datasets/orders.csv?" + query)
    assert r.status_code == 400, (query, r.text)
    error = r.json()["error"]
    assert error["parameter"] == parameter
    assert error["status"] == 400 and error["message"]


@pytest.mark.parametrize(("query", "parameter", "message"), [
    ("nosuchcolumn=eq.1", "nosuchcolumn", "unknown column 'nosuchcolumn' in dataset 'orders'"),
    ("id=between.1", "id", f"expected operator.value with operator one of {OPERATORS}"),
    ("note=is.true", "note", "'is.true' needs a boolean column"),
    ("limit=1&limit=2", "limit", "'limit' given more than once"),
    ("select=id,,note", "select", "expected a comma-separated list of columns"),
    # PostgreSQL's own words follow the parameter's.
    ("id=gt.abc", "id", "'abc' is not a valid bigint for column 'id': invalid input syntax"
     " for type bigint: \"abc\""),
    ("id=in.(1,2,x,4)", "id", "'x' is not a valid bigint for column 'id': invalid input syntax"
     " for type bigint: \"x\""),
    ("order_uuid=eq.nope", "order_uuid", "'nope' is not a valid uuid for column 'order_uuid':"
     " invalid input syntax for type uuid: \"nope\""),
])
def test_400_messages(app: InProcess, query: str, parameter: str, message: str) -> None:
    for method in ("GET", "HEAD"):
        r = app.request(method, "/datasets/orders.csv?" + query)
        assert r.status_code == 400, (method, query, r.text)
    r = app.get("/datasets/orders.ndjson?" + query)
    assert r.status_code == 400
    assert r.headers["content-type"] == "application/json"
    assert r.json() == {"code": "PGRST100", "message": message,
                        "details": f"parameter: {parameter}", "hint": None,
                        "error": {"status": 400, "message": message, "parameter": parameter}}


@pytest.mark.parametrize("path", [  # moved from tests/test_exports.py
    "/datasets/nope.csv", "/datasets/nope", "/datasets/orders.xls",
    "/datasets/..%2F..%2Fetc%2Fpasswd.csv", "/datasets/pg_class.csv",
])
def test_unknown_dataset_is_404(app: InProcess, path: str) -> None:
    r = app.get(path)
    assert r.status_code == 404, path
    assert r.json()["error"]["status"] == 404


# --- filters select what SQL selects (moved from tests/test_exports.py) ----------------


def ids(app: InProcess, query: str) -> list[int]:
    r = app.get("/datasets/orders.ndjson?select=id&order=id&" + query)
    assert r.status_code == 200, r.text
    return [json.loads(line)["id"] for line in r.text.splitlines()]


def sql_ids(database_url: str, where: str) -> list[int]:
    return [r["id"] for r in fetch(
        database_url, f"SELECT id FROM exports.orders WHERE {where} ORDER BY id"
    )]


@pytest.mark.parametrize(
    ("query", "where"),
    [
        ("id=eq.42", "id = 42"),
        ("id=neq.42&id=lte.50", "id <> 42 AND id <= 50"),
        ("id=gt.19990", "id > 19990"),
        ("id=gte.19990", "id >= 19990"),
        ("id=lt.5", "id < 5"),
        ("id=in.(3,1,2)", "id IN (1, 2, 3)"),
        ("id=not.in.(3,1,2)&id=lt.10", "id NOT IN (1, 2, 3) AND id < 10"),
        ("id=in.()", "false"),
        ("customer=like.*Brien*&id=lt.100", "customer LIKE '%Brien%' AND id < 100"),
        ("customer=ilike.zoë*&id=lt.100", "customer ILIKE 'zoë%' AND id < 100"),
        ('customer=in.("Smith, John",Bob)&id=lt.100',
         "customer IN ('Smith, John', 'Bob') AND id < 100"),
        ("note=is.null&id=lt.100", "note IS NULL AND id < 100"),
        ("note=eq.&id=lt.100", "note = '' AND id < 100"),
        ("paid=is.true&id=lt.30", "paid IS TRUE AND id < 30"),
        ("paid=is.false&id=lt.30", "paid IS FALSE AND id < 30"),
        ("paid=not.is.null&id=lt.30", "paid IS NOT NULL AND id < 30"),
        ("amount=gte.9990.5", "amount >= 9990.5"),
        ("created_at=gte.2026-01-01T10:00:00Z&created_at=lt.2026-01-01T10:01:00Z",
         "created_at >= '2026-01-01T10:00:00Z' AND created_at < '2026-01-01T10:01:00Z'"),
        ("ship_date=eq.2026-01-04", "ship_date = '2026-01-04'"),
        ("order_uuid=eq.a1d0c6e8-3f02-7327-d846-1063f4ac58a6",
         "order_uuid = 'a1d0c6e8-3f02-7327-d846-1063f4ac58a6'"),
        ('details=eq.{"gift": true, "meta": {"path": "a\\\\b\\"c", "ratio": 1.5714285714285714}, '
         '"items": 1, "source": "web"}',
         "details = '{\"gift\": true, \"meta\": {\"path\": \"a\\\\b\\\"c\", "
         "\"ratio\": 1.5714285714285714}, \"items\": 1, \"source\": \"web\"}'"),
        ("tags=eq.{}", "tags = '{}'"),
        ("note=eq.x' OR '1'='1", "note = 'x'' OR ''1''=''1'"),
        ("note=like.*'; DROP TABLE exports.orders; --*", "false"),
    ],
)
def test_filters_select_the_same_rows_as_sql(
    app: InProcess, database_url: str, query: str, where: str
) -> None:
    pairs = (p.partition("=") for p in query.split("&"))
    encoded = "&".join(f"{k}={quote(v, safe='(),.*:')}" for k, _, v in pairs)
    assert ids(app, encoded) == sql_ids(database_url, where)


@pytest.mark.parametrize(("query", "expected"), [
    ("id=lte.5&order=id.desc", [5, 4, 3, 2, 1]),
    ("id=lte.5&order=id&limit=2&offset=1", [2, 3]),
    ("id=lte.5&order=id&offset=10", []),
    ('"id"=lt.3&order=id', [1, 2]),
    ("id=lt.3&id=gt.1&order=id", [2]),
])
def test_order_limit_offset(app: InProcess, query: str, expected: list[int]) -> None:
    r = app.get("/datasets/orders.ndjson?select=id&" + query)
    assert r.status_code == 200, r.text
    assert [json.loads(line)["id"] for line in r.text.splitlines()] == expected


def test_the_catalog_lists_the_export_urls_of_this_server(app: InProcess) -> None:
    r = app.get("/datasets")
    assert r.status_code == 200
    orders = {d["name"]: d for d in r.json()["datasets"]}["orders"]
    assert orders["exports"] == {"csv": app.url + "/datasets/orders.csv",
                                 "json": app.url + "/datasets/orders.json",
                                 "ndjson": app.url + "/datasets/orders.ndjson",
                                 "tsv": app.url + "/datasets/orders.tsv",
                                 "parquet": app.url + "/datasets/orders.parquet",
                                 "arrow": app.url + "/datasets/orders.arrow",
                                 "xlsx": app.url + "/datasets/orders.xlsx"}
