"""XLSX exports, read back by openpyxl and by LibreOffice headless: typed cells equal to
what PostgreSQL returns, the sheets' split, and a cut download that no reader opens."""

from __future__ import annotations

import asyncio
import csv
import html
import io
import math
import re
import subprocess
import time
import zipfile
from collections.abc import Iterator
from datetime import date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import openpyxl
import pytest

from exporter.config import Settings
from exporter.db import create_engine
from exporter.exports.catalog import Catalog, Dataset
from exporter.exports.query import parse
from exporter.exports.renderers.xlsx import (
    EXACT_INTEGER,
    MEDIA_TYPE,
    XLSX,
    Layout,
    Workbook,
    kind_of,
    sheet_name,
    unescape,
)
from exporter.exports.sql import select_sql
from tests.support import Server, asyncpg_dsn, fetch, psql, run_sql

TABLE = "xlsx_types"
TEXTS = ["Zoë Müller 李雷 🚀", "=1+2", "+SUM(A1)", "-2+3", "@cmd", "ctl \x01\x02\x1f end",
         "_x0041_ stays _x005F_x0041_", "<&>]]> \r\n and a\ttab", "", "  spaces  ", None]
COLUMNS = [("id", "integer"), ("i", "integer"), ("big", "bigint"), ("exact", "numeric"),
           ("money", "numeric(10,2)"), ("f", "double precision"), ("d", "date"),
           ("t", "time without time zone"), ("ts", "timestamp without time zone"),
           ("tstz", "timestamp with time zone"), ("b", "boolean"), ("txt", "text"),
           ("j", "jsonb")]
ROWS = [
    "1, 42, 9007199254740993, 12345678901234567890.123, 1234.50, 1.5, '2026-12-05',"
    " '11:19:00', '2026-12-05 11:19:00.250', '2026-12-05 11:19:00+02', true, NULL,"
    " '{\"a\": [1, \"x\"]}'",
    "2, -7, -9007199254740992, 0.1, -0.5, 'NaN', '1899-12-31', '00:00:00',"
    " '1900-03-01 00:00:00', 'infinity', false, NULL, 'null'",
    "3, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL",
    "4, 0, 9007199254740992, 'NaN', 0.00, '-Infinity', '9999-12-31', '23:59:59.5',"
    " '2000-02-29 23:59:59', '1969-07-20 20:17:40+00', NULL, NULL, NULL",
    "5, 2147483647, 1, 123456789012345, 99999999.99, 1e300, '1900-03-01', '12:00:00',"
    " 'infinity', '2026-01-01 00:00:00.001+00', true, NULL, NULL",
]


@pytest.fixture(scope="module")
def types_table(database_url: str) -> Iterator[str]:
    run_sql(database_url, f"DROP TABLE IF EXISTS exports.{TABLE}",
            f"CREATE TABLE exports.{TABLE} ({', '.join(f'{n} {t}' for n, t in COLUMNS)})",
            *[f"INSERT INTO exports.{TABLE} VALUES ({row})" for row in ROWS])
    for n, text in enumerate(TEXTS, start=10):
        asyncio.run(_insert_text(database_url, n, text))
    yield TABLE
    run_sql(database_url, f"DROP TABLE IF EXISTS exports.{TABLE}")


async def _insert_text(url: str, n: int, text: str | None) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        await conn.execute(f"INSERT INTO exports.{TABLE} (id, txt) VALUES ($1, $2)", n, text)
    finally:
        await conn.close()


def get_xlsx(server: Server, query: str = "order=id", table: str = TABLE) -> bytes:
    r = httpx.get(f"{server.url}/datasets/{table}.xlsx?{query}", timeout=60,
                  headers={"Accept-Encoding": "gzip, zstd"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == MEDIA_TYPE
    # Compressed inside: never a content coding on top.
    assert "content-encoding" not in r.headers
    assert r.headers["content-disposition"].endswith('.xlsx"') or ".xlsx" in r.headers[
        "content-disposition"]
    return r.content


def expected(value: Any, pg_type: str, text: str | None) -> Any:
    """What a reader should find in the cell of `value` (asyncpg's), whose text in
    psql is `text`, by the README's rules."""
    if value is None:
        return None
    kind = kind_of(pg_type)
    if kind == "integer" or kind == "boolean":
        return value
    if kind == "bigint":
        return value if abs(value) <= EXACT_INTEGER else text
    if kind == "numeric":
        assert isinstance(value, Decimal)
        digits = len(value.normalize().as_tuple().digits) if value.is_finite() else 99
        return float(value) if digits <= 15 else text
    if kind == "float":
        return text if math.isnan(value) or math.isinf(value) else value
    if kind == "date":
        if isinstance(value, date) and date(1900, 3, 1) <= value:
            return datetime(value.year, value.month, value.day)
        return text
    if kind in ("timestamp", "timestamptz"):
        # (asyncpg reads infinity as datetime's max)
        if text in ("infinity", "-infinity") or value.replace(tzinfo=None) < datetime(1900, 3, 1):
            return text
        # A serial number holds milliseconds as readers round them.
        return value.replace(tzinfo=None)
    if kind == "time":
        return value
    return text


def test_openpyxl_reads_typed_cells_equal_to_psql(server: Server, database_url: str,
                                                  types_table: str) -> None:
    book = openpyxl.load_workbook(io.BytesIO(get_xlsx(server)))
    assert book.sheetnames == [TABLE]
    sheet = book[TABLE]
    assert sheet.freeze_panes == "A2"
    rows = list(sheet.iter_rows(values_only=True))
    names = [n for n, _ in COLUMNS]
    types = [t for _, t in COLUMNS]
    assert list(rows[0]) == [f"{n} (UTC)" if n == "tstz" else n for n in names]
    typed = fetch(database_url, f"SELECT * FROM exports.{TABLE} ORDER BY id")
    texts = fetch(database_url, "SELECT " + ", ".join(f"x.{n}::text AS {n}" for n in names)
                  + f" FROM exports.{TABLE} AS x ORDER BY x.id")
    assert len(rows) == 1 + len(typed) == 1 + len(ROWS) + len(TEXTS)
    for got, row, text in zip(rows[1:], typed, texts, strict=True):
        for i, (name, pg_type) in enumerate(zip(names, types, strict=True)):
            want = expected(row[name], pg_type, text[name])
            cell = got[i]
            if kind_of(pg_type) == "text" and isinstance(cell, str):
                cell = unescape(cell)  # ECMA-376's _xHHHH_, which openpyxl leaves as is
            if isinstance(want, datetime) and isinstance(cell, datetime):
                assert abs(cell - want) <= timedelta(milliseconds=1), (name, row["id"])
            else:
                assert cell == want, (name, row["id"], cell, want)


def test_text_is_never_a_formula(server: Server, types_table: str) -> None:
    raw = get_xlsx(server, "select=txt&order=id&id=gte.10")
    with zipfile.ZipFile(io.BytesIO(raw)) as z:
        sheet = z.read("xl/worksheets/sheet1.xml").decode()
        assert "<f>" not in sheet and "<f " not in sheet
    book = openpyxl.load_workbook(io.BytesIO(raw))
    cells = [c[0] for c in book.active.iter_rows(min_row=2, values_only=True)]
    assert [None if c is None else unescape(c) for c in cells] == TEXTS
    kinds = [c[0].data_type for c in book.active.iter_rows(min_row=2)]
    assert set(kinds) <= {"s", "n"}  # strings, and the NULL's empty cell


def test_select_types_cells_by_what_it_gives(server: Server, database_url: str) -> None:
    """Casts, JSON paths and repeated names: cells by the type of the result's column."""
    raw = get_xlsx(server, "select=a:id,a:note,src:details->>source,amount::text,"
                   "day:created_at::date&id=lte.3&order=id", table="orders")
    rows = list(openpyxl.load_workbook(io.BytesIO(raw)).active.iter_rows(values_only=True))
    assert rows[0] == ("a", "a", "src", "amount", "day")
    want = fetch(database_url, "SELECT id, note, details->>'source' AS src, amount::text AS"
                 " amount, (created_at AT TIME ZONE 'UTC')::date AS day FROM exports.orders"
                 " WHERE id <= 3 ORDER BY id")
    assert [r[:4] for r in rows[1:]] == [
        (w["id"], w["note"], w["src"], w["amount"]) for w in want]
    assert [r[4] for r in rows[1:]] == [datetime.combine(w["day"], datetime.min.time())
                                        for w in want]


def test_an_empty_result_is_a_sheet_with_its_header(server: Server, types_table: str) -> None:
    book = openpyxl.load_workbook(io.BytesIO(get_xlsx(server, "id=lt.0&select=id,d")))
    assert list(book.active.iter_rows(values_only=True)) == [("id", "d")]


def test_accept_negotiates_xlsx_and_the_catalog_lists_it(server: Server,
                                                         types_table: str) -> None:
    r = httpx.get(f"{server.url}/datasets/{TABLE}?order=id", headers={"Accept": MEDIA_TYPE},
                  timeout=60)
    assert r.status_code == 200 and r.headers["content-type"] == MEDIA_TYPE
    assert openpyxl.load_workbook(io.BytesIO(r.content)).active.max_row == 1 + len(ROWS) + len(
        TEXTS)
    listing = httpx.get(f"{server.url}/datasets", timeout=30).json()
    entry = next(d for d in listing["datasets"] if d["name"] == TABLE)
    assert entry["exports"]["xlsx"] == f"{server.url}/datasets/{TABLE}.xlsx"
    assert not any(k.startswith("xlsx.") for k in entry["compressed_exports"])


@pytest.mark.needs("soffice")
def test_libreoffice_opens_it_with_the_same_values(server: Server, database_url: str,
                                                   types_table: str, tmp_path: Path) -> None:
    columns = "id,i,money,d,ts,tstz,b,txt"
    (tmp_path / "in.xlsx").write_bytes(get_xlsx(server, f"select={columns}&order=id"))
    subprocess.run(
        ["soffice", "--headless", f"-env:UserInstallation=file://{tmp_path}/profile",
         "--convert-to", "csv:Text - txt - csv (StarCalc):44,34,76,1", "--outdir",
         str(tmp_path), str(tmp_path / "in.xlsx")],
        check=True, capture_output=True, timeout=120)
    got = list(csv.reader(io.StringIO((tmp_path / "in.csv").read_text("utf-8"), newline="")))
    # Dates and times as their formats show them (to the second), booleans as Calc
    # writes them; the rest as psql does.
    want = psql(database_url, "-c", (
        "\\copy (SELECT id, i, money::float8, to_char(d, 'YYYY-MM-DD'),"
        " CASE WHEN ts = 'infinity' THEN 'infinity' ELSE to_char(ts, 'YYYY-MM-DD HH24:MI:SS')"
        " END, CASE WHEN tstz = 'infinity' THEN 'infinity' ELSE"
        " to_char(tstz AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS') END,"
        " CASE b WHEN true THEN 'TRUE' WHEN false THEN 'FALSE' END, txt"
        f" FROM exports.{TABLE} ORDER BY id) TO STDOUT (FORMAT csv)"))
    expected_rows = list(csv.reader(io.StringIO(want.decode(), newline="")))
    assert got[0] == ["id", "i", "money", "d", "ts", "tstz (UTC)", "b", "txt"]
    # Calc's cells break lines with \n alone.
    expected_rows = [[v.replace("\r\n", "\n") for v in row] for row in expected_rows]
    assert got[1:] == expected_rows


def test_a_database_failure_mid_export_leaves_a_zip_no_reader_opens(
        server: Server, database_url: str) -> None:
    run_sql(database_url, "CREATE OR REPLACE VIEW exports.xlsx_breaks AS SELECT i,"
            " CASE WHEN i < 300000 THEN i ELSE 1 / (i - i) END AS n,"
            " md5(i::text) AS note FROM generate_series(1, 400000) AS i")
    try:
        body = bytearray()
        with (pytest.raises(httpx.RemoteProtocolError),
              httpx.stream("GET", f"{server.url}/datasets/xlsx_breaks.xlsx",
                           timeout=60) as r):
            assert r.status_code == 200
            for piece in r.iter_raw():
                body += piece
        assert len(body) > 10_000
        with pytest.raises(zipfile.BadZipFile):
            zipfile.ZipFile(io.BytesIO(bytes(body)))
        with pytest.raises(zipfile.BadZipFile):
            openpyxl.load_workbook(io.BytesIO(bytes(body)))
    finally:
        run_sql(database_url, "DROP VIEW IF EXISTS exports.xlsx_breaks")


def test_the_first_rows_leave_while_the_query_still_runs(server: Server,
                                                         database_url: str) -> None:
    """The workbook's first bytes go as soon as the first rows come, not with the next
    batch: a query that then works for long is still answered at once."""
    run_sql(database_url, "CREATE OR REPLACE VIEW exports.xlsx_slow AS SELECT i,"
            " md5(i::text) AS note FROM generate_series(1, 3000) AS i"
            " WHERE i < 3000 OR (SELECT true FROM pg_sleep(20) WHERE i > 0)")
    try:
        started = time.monotonic()
        with httpx.stream("GET", f"{server.url}/datasets/xlsx_slow.xlsx", timeout=60) as r:
            assert r.status_code == 200
            first = next(r.iter_raw())
            assert time.monotonic() - started < 10  # the query sleeps 20 s at its end
            assert first.startswith(b"PK\x03\x04")
    finally:
        run_sql(database_url, "DROP VIEW IF EXISTS exports.xlsx_slow")


def test_rows_continue_on_a_next_sheet_with_its_header(database_url: str,
                                                       types_table: str) -> None:
    """The rule with 4 rows a sheet (a real sheet holds 1,048,575): the COPY's own bytes,
    fed in pieces that split rows anywhere."""
    dataset = _dataset(database_url)
    query = parse(dataset, [("select", "id,txt"), ("order", "id")])
    renderer = XLSX.for_query(query)
    statement = renderer.body(select_sql(query))
    raw = psql(database_url, "-c", f"\\copy ({statement.query}) TO STDOUT"
               " (FORMAT csv, QUOTE E'\\x01', DELIMITER E'\\x02')")
    layout = Layout(TABLE, tuple(query.result_columns()), rows_per_sheet=4)
    book = Workbook(layout)
    out = book.start()
    for at in range(0, len(raw), 7):
        out += book.rows(raw[at:at + 7])
    out += book.finish()
    read = openpyxl.load_workbook(io.BytesIO(out))
    total = len(ROWS) + len(TEXTS)
    sheets = -(-total // 4)
    assert read.sheetnames == [TABLE] + [f"{TABLE} ({n})" for n in range(2, sheets + 1)]
    ids = []
    for sheet in read.worksheets:
        rows = list(sheet.iter_rows(values_only=True))
        assert rows[0] == ("id", "txt") and sheet.freeze_panes == "A2"
        assert 1 <= len(rows) - 1 <= 4
        ids += [r[0] for r in rows[1:]]
    assert ids == [r["id"] for r in fetch(database_url,
                                           f"SELECT id FROM exports.{TABLE} ORDER BY id")]


def test_stored_xlsx_export_is_the_same_workbook(server: Server, types_table: str) -> None:
    r = httpx.get(f"{server.url}/datasets/{TABLE}.xlsx?order=id",
                  headers={"Prefer": "respond-async"}, timeout=30)
    assert r.status_code == 202, r.text
    deadline = time.monotonic() + 60
    while (status := httpx.get(server.url + r.headers["location"], timeout=30)).status_code \
            == 202 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert status.status_code == 200, status.text
    manifest = status.json()
    assert manifest["format"] == "xlsx" and manifest["filename"].endswith(".xlsx")
    assert manifest["rows"] == len(ROWS) + len(TEXTS)
    stored = httpx.get(manifest["file_url"], timeout=30)
    assert stored.headers["content-type"] == MEDIA_TYPE
    streamed = openpyxl.load_workbook(io.BytesIO(get_xlsx(server)))
    kept = openpyxl.load_workbook(io.BytesIO(stored.content))
    assert list(kept.active.iter_rows(values_only=True)) == list(
        streamed.active.iter_rows(values_only=True))


def _dataset(url: str) -> Dataset:
    async def load() -> Dataset:
        engine = create_engine(Settings(), url)
        try:
            return (await Catalog(engine, "exports").reload())[TABLE]
        finally:
            await engine.dispose()

    return asyncio.run(load())


def test_sheet_names_are_what_excel_allows() -> None:
    layout = Layout("a&b<c>'d\x01[x]:*?/\\ and a name longer than thirty-one", ())
    names = re.findall(r'<sheet name="([^"]*)"', layout.workbook(2).decode())
    assert [html.unescape(n) for n in names] == [
        "a&b<c>'d__x______ and a name lo", "a&b<c>'d__x______ and a nam (2)"]
    assert sheet_name("'quoted'", 1) == "quoted" and sheet_name("", 3) == "export (3)"
