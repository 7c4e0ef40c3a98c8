"""Exports over real HTTP: bytes against psql, NDJSON exactness, query grammar, errors."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
from decimal import Decimal
from pathlib import Path
from urllib.parse import quote

import asyncpg
import httpx
import pytest

from tests.support import Server, asyncpg_dsn, fetch, psql, run_sql

CSV_TYPE = "text/csv; charset=utf-8; header=present"


def get(server: Server, path: str, **kwargs: object) -> httpx.Response:
    return httpx.get(server.url + path, timeout=60, **kwargs)  # type: ignore[arg-type]


def psql_csv(url: str, query: str) -> bytes:
    return psql(url, "-c", f"\\copy ({query}) TO STDOUT WITH (FORMAT csv, HEADER)")


@pytest.mark.parametrize(
    ("path", "sql"),
    [
        ("/datasets/orders.csv", "SELECT * FROM exports.orders"),
        (
            "/datasets/orders.csv?select=id,note,amount,created_at,tags,details"
            "&id=gt.1234&order=id.desc&limit=5000&offset=7",
            "SELECT id, note, amount, created_at, tags, details FROM exports.orders"
            " WHERE id > 1234 ORDER BY id DESC LIMIT 5000 OFFSET 7",
        ),
        (
            "/datasets/orders.csv?paid=is.null&order=ship_date.desc.nullslast,id",
            "SELECT * FROM exports.orders WHERE paid IS NULL"
            " ORDER BY ship_date DESC NULLS LAST, id",
        ),
        (
            "/datasets/daily_revenue.csv?order=day",
            "SELECT * FROM exports.daily_revenue ORDER BY day",
        ),
    ],
)
def test_csv_is_byte_for_byte_what_psql_copies(
    server: Server, database_url: str, path: str, sql: str
) -> None:
    r = get(server, path)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == CSV_TYPE
    expected = psql_csv(database_url, sql)
    assert len(expected) > 100
    assert r.content == expected


def test_the_demo_table_holds_the_awkward_values(database_url: str) -> None:
    notes = {row["note"] for row in fetch(database_url, "SELECT DISTINCT note FROM exports.orders")}
    for needle in [",", '"', "\n", "\\", "\t", "ü", "🚀"]:
        assert any(n and needle in n for n in notes), needle
    assert None in notes and "" in notes


def test_ndjson_is_row_to_json_exactly(server: Server, database_url: str) -> None:
    r = get(server, "/datasets/orders.ndjson?order=id&limit=3000")
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/x-ndjson"
    expected = psql(
        database_url, "-At", "-c",
        "SELECT row_to_json(s) FROM (SELECT * FROM exports.orders ORDER BY id LIMIT 3000) s",
    )
    assert r.content == expected
    lines = r.content.split(b"\n")
    assert lines[-1] == b"" and len(lines) == 3001


ADVERSARIAL = [
    "back\\slash", "\\N", "\\\\", "quote\"d", "'single'", "line\nbreak", "cr\rlf\r\n",
    "tab\tstop", "\x01\x02\x03\x1f\x7f", "comma,separated", "emoji 😀🚀👩‍👩‍👧", "Zürich façade",
    "\\.", "", " leading and trailing ", "\u2028\u2029", "{\"json\": \"in text\"}",
]


def test_ndjson_values_come_out_exactly(server: Server, database_url: str) -> None:
    run_sql(
        database_url,
        "DROP TABLE IF EXISTS exports.tricky",
        "CREATE TABLE exports.tricky (id int, t text, n numeric, j jsonb, a text[], f float8)",
    )
    rows = []
    for i, value in enumerate(ADVERSARIAL):
        rows.append(
            (i, value, Decimal("12345678901234567890.123456789012345"),
             json.dumps({"v": value, "nested": [value, {"k": value}]}), [value, None], 0.1 + i)
        )
    rows.append((len(ADVERSARIAL), None, None, None, None, None))

    async def insert() -> None:
        conn = await asyncpg.connect(asyncpg_dsn(database_url))
        await conn.executemany(
            "INSERT INTO exports.tricky VALUES ($1, $2, $3, $4::jsonb, $5, $6)", rows
        )
        await conn.close()

    asyncio.run(insert())  # through asyncpg: values as bound parameters, no quoting to get wrong
    r = get(server, "/datasets/tricky.ndjson?order=id")
    assert r.status_code == 200, r.text
    lines = r.content.decode("utf-8").split("\n")
    assert lines[-1] == ""
    objects = [json.loads(line, parse_float=Decimal) for line in lines[:-1]]
    assert len(objects) == len(rows)
    for obj, (i, value, number, _, _, f) in zip(objects, rows, strict=True):
        assert obj["id"] == i
        assert obj["t"] == value
        if value is None:
            assert obj["n"] is None and obj["j"] is None and obj["a"] is None
            continue
        assert obj["n"] == number  # all digits, as a JSON number
        assert obj["j"] == {"v": value, "nested": [value, {"k": value}]}
        assert obj["a"] == [value, None]
        assert float(obj["f"]) == f
    # and byte for byte what PostgreSQL's row_to_json writes
    expected = psql(
        database_url, "-At", "-c",
        "SELECT row_to_json(s) FROM (SELECT * FROM exports.tricky ORDER BY id) s",
    )
    assert r.content == expected
    # CSV of the same table, against psql
    r = get(server, "/datasets/tricky.csv?order=id")
    assert r.content == psql_csv(database_url, "SELECT * FROM exports.tricky ORDER BY id")


def test_catalog_lists_tables_and_views(server: Server) -> None:
    r = get(server, "/datasets")
    assert r.status_code == 200
    body = r.json()
    datasets = {d["name"]: d for d in body["datasets"]}
    orders = datasets["orders"]
    assert orders["kind"] == "table"
    assert datasets["daily_revenue"]["kind"] == "view"
    assert orders["estimated_rows"] == 20_000
    columns = {c["name"]: c for c in orders["columns"]}
    assert columns["amount"] == {"name": "amount", "type": "numeric(12,2)", "nullable": False}
    assert columns["created_at"]["type"] == "timestamp with time zone"
    assert columns["tags"]["type"] == "text[]"
    assert columns["note"]["nullable"] is True
    assert {c["type"] for c in columns.values()} >= {
        "bigint", "text", "date", "boolean", "uuid", "jsonb"
    }
    assert orders["exports"] == {
        "csv": server.url + "/datasets/orders.csv",
        "ndjson": server.url + "/datasets/orders.ndjson",
    }
    assert get(server, "/datasets/orders.csv?limit=1").status_code == 200


def test_a_view_created_later_is_served_without_restart(server: Server, database_url: str) -> None:
    run_sql(database_url, "DROP VIEW IF EXISTS exports.late_view")
    assert get(server, "/datasets/late_view.csv").status_code == 404
    run_sql(database_url, "CREATE VIEW exports.late_view AS SELECT 1 AS one, 'x,y' AS two")
    r = get(server, "/datasets/late_view.csv")
    assert r.status_code == 200
    assert r.content == b'one,two\n1,"x,y"\n'
    assert "late_view" in {d["name"] for d in get(server, "/datasets").json()["datasets"]}


def test_content_disposition_names_dataset_and_snapshot_time(server: Server) -> None:
    r = get(server, "/datasets/orders.ndjson?limit=1")
    assert re.fullmatch(
        r'attachment; filename="orders-\d{8}T\d{6}Z\.ndjson"', r.headers["content-disposition"]
    )


def test_non_ascii_dataset_name(server: Server, database_url: str) -> None:
    run_sql(database_url, 'CREATE OR REPLACE VIEW exports."ventes_été" AS SELECT 1 AS n')
    r = get(server, "/datasets/ventes_%C3%A9t%C3%A9.csv")
    assert r.status_code == 200
    cd = r.headers["content-disposition"]
    assert re.fullmatch(
        r"attachment; filename=\"ventes_ete-\d{8}T\d{6}Z\.csv\"; "
        r"filename\*=UTF-8''ventes_%C3%A9t%C3%A9-\d{8}T\d{6}Z\.csv",
        cd,
    ), cd


@pytest.mark.parametrize(
    ("accept", "status", "content_type"),
    [
        ("text/csv", 200, CSV_TYPE),
        ("application/x-ndjson", 200, "application/x-ndjson"),
        ("application/x-ndjson;q=0.9, text/csv;q=0.5", 200, "application/x-ndjson"),
        ("*/*", 200, CSV_TYPE),
        (None, 200, CSV_TYPE),
        ("application/json", 406, "application/json"),
        ("text/html, image/png", 406, "application/json"),
    ],
)
def test_format_from_accept(
    server: Server, accept: str | None, status: int, content_type: str
) -> None:
    headers = {"Accept": accept} if accept else {}
    r = get(server, "/datasets/orders?limit=2", headers=headers)
    assert r.status_code == status
    assert r.headers["content-type"] == content_type


def test_head_gives_the_headers_without_running_the_query(
    server: Server, database_url: str
) -> None:
    run_sql(
        database_url,
        "CREATE OR REPLACE VIEW exports.slow_head AS SELECT 1 AS n FROM pg_sleep(30)",
    )
    r = httpx.head(server.url + "/datasets/slow_head.csv", timeout=5)
    assert r.status_code == 200
    assert r.headers["content-type"] == CSV_TYPE
    assert r.headers["content-disposition"].startswith('attachment; filename="slow_head-')
    assert "content-length" not in r.headers
    assert r.content == b""
    assert httpx.head(server.url + "/datasets/nope.csv").status_code == 404
    assert httpx.head(server.url + "/datasets/orders.csv?id=gt.x").status_code == 400


@pytest.mark.parametrize(
    ("query", "parameter"),
    [
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
    server: Server, query: str, parameter: str
) -> None:
    r = get(server, "/datasets/orders.csv?" + query)
    assert r.status_code == 400, (query, r.text)
    error = r.json()["error"]
    assert error["parameter"] == parameter
    assert error["status"] == 400 and error["message"]


def test_unknown_dataset_is_404(server: Server) -> None:
    for path in ["/datasets/nope.csv", "/datasets/nope", "/datasets/orders.xlsx",
                 "/datasets/..%2F..%2Fetc%2Fpasswd.csv", "/datasets/pg_class.csv"]:
        r = get(server, path)
        assert r.status_code == 404, path
        assert r.json()["error"]["status"] == 404


def ids(server: Server, query: str) -> list[int]:
    r = get(server, "/datasets/orders.ndjson?select=id&order=id&" + query)
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
    server: Server, database_url: str, query: str, where: str
) -> None:
    pairs = (p.partition("=") for p in query.split("&"))
    encoded = "&".join(f"{k}={quote(v, safe='(),.*:')}" for k, _, v in pairs)
    assert ids(server, encoded) == sql_ids(database_url, where)


def test_incremental_pull_recipe(server: Server) -> None:
    """What a scheduled script does: ask only for rows after the last id it saw."""
    last = 0
    seen: list[int] = []
    for _ in range(3):
        got = ids(server, f"id=gt.{last}&limit=7000")
        seen += got
        last = got[-1] if got else last
    assert seen == list(range(1, 20_001))
    assert ids(server, f"id=gt.{last}") == []


@pytest.mark.needs("curl", "wget")
def test_curl_and_wget_download_exports(server: Server, tmp_path: Path) -> None:
    expected = get(server, "/datasets/orders.csv?order=id").content
    curl = subprocess.run(
        ["curl", "-fsS", "-OJ", server.url + "/datasets/orders.csv?order=id"],
        cwd=tmp_path, capture_output=True, timeout=60,
    )
    assert curl.returncode == 0, curl.stderr
    (saved,) = tmp_path.glob("orders-*.csv")
    assert saved.read_bytes() == expected
    saved.unlink()

    wget = subprocess.run(
        ["wget", "-q", "--content-disposition", server.url + "/datasets/orders.csv?order=id"],
        cwd=tmp_path, capture_output=True, timeout=60,
    )
    assert wget.returncode == 0, wget.stderr
    (saved,) = tmp_path.glob("orders-*.csv")
    assert saved.read_bytes() == expected

    failed = subprocess.run(
        ["curl", "-fsS", "-o", "/dev/null", server.url + "/datasets/orders.csv?id=gt.x"],
        capture_output=True, timeout=60,
    )
    assert failed.returncode == 22  # the HTTP error reaches curl as an error


def test_httpx_streaming_client(server: Server, database_url: str) -> None:
    received = bytearray()
    chunks = 0
    with httpx.stream("GET", server.url + "/datasets/orders.csv", timeout=60) as r:
        assert r.status_code == 200
        assert r.headers.get("transfer-encoding") == "chunked"
        for chunk in r.iter_raw():
            received += chunk
            chunks += 1
    assert chunks > 3
    assert bytes(received) == psql_csv(database_url, "SELECT * FROM exports.orders")
