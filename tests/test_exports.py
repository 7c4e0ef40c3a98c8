"""Exports over real HTTP: bytes against psql, NDJSON exactness, query grammar, errors."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
from decimal import Decimal
from pathlib import Path

import asyncpg
import httpx
import pytest

from exporter.exports.filenames import query_tag
from tests.support import Server, asyncpg_dsn, fetch, psql, run_sql, wait_until

CSV_TYPE = "text/csv; charset=utf-8; header=present"
IDENTITY = {"Accept-Encoding": "identity"}


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
        "json": server.url + "/datasets/orders.json",
        "ndjson": server.url + "/datasets/orders.ndjson",
        "tsv": server.url + "/datasets/orders.tsv",
        "parquet": server.url + "/datasets/orders.parquet",
        "arrow": server.url + "/datasets/orders.arrow",
        "xlsx": server.url + "/datasets/orders.xlsx",
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
    r = get(server, "/datasets/orders.ndjson")
    assert re.fullmatch(
        r'attachment; filename="orders-\d{8}T\d{6}Z\.ndjson"', r.headers["content-disposition"]
    )
    # A query adds what tells it apart: 8 hex digits of its hash (exporter/exports/filenames.py),
    # on HEAD too; a signed link's own parameters are no part of it.
    tag = query_tag("limit=1")
    for r in (get(server, "/datasets/orders.ndjson?limit=1"),
              httpx.head(server.url + "/datasets/orders.ndjson?limit=1")):
        assert re.fullmatch(rf'attachment; filename="orders-\d{{8}}T\d{{6}}Z-{tag}\.ndjson"',
                            r.headers["content-disposition"])


@pytest.mark.needs("curl")
def test_curl_parallel_keeps_eight_filtered_exports_started_together(
    server: Server, tmp_path: Path
) -> None:
    """Eight filtered exports of one dataset at once, saved by the names the server gives:
    eight files, each with its own URL's bytes (all eight once had one name: curl kept one
    and failed seven with exit 23)."""
    queries = [f"id=lt.{200 * n}&order=id" for n in range(1, 9)]
    urls = [f"{server.url}/datasets/orders.csv?{q}" for q in queries]
    done = subprocess.run(["curl", "-fsS", "--parallel", "--parallel-max", "8",
                           "--remote-name-all", "-J", *urls],
                          cwd=tmp_path, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr
    saved = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert len(saved) == 8, sorted(saved)
    for query, url in zip(queries, urls, strict=True):
        (name,) = [n for n in saved if n.endswith(f"-{query_tag(query)}.csv")]
        assert re.fullmatch(r"orders-\d{8}T\d{6}Z-[0-9a-f]{8}\.csv", name)
        expected = get(server, url.removeprefix(server.url), headers=IDENTITY).content
        assert saved[name] == expected
    assert len(set(saved.values())) == 8


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


def ranges_as_promised(url: str, headers: dict[str, str]) -> httpx.Headers:
    """HEAD and GET `url`; where either says `Accept-Ranges: bytes`, `Range: bytes=0-99`
    must get a 206 of exactly the GET's first 100 bytes (DuckDB's httpfs and other range
    readers take the header at its word). The GET's headers."""
    head = httpx.head(url, headers=headers, timeout=60)
    whole = httpx.get(url, headers=headers, timeout=60)
    assert head.status_code == whole.status_code == 200, (url, whole.text[:200])
    said = {head.headers.get("accept-ranges", "none"), whole.headers.get("accept-ranges", "none")}
    assert said <= {"bytes", "none"}, said
    if "bytes" in said:
        part = httpx.get(url, headers={**headers, "Range": "bytes=0-99"}, timeout=60)
        assert part.status_code == 206, (url, part.status_code, said)
        assert part.headers["content-range"].startswith("bytes 0-99/")
        assert part.content == whole.content[:100]
    return whole.headers


def test_accept_ranges_says_bytes_only_where_a_byte_range_is_served(server: Server) -> None:
    url = server.url + "/datasets/orders.csv?order=id&note=neq.accept-ranges"
    headers = ranges_as_promised(url, IDENTITY)
    assert headers["accept-ranges"] == "none"
    assert httpx.head(url, headers=IDENTITY).headers["accept-ranges"] == "none"
    # A range no copy continues: the whole export, and still no promise of ranges.
    r = httpx.get(url, headers={**IDENTITY, "Range": "bytes=0-99"}, timeout=60)
    assert r.status_code == 200 and r.headers["accept-ranges"] == "none"
    # The copy's own URL serves ranges of exactly these bytes, and says so.
    copy = server.url + headers["content-location"]
    assert wait_until(lambda: httpx.head(copy, headers=IDENTITY).status_code == 200, 30)
    assert ranges_as_promised(copy, IDENTITY)["accept-ranges"] == "bytes"
    # A continuation proved by If-Range is a 206, but this URL still answers other ranges
    # whole: no promise there either.
    rest = httpx.get(url, headers={**IDENTITY, "Range": "bytes=100-", "If-Range": headers["etag"]},
                     timeout=60)
    assert rest.status_code == 206
    assert rest.content == httpx.get(copy, headers=IDENTITY, timeout=60).content[100:]
    assert rest.headers["accept-ranges"] == "none"
    for path, extra in [("/datasets/orders.csv.gz?limit=500", {}),
                        ("/datasets/orders.csv?limit=500", {"Accept-Encoding": "gzip"}),
                        ("/datasets/orders.ndjson?limit=500", IDENTITY),
                        ("/datasets/orders?limit=500", {**IDENTITY, "Accept": "text/csv"})]:
        ranges_as_promised(server.url + path, extra)


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


# The matrices of formats (Accept), bad parameters (400), unknown datasets (404) and
# filters against SQL run in process: tests/test_inprocess_exports.py.


def ids(server: Server, query: str) -> list[int]:
    r = get(server, "/datasets/orders.ndjson?select=id&order=id&" + query)
    assert r.status_code == 200, r.text
    return [json.loads(line)["id"] for line in r.text.splitlines()]


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
    # Identity: the raw bytes are the CSV (httpx asks for gzip and zstd by itself).
    with httpx.stream("GET", server.url + "/datasets/orders.csv",
                      headers={"Accept-Encoding": "identity"}, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers.get("transfer-encoding") == "chunked"
        for chunk in r.iter_raw():
            received += chunk
            chunks += 1
    assert chunks > 3
    assert bytes(received) == psql_csv(database_url, "SELECT * FROM exports.orders")
