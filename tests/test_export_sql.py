"""The SQL of exports under stress: thousands of values, every kind of column type, odd
dataset names, odd input. Each answer is compared with what PostgreSQL itself says.

They pass on PostgreSQL 13 to 18: EXPORTER_TEST_DATABASE_URL may point at any of them.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import subprocess
from collections.abc import Iterator
from urllib.parse import quote

import asyncpg
import httpx
import pytest

from exporter.config import Settings
from exporter.db import create_engine, driver_connection
from exporter.exports import sql
from exporter.exports.catalog import Catalog
from exporter.exports.query import parse
from tests.support import Server, fetch, raw_request, run_sql
from tests.test_access import new_token

TIMEOUT = 120


def get(server: Server, path: str, params: list[tuple[str, str]] | None = None,
        **kwargs: object) -> httpx.Response:
    return httpx.get(server.url + path, params=params, timeout=TIMEOUT,  # type: ignore[arg-type]
                     **kwargs)


def ndjson_ids(r: httpx.Response) -> list[int]:
    assert r.status_code == 200, r.text
    return [json.loads(line)["id"] for line in r.content.split(b"\n") if line]


def server_version(database_url: str) -> int:
    return int(fetch(database_url, "SHOW server_version_num")[0][0])


# --- many values -------------------------------------------------------------------


def in_list(values: list[str]) -> str:
    return "in.(" + ",".join(values) + ")"


def curl(url: str) -> tuple[int, bytes]:
    """GET with curl, the query string read from stdin (`-G --data-binary @-`): long
    query strings are too long for httpx (64 KiB) and soon for a command line."""
    base, _, query = url.partition("?")
    done = subprocess.run(["curl", "-sS", "-G", "--data-binary", "@-", "-w", "\n%{http_code}",
                           base], input=query.encode(), capture_output=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    body, _, status = done.stdout.rpartition(b"\n")
    return int(status), body


def export_url(server: Server, path: str, params: list[tuple[str, str]]) -> str:
    return server.url + path + "?" + "&".join(
        f"{quote(k, safe='')}={quote(v, safe='(),.')}" for k, v in params
    )


# uvicorn (httptools) refuses a request target longer than this with a plain 400.
MAX_TARGET = 65_535


@pytest.mark.parametrize("count", [1_700, 2_000])
def test_in_lists_of_thousands_of_values(server: Server, count: int) -> None:
    """One select column per value stopped at 1,664 values (502); a list is now one array."""
    values = [str(i) for i in range(count)]
    r = get(server, "/datasets/orders.ndjson",
            [("select", "id"), ("order", "id"), ("id", in_list(values))])
    assert ndjson_ids(r) == list(range(1, count))


@pytest.mark.needs("curl")
def test_as_many_values_as_the_url_holds_with_curl(server: Server) -> None:
    values = [str(i) for i in range(12_000, 0, -1)]
    url = export_url(server, "/datasets/orders.csv", [
        ("select", "id"), ("order", "id.desc"), ("id", in_list(values)), ("id", "neq.7"),
    ])
    assert 60_000 < len(url.removeprefix(server.url)) <= MAX_TARGET
    status, body = curl(url)
    assert status == 200, body[:300]
    assert body.split(b"\n") == [b"id", *(str(i).encode() for i in range(12_000, 0, -1)
                                          if i != 7), b""]


@pytest.mark.needs("curl")
def test_a_url_beyond_the_cap_is_refused_with_curl(server: Server) -> None:
    values = [str(i) for i in range(13_000)]
    url = export_url(server, "/datasets/orders.csv", [("id", in_list(values))])
    assert len(url.removeprefix(server.url)) > MAX_TARGET
    status, _ = curl(url)
    # The request line counts towards EXPORTER_MAX_HEADER_BYTES (64 KiB, like the target
    # cap of uvicorn's parser): refused as a head too large.
    assert status == 431


@pytest.mark.parametrize("position", [0, 1_234, 11_999])
@pytest.mark.needs("curl")
def test_a_bad_value_among_12_000_is_named_with_curl(server: Server, position: int) -> None:
    values = [str(i) for i in range(12_000)]
    values[position] = "12x"
    status, body = curl(export_url(server, "/datasets/orders.csv",
                                   [("limit", "1"), ("id", in_list(values))]))
    assert status == 400, body[:300]
    error = json.loads(body)["error"]
    assert error["parameter"] == "id"
    assert error["message"].startswith("'12x' is not a valid bigint for column 'id'"), error
    assert "12x" in error["message"].split(":", 1)[1]  # PostgreSQL's own reason follows


async def copy_export(database_url: str, params: list[tuple[str, str]]) -> bytes:
    """What an export runs, without HTTP: the check, then COPY of the generated SQL."""
    engine = create_engine(Settings(), database_url)
    try:
        dataset = (await Catalog(engine, "exports").reload())["orders"]
        query = parse(dataset, params)
        async with engine.connect() as conn:
            await sql.check_values(conn, query, Settings().statement_timeout)
            driver = await driver_connection(conn)
            out = io.BytesIO()

            async def write(chunk: bytes) -> None:
                out.write(chunk)

            await driver.copy_from_query(sql.select_sql(query), output=write,  # type: ignore[attr-defined]
                                         format="csv")
            return out.getvalue()
    finally:
        await engine.dispose()


def test_20_000_values_in_the_copy_statement(database_url: str) -> None:
    """Past what a URL holds, the SQL still works: the check binds two arrays, and the
    COPY statement (SQL text, no parameters) takes a 20,000-item IN list."""
    values = [str(i) for i in range(40_000, 0, -2)]
    notes = [f"no such note, ({i})" for i in range(20_000)]
    out = asyncio.run(copy_export(database_url, [
        ("select", "id"), ("order", "id"), ("id", in_list(values)),
        ("note", "not." + in_list([f'"{n}"' for n in notes])),
    ]))
    expected = [str(r["id"]).encode() for r in fetch(
        database_url, "SELECT id FROM exports.orders WHERE id % 2 = 0 AND note IS NOT NULL"
        " ORDER BY id")]  # NULL NOT IN (...) is not true
    assert len(expected) > 9_000
    assert out.split(b"\n") == [*expected, b""]


def test_thousands_of_values_across_many_filters(server: Server, database_url: str) -> None:
    # 2,000 filters, 1,000 values each side of a range: 3,000 values in all.
    params = [("select", "id"), ("order", "id"), ("id", "lte.3000")]
    params += [("id", f"neq.{i}") for i in range(1, 2_001)]
    params += [("customer", in_list(["Alice", "Bob", *[f"nobody {i}" for i in range(1_000)]]))]
    expected = [row["id"] for row in fetch(
        database_url, "SELECT id FROM exports.orders WHERE id BETWEEN 2001 AND 3000"
        " AND customer IN ('Alice', 'Bob') ORDER BY id")]
    assert len(expected) > 100
    assert ndjson_ids(get(server, "/datasets/orders.ndjson", params)) == expected


def test_head_checks_thousands_of_values_too(server: Server) -> None:
    values = [str(i) for i in range(5_000)]
    url = server.url + "/datasets/orders.csv"
    assert httpx.head(url, params={"id": in_list(values)}, timeout=TIMEOUT).status_code == 200
    values[4_000] = "x"
    assert httpx.head(url, params={"id": in_list(values)}, timeout=TIMEOUT).status_code == 400


def test_the_check_works_the_same_without_pg_input_error_info(database_url: str) -> None:
    """Before PostgreSQL 16 the values are cast in bulk and a bisection finds the bad one:
    run that path here too, whatever the server's version."""
    async def go() -> None:
        engine = create_engine(Settings(), database_url)
        try:
            async with engine.connect() as conn:
                dataset = (await Catalog(engine, "exports").reload())["orders"]
                values = [str(i) for i in range(3_000)]
                good = parse(dataset, [("id", in_list(values)), ("amount", "gt.1.005"),
                                       ("created_at", "lt.2030-01-01")])
                filters = sql._typed_filters(good)
                checked = [sql._Value(f, v) for f in filters for v in f.values]
                probes = sql._probes(good, filters)
                statement, params = sql._cast_check(checked, probes)
                assert (await conn.exec_driver_sql(statement, params)).scalar_one() == 3_002
                assert await sql._locate(conn, checked, probes) is None
                for position in (0, 1_500, 2_999):
                    bad = list(values)
                    bad[position] = "1.5"
                    query = parse(dataset, [("created_at", "lt.2030-01-01"),
                                            ("id", in_list(bad))])
                    filters = sql._typed_filters(query)
                    checked = [sql._Value(f, v) for f in filters for v in f.values]
                    error = await sql._locate(conn, checked, sql._probes(query, filters))
                    assert error is not None and error.parameter == "id"
                    assert error.message.startswith("'1.5' is not a valid bigint"), error.message
                    assert '"1.5"' in error.message  # PostgreSQL's reason names the value
                # and the connection is still usable after the failures
                assert (await conn.exec_driver_sql("SELECT 1")).scalar_one() == 1
        finally:
            await engine.dispose()

    asyncio.run(go())


# --- column types ------------------------------------------------------------------

TYPED_SETUP = [
    "DROP TABLE IF EXISTS exports.typed",
    "DROP DOMAIN IF EXISTS exports.t_small_positive",
    "DROP DOMAIN IF EXISTS exports.t_positive",
    "DROP DOMAIN IF EXISTS exports.t_cents",
    "DROP TYPE IF EXISTS exports.t_mood",
    "CREATE DOMAIN exports.t_positive AS int CHECK (VALUE > 0)",
    "CREATE DOMAIN exports.t_small_positive AS exports.t_positive CHECK (VALUE < 100)",
    "CREATE DOMAIN exports.t_cents AS numeric(12,2)",
    "CREATE TYPE exports.t_mood AS ENUM ('sad', 'ok', 'happy')",
    """CREATE TABLE exports.typed (
        id int, c char(3), b bit(3), vb varbit(4), v varchar(3), n numeric(5,2),
        ts timestamp(0), tz timestamptz(3), t time(0), iv interval day,
        ym interval year to month, d exports.t_positive, dd exports.t_small_positive,
        m exports.t_cents, mo exports.t_mood, ca char(2)[], ia int[], da exports.t_positive[],
        f float8, r real, sm smallint, j json, p point, u uuid, bo boolean, ip inet, tx text,
        "odd "" col" text
    )""",
    """INSERT INTO exports.typed VALUES
      (1, 'ab', B'101', B'10', 'xyz', 1.01, '2026-01-01 10:00:00', '2026-01-01 10:00:00.123Z',
       '10:00:00', '1 day', '1 year 2 months', 5, 50, 10.01, 'ok', '{ab,c}', '{1,2}', '{1,2}',
       0.1, 0.1, 32767, '{}', '(1,2)', 'a1d0c6e8-3f02-7327-d846-1063f4ac58a6', true,
       '10.0.0.1', 'x', 'q'),
      (2, 'abc', B'000', B'1111', '', 999.99, 'infinity', '-infinity', '23:59:59', '2 days',
       '-1 year', 2147483647, 99, -9999999999.99, 'happy', '{}', '{}', '{}', 'NaN',
       'Infinity', -32768, '[1]', '(0,0)', '00000000-0000-0000-0000-000000000000', false,
       '::1', '', ''),
      (3, ' ', B'111', B'', 'a', 'NaN', '1970-01-01', '1970-01-01Z', '00:00', '0', '0', 1, 1,
       0, 'sad', '{"a "}', '{NULL}', NULL, '-Infinity', '-Infinity', 0, 'null', NULL, NULL,
       NULL, '192.168.0.0/16', 'it''s', NULL),
      (4, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
       NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL)""",
]


@pytest.fixture(scope="module")
def typed(database_url: str) -> None:
    run_sql(database_url, *TYPED_SETUP)


# (parameter, value, SQL condition): PostgreSQL's answer to the condition, rows or an
# error, is what the export must give, rows or a 400 naming the parameter.
TYPED_CASES = [
    ("c", "eq.ab", "c = 'ab'"),
    ("c", "eq.abc", "c = 'abc'"),
    ("c", "eq.abcd", "c = 'abcd'"),  # longer than char(3): matches nothing, as in SQL
    ("c", "eq.ab ", "c = 'ab '"),
    ("c", "eq.", "c = ''"),
    ("c", "in.(ab,abc,abcd)", "c IN ('ab', 'abc', 'abcd')"),
    ("c", "lt.abcd", "c < 'abcd'"),
    ("c", "like.ab*", "c LIKE 'ab%'"),
    ("b", "eq.101", "b = '101'"),
    ("b", "eq.1010", "b = '1010'"),
    ("b", "eq.10", "b = '10'"),
    ("b", "eq.12", "b = '12'"),
    ("b", "gt.011", "b > '011'"),
    ("vb", "eq.10", "vb = '10'"),
    ("vb", "eq.", "vb = ''"),
    ("vb", "eq.111111", "vb = '111111'"),
    ("v", "eq.xyz", "v = 'xyz'"),
    ("v", "eq.xyzw", "v = 'xyzw'"),
    ("v", "lt.zzzz", "v < 'zzzz'"),
    ("n", "eq.1.01", "n = '1.01'"),
    ("n", "eq.1.005", "n = '1.005'"),  # not rounded to the column's scale first
    ("n", "gt.999.985", "n > '999.985'"),
    ("n", "eq.NaN", "n = 'NaN'"),
    ("n", "lt.NaN", "n < 'NaN'"),
    ("n", "lt.Infinity", "n < 'Infinity'"),  # an error before PostgreSQL 14
    ("n", "eq.1e1000000", "n = '1e1000000'"),
    ("n", "eq.12345678", "n = '12345678'"),  # beyond numeric(5,2): no overflow, no match
    ("n", "eq.", "n = ''"),
    ("n", "eq. 1.01 ", "n = ' 1.01 '"),
    ("ts", "eq.2026-01-01 10:00:00", "ts = '2026-01-01 10:00:00'"),
    ("ts", "eq.2026-01-01 10:00:00.4", "ts = '2026-01-01 10:00:00.4'"),  # not rounded
    ("ts", "eq.infinity", "ts = 'infinity'"),
    ("ts", "lt.epoch", "ts < 'epoch'"),
    ("ts", "gt.294277-01-01", "ts > '294277-01-01'"),
    ("ts", "gt.2026-02-30", "ts > '2026-02-30'"),
    ("tz", "eq.2026-01-01 10:00:00.123Z", "tz = '2026-01-01 10:00:00.123Z'"),
    ("tz", "eq.2026-01-01 10:00:00.1234Z", "tz = '2026-01-01 10:00:00.1234Z'"),
    ("tz", "eq.-infinity", "tz = '-infinity'"),
    ("t", "eq.10:00:00.4", "t = '10:00:00.4'"),
    ("t", "eq.10:00", "t = '10:00'"),
    ("t", "lt.24:00:00", "t < '24:00:00'"),
    ("t", "lt.25:00:00", "t < '25:00:00'"),
    ("iv", "eq.1 day", "iv = '1 day'"),
    ("iv", "eq.1 day 3 hours", "iv = '1 day 3 hours'"),  # not cut to whole days
    ("iv", "gt.P1D", "iv > 'P1D'"),
    ("iv", "eq.a while", "iv = 'a while'"),
    ("ym", "eq.14 months", "ym = '14 months'"),
    ("ym", "eq.1 year 2 months 3 days", "ym = '1 year 2 months 3 days'"),
    ("d", "eq.5", "d = '5'"),
    ("d", "eq.-1", "d = '-1'"),  # outside the domain: compared as its base type, as SQL does
    ("d", "eq.2147483648", "d = '2147483648'"),
    ("dd", "eq.50", "dd = '50'"),
    ("dd", "eq.500", "dd = '500'"),
    ("dd", "in.(1,99,-5)", "dd IN ('1', '99', '-5')"),
    ("m", "eq.10.01", "m = '10.01'"),
    ("m", "eq.10.005", "m = '10.005'"),  # a domain over numeric(12,2): not rounded either
    ("m", "lt.-9999999999.989", "m < '-9999999999.989'"),
    ("mo", "eq.ok", "mo = 'ok'"),
    ("mo", "gt.sad", "mo > 'sad'"),
    ("mo", "in.(ok,happy)", "mo IN ('ok', 'happy')"),
    ("mo", "eq.nope", "mo = 'nope'"),
    ("mo", "eq.OK", "mo = 'OK'"),
    ("ca", "eq.{ab,c}", "ca = '{ab,c}'"),
    ("ca", "eq.{abc}", "ca = '{abc}'"),
    ("ca", 'eq.{"a "}', "ca = '{\"a \"}'"),
    ("ca", "eq.{ab", "ca = '{ab'"),
    ("ia", "eq.{1,2}", "ia = '{1,2}'"),
    ("ia", "eq.{NULL}", "ia = '{NULL}'"),
    ("ia", "eq.{1,x}", "ia = '{1,x}'"),
    ("ia", "gt.{}", "ia > '{}'"),
    ("da", "eq.{1,2}", "da = '{1,2}'"),
    ("da", "eq.{-1}", "da = '{-1}'"),  # the domain's check holds for array elements
    ("f", "eq.NaN", "f = 'NaN'"),
    ("f", "eq.-Infinity", "f = '-Infinity'"),
    ("f", "gt.-inf", "f > '-inf'"),
    ("f", "eq.1e400", "f = '1e400'"),
    ("f", "eq.0.1", "f = '0.1'"),
    ("r", "eq.Infinity", "r = 'Infinity'"),
    ("r", "eq.0.1", "r = '0.1'"),
    ("r", "eq.1e39", "r = '1e39'"),
    ("sm", "eq.32767", "sm = '32767'"),
    ("sm", "eq.32768", "sm = '32768'"),
    ("sm", "in.(-32768,0)", "sm IN ('-32768', '0')"),
    ("sm", "in.(,)", "sm IN ('', '')"),
    ("sm", "eq.0x10", "sm = '0x10'"),  # an error before PostgreSQL 16
    ("j", "eq.{}", "j = '{}'"),  # json has no = at all
    ("j", "like.*1*", "j::text LIKE '%1%'"),
    ("j", "is.null", "j IS NULL"),
    ("p", "lt.(1,2)", "p < '(1,2)'"),  # nor has point <
    ("u", "eq.a1d0c6e8-3f02-7327-d846-1063f4ac58a6", "u = 'a1d0c6e8-3f02-7327-d846-1063f4ac58a6'"),
    ("u", "eq.A1D0C6E83F027327D8461063F4AC58A6", "u = 'A1D0C6E83F027327D8461063F4AC58A6'"),
    ("u", "eq.not-a-uuid", "u = 'not-a-uuid'"),
    ("bo", "eq.yes", "bo = 'yes'"),
    ("bo", "eq.maybe", "bo = 'maybe'"),
    ("bo", "lt.true", "bo < 'true'"),
    ("ip", "eq.10.0.0.1", "ip = '10.0.0.1'"),
    ("ip", "gt.::", "ip > '::'"),
    ("ip", "eq.300.0.0.1", "ip = '300.0.0.1'"),
    ("tx", "eq.it's", "tx = 'it''s'"),
    ("tx", "eq.", "tx = ''"),
    ("tx", "in.(\"a,b\",\"(x)\",\"\",\"it's\")", "tx IN ('a,b', '(x)', '', 'it''s')"),
    ("tx", "not.in.(x)", "NOT (tx IN ('x'))"),
    ('odd " col', "eq.q", "\"odd \"\" col\" = 'q'"),
    ("id", "eq.", "id = ''"),
    ("id", "in.(1,,2)", "id IN ('1', '', '2')"),
    ("id", "eq.NaN", "id = 'NaN'"),
    ("id", "gt.Infinity", "id > 'Infinity'"),
    ("id", "eq.1.0", "id = '1.0'"),
    ("id", "eq. 1", "id = ' 1'"),
    ("id", "eq.٣", "id = '٣'"),  # an Arabic-Indic three is no digit to PostgreSQL
]


def sql_answer(database_url: str, condition: str) -> list[int] | str:
    """The ids PostgreSQL selects, or the SQLSTATE it fails with."""
    try:
        rows = fetch(database_url, f"SELECT id FROM exports.typed WHERE {condition} ORDER BY id")
    except asyncpg.PostgresError as error:
        return str(error.sqlstate)
    return [r["id"] for r in rows]


@pytest.mark.parametrize(("parameter", "value", "condition"), TYPED_CASES)
def test_filters_on_every_type_answer_as_sql_does(
    server: Server, database_url: str, typed: None, parameter: str, value: str, condition: str
) -> None:
    expected = sql_answer(database_url, condition)
    params = [("select", "id"), ("order", "id"), (parameter, value)]
    for path in ("/datasets/typed.ndjson", "/datasets/typed.csv"):
        r = get(server, path, params)
        if isinstance(expected, str):
            assert r.status_code == 400, (expected, r.text)
            error = r.json()["error"]
            assert error["parameter"] == parameter
            assert parameter in error["message"]
        elif path.endswith(".ndjson"):
            assert ndjson_ids(r) == expected
        else:
            assert r.status_code == 200, r.text
            assert r.text.split("\n") == ["id", *map(str, expected), ""]
    head = httpx.head(server.url + "/datasets/typed.csv", params=params, timeout=TIMEOUT)
    assert head.status_code == (400 if isinstance(expected, str) else 200)


def test_some_type_cases_mean_something(database_url: str, typed: None) -> None:
    """The table above is no table of errors: the cases that were bugs select rows."""
    assert sql_answer(database_url, "c = 'abc'") == [2]
    assert sql_answer(database_url, "b = '101'") == [1]
    assert sql_answer(database_url, "n = '1.005'") == []
    assert sql_answer(database_url, "m = '10.01'") == [1]
    assert sql_answer(database_url, "mo = 'nope'") == "22P02"
    assert sql_answer(database_url, "j = '{}'") == "42883"


def test_the_listing_shows_the_column_types_with_their_modifiers(
    server: Server, typed: None
) -> None:
    datasets = {d["name"]: d for d in get(server, "/datasets").json()["datasets"]}
    types = {c["name"]: c["type"] for c in datasets["typed"]["columns"]}
    assert types["c"] == "character(3)" and types["b"] == "bit(3)"
    assert types["n"] == "numeric(5,2)" and types["iv"] == "interval day"
    assert types["d"] == "exports.t_positive" and types["ca"] == "character(2)[]"


def test_a_bad_operator_names_the_column_type(server: Server, typed: None) -> None:
    r = get(server, "/datasets/typed.csv", [("id", "lt.3"), ("p", "lt.(1,2)")])
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["parameter"] == "p"
    assert "'p' (point) cannot be compared with 'lt'" in error["message"], error
    assert "operator does not exist: point < point" in error["message"]


@pytest.mark.parametrize(
    ("query", "status"),
    [
        ("order=j", 400),
        ("order=id,p.desc", 400),
        ("order=j&j=is.null", 400),
        ("order=j&id=eq.1", 400),
        ("order=ca,ia.desc,da,m,mo,iv,ip", 200),
        ("order=tx.nullsfirst&tx=like.*'*", 200),
    ],
)
def test_ordering_by_a_type_without_an_order_is_a_400(
    server: Server, database_url: str, typed: None, query: str, status: int
) -> None:
    params = [(k, v) for k, _, v in (p.partition("=") for p in query.split("&"))]
    for method in ("GET", "HEAD"):
        r = httpx.request(method, server.url + "/datasets/typed.csv", params=params,
                          timeout=TIMEOUT)
        assert r.status_code == status, (method, r.text)
    if status == 400:
        error = r.json()["error"] if r.content else get(server, "/datasets/typed.csv",
                                                        params).json()["error"]
        assert error["parameter"] == "order"
        assert "cannot be ordered: could not identify an ordering operator" in error["message"]
    else:
        order = params[0][1].replace(".desc", " DESC").replace(".nullsfirst", " NULLS FIRST")
        where = " WHERE tx LIKE '%''%'" if len(params) > 1 else ""
        expected = [r["id"] for r in fetch(
            database_url, f"SELECT id FROM exports.typed{where} ORDER BY {order}")]
        r = get(server, "/datasets/typed.ndjson", [("select", "id"), *params])
        assert ndjson_ids(r) == expected


# --- odd input -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "status", "ids"),
    [
        ("offset=9223372036854775807", 200, []),
        ("limit=9223372036854775807&id=lte.3", 200, [1, 2, 3]),
        ("limit=0", 200, []),
        ("offset=19999", 200, [20000]),
        ("offset=9223372036854775808", 400, "offset"),
        ("amount=eq.NaN", 200, []),
        ("amount=gt.1e131072", 400, "amount"),
        ("id=gt.Infinity", 400, "id"),
        ("id=eq.NaN", 400, "id"),
        ("id=eq.", 400, "id"),
        ("id=in.(,)", 400, "id"),
        ("id=in.()", 200, []),
        ("id=not.in.()&id=lt.3", 200, [1, 2]),
        ('customer=in.("Smith, John","(x)",")",",")&id=lt.20', 200, [6, 14]),
        ('customer=in.("unterminated)', 400, "customer"),
        ("customer=in.(a", 400, "customer"),
        ("id=in.1,2)", 400, "id"),
        ("id=cs.{1}", 400, "id"),
        ("id=EQ.1", 400, "id"),
        ("id=not.not.eq.1", 400, "id"),
        ("id=.1", 400, "id"),
        ("id=not.", 400, "id"),
        ("id=", 400, "id"),
        ("id=eq.1&id=eq.2", 200, []),
        ("created_at=gt.infinity", 200, []),
        ("created_at=lt.-infinity", 200, []),
        ("created_at=eq.2026-13-01", 400, "created_at"),
        ("ship_date=gt.5874897-12-31", 200, []),
        ("ship_date=gt.5874898-01-01", 400, "ship_date"),
        ("details=lt.{}", 200, []),
        ("tags=eq.{a,{b}}", 400, "tags"),
        ('tags=eq.{tag2,"with, comma","quote\\"d"}&id=lt.10', 200, [2, 7]),
        ("order_uuid=in.(a1d0c6e8-3f02-7327-d846-1063f4ac58a6,x)", 400, "order_uuid"),
        ("paid=eq.t&id=lt.4", 200, [1, 2]),
        ("select=id,id&id=eq.1", 200, [1]),
    ],
)
def test_odd_input_answers_200_or_a_clear_400(
    server: Server, query: str, status: int, ids: list[int] | str
) -> None:
    params = [(k, v) for k, _, v in (p.partition("=") for p in query.split("&"))]
    if not any(k == "select" for k, _ in params):
        params.append(("select", "id"))
    r = get(server, "/datasets/orders.ndjson", [*params, ("order", "id")])
    assert r.status_code == status, (query, r.text)
    if status == 400:
        assert r.json()["error"]["parameter"] == ids
    else:
        assert ndjson_ids(r) == ids


def test_odd_input_to_the_audit_listing(server: Server, database_url: str) -> None:
    """GET /downloads builds the same SQL; its values are checked the same way."""
    token = new_token(database_url, f"sql-admin-{os.getpid()}", "admin")
    auth = {"Authorization": f"Bearer {token}"}
    values = [str(i) for i in range(3_000)]
    r = get(server, "/downloads", [("id", in_list(values)), ("target", "eq.a :b")], headers=auth)
    assert r.status_code == 200, r.text
    assert r.json() == []
    r = get(server, "/downloads", [("id", in_list([*values, "x"]))], headers=auth)
    assert r.status_code == 400 and r.json()["error"]["parameter"] == "id"


# --- dataset names -------------------------------------------------------------------

ODD_NAMES = [
    "a/b", "a/b/c", "x/", "dots.in.name", "with space", 'quote"d', "single'q", "100%",
    "%2F", "a%2Fb", "what?", "hash#tag", "plus+sign", "semi;colon", "back\\slash",
    "ünï 数据", "x.csv", "x.ndjson", "amp&er=sand", "tab\there", "emoji 🚀",
]


def table_sql(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


@pytest.fixture(scope="module")
def odd_tables(database_url: str) -> dict[str, int]:
    """Each odd name, a table of its own number of rows."""
    rows = {name: i + 1 for i, name in enumerate(ODD_NAMES)}
    for name, count in rows.items():
        run_sql(database_url, f"DROP TABLE IF EXISTS exports.{table_sql(name)}",
                f"CREATE TABLE exports.{table_sql(name)} AS"
                f" SELECT n, {count} AS of FROM generate_series(1, {count}) AS n")
    return rows


def expected_csv(count: int) -> bytes:
    return ("n,of\n" + "".join(f"{i},{count}\n" for i in range(1, count + 1))).encode()


def test_listed_urls_of_odd_dataset_names_work(
    server: Server, odd_tables: dict[str, int]
) -> None:
    listed = {d["name"]: d for d in get(server, "/datasets").json()["datasets"]}
    page = get(server, "/").text
    for name, count in odd_tables.items():
        urls = listed[name]["exports"]
        assert urls["csv"] == f"{server.url}/datasets/{quote(name, safe='')}.csv"
        csv_answer = httpx.get(urls["csv"], timeout=TIMEOUT)
        assert csv_answer.status_code == 200, (name, csv_answer.text)
        assert csv_answer.content == expected_csv(count), name
        ndjson = httpx.get(urls["ndjson"], timeout=TIMEOUT)
        assert ndjson.status_code == 200, (name, ndjson.text)
        assert [json.loads(line)["n"] for line in ndjson.text.splitlines()] == list(
            range(1, count + 1)
        ), name
        # filters, and HEAD, on the same URL
        filtered = httpx.get(urls["csv"], params={"n": "gt.1"}, timeout=TIMEOUT)
        assert filtered.status_code == 200
        assert list(csv.reader(io.StringIO(filtered.text)))[1:] == [
            [str(i), str(count)] for i in range(2, count + 1)
        ]
        assert httpx.head(urls["csv"], timeout=TIMEOUT).status_code == 200
        # the page links the same URLs
        assert f'href="{urls["csv"]}"' in page, name


@pytest.mark.needs("curl")
def test_odd_dataset_names_download_with_curl(
    server: Server, odd_tables: dict[str, int]
) -> None:
    for name in ["a/b", "what?", "hash#tag", "100%"]:
        url = f"{server.url}/datasets/{quote(name, safe='')}.csv"
        done = subprocess.run(["curl", "-fsS", url], capture_output=True, timeout=60)
        assert done.returncode == 0, (name, done.stderr)
        assert done.stdout == expected_csv(odd_tables[name])


def test_a_slash_in_a_dataset_name_is_no_way_around_the_names(
    server: Server, odd_tables: dict[str, int]
) -> None:
    for path in ["/datasets/..%2Forders.csv", "/datasets/exports%2Forders.csv",
                 "/datasets/a%2Fb%2F..%2Fb.csv", "/datasets/a%2F.csv"]:
        r = get(server, path)
        assert r.status_code == 404, path
    # the plain slash means the same name
    assert get(server, "/datasets/a/b.csv").content == expected_csv(odd_tables["a/b"])
    # and /datasets/ still leads to the listing
    r = get(server, "/datasets/", follow_redirects=True)
    assert r.status_code == 200 and "datasets" in r.json()


@pytest.fixture(scope="module")
def link_token(database_url: str) -> Iterator[str]:
    name = f"sql-links-{os.getpid()}"
    token = new_token(database_url, name, "datasets:*")  # checks its form
    yield token


def test_links_to_odd_dataset_names(
    server: Server, odd_tables: dict[str, int], link_token: str
) -> None:
    listed = {d["name"]: d for d in get(server, "/datasets").json()["datasets"]}
    for name, count in odd_tables.items():
        path = listed[name]["exports"]["csv"].removeprefix(server.url)
        r = httpx.post(server.url + "/links", json={"url": path + "?n=lte.1"},
                       headers={"Authorization": f"Bearer {link_token}"}, timeout=TIMEOUT)
        assert r.status_code == 201, (name, r.text)
        link = r.json()["url"]
        answer = httpx.get(link, timeout=TIMEOUT)
        assert answer.status_code == 200, (name, link, answer.text)
        assert answer.content == f"n,of\n1,{count}\n".encode(), name


@pytest.mark.parametrize(
    ("target", "status"),
    [
        ("/datasets/orders.csv?note=eq.%FF%FE&limit=1", 200),
        ("/datasets/orders.csv?%FF=eq.1", 400),
        ("/datasets/orders.csv?id=eq.1%00", 400),
        ("/datasets/%FF.csv", 404),
        ("/datasets/orders.csv?note=like.abc%5C", 400),
        ("/datasets/orders.csv?note=ilike.*%5C", 400),
        ("/datasets/orders.csv?note=like.%5C%5C&limit=1", 200),
        ("/datasets/orders.csv?note=like.a%5C*b&limit=1", 200),
        ("/datasets/orders.csv?id=eq.1&id", 400),
        ("/datasets/orders.csv?&&=&id=lt.2", 400),
        ("/datasets/orders.csv?select=id&select=note", 400),
        ("/datasets/orders.csv?order=id.desc.asc&limit=1", 200),
        ("/datasets/orders.csv?order=,id", 400),
    ],
)
def test_raw_odd_requests(server: Server, target: str, status: int) -> None:
    r = raw_request(server.url, f"GET {target} HTTP/1.1")
    assert r.status == status, (target, r.body[:300])
    if status >= 400:
        assert json.loads(r.body)["error"]["status"] == status
