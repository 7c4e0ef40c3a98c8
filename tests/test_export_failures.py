"""Exports that do not end well: clients that leave, databases that fail, timeouts.
Also memory, snapshot consistency and the audit trail."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from exporter.embedded import EmbeddedPostgres
from tests.support import (
    Server,
    audited,
    fetch,
    last_audit_id,
    peak_rss_bytes,
    reset_peak_rss,
    rss_bytes,
    run_sql,
    wait_until,
)

ACTIVE_COPIES = (
    "SELECT pid FROM pg_stat_activity WHERE application_name = 'exporter'"
    " AND query LIKE 'COPY%' AND state <> 'idle'"
)


@pytest.fixture(scope="module")
def long_views(database_url: str) -> None:
    run_sql(
        database_url,
        # Hours of output: an export that is still running when the client leaves.
        # (generate_series in the select list streams; in FROM it is materialised first.)
        "CREATE OR REPLACE VIEW exports.endless AS"
        " SELECT generate_series(1, 1000000000) AS id, repeat('x', 200) AS pad",
        # A query still working, long before its first row.
        "CREATE OR REPLACE VIEW exports.sleepy AS SELECT 1 AS n FROM pg_sleep(60)",
        # 2,000,000 rows of about the width of the demo table.
        "CREATE OR REPLACE VIEW exports.two_million AS"
        " SELECT g AS id, md5(g::text) AS hash, g * 1.25 AS amount,"
        " timestamptz '2026-01-01' + g * interval '1 second' AS at, repeat('y', 60) AS pad"
        " FROM (SELECT generate_series(1, 2000000) AS g) AS s",
    )


def active_copies(database_url: str) -> list[int]:
    return [r["pid"] for r in fetch(database_url, ACTIVE_COPIES)]


def pool_checked_out(server: Server) -> int:
    pool: dict[str, int] = httpx.get(server.url + "/healthz").json()["pool"]
    # /healthz itself holds one connection while it answers
    return pool["checked_out"]


def last_audit(database_url: str, target: str) -> dict[str, object]:
    """The newest audit row of the target, once it is closed (rows are written in batches)."""
    return audited(database_url, "id = (SELECT max(id) FROM exporter.downloads"
                   " WHERE target = $1)", target)[-1]


def test_client_leaving_cancels_the_query_and_frees_the_connection(
    server: Server, database_url: str, long_views: None
) -> None:
    """Exports dropped by the client, half mid-stream and half before the first row,
    again and again (ten rounds: a leak of one connection a round fills the pool)."""
    for i in range(10):
        if i % 2 == 0:
            with httpx.stream("GET", server.url + "/datasets/endless.csv", timeout=30) as r:
                assert r.status_code == 200
                received = 0
                for chunk in r.iter_raw():
                    received += len(chunk)
                    if received > 200_000:
                        break
        else:
            with pytest.raises(httpx.ReadTimeout):
                httpx.get(server.url + "/datasets/sleepy.csv", timeout=0.3)
        # That the query goes, not how fast (a timed bound fails on a busy machine): the
        # deadline only bounds the wait.
        assert wait_until(lambda: active_copies(database_url) == [], 15), \
            f"round {i}: query still running"
        assert wait_until(lambda: pool_checked_out(server) == 0, 15), f"round {i}"

    connections = fetch(
        database_url,
        "SELECT count(*) AS n FROM pg_stat_activity WHERE application_name = 'exporter'",
    )[0]["n"]
    assert connections <= 10  # the pool's size: nothing leaked
    assert last_audit(database_url, "endless")["status"] == "aborted"
    assert wait_until(lambda: last_audit(database_url, "sleepy")["status"] == "aborted", 2)
    assert httpx.get(server.url + "/datasets/orders.csv?limit=3").status_code == 200


def _start_endless_download(argv: list[str], cwd: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.mark.parametrize(
    ("client", "exit_code"),
    [
        pytest.param(["curl", "-sS", "--limit-rate", "2M", "-o", "out.csv"], 18,
                     marks=pytest.mark.needs("curl")),
        pytest.param(["wget", "-q", "--limit-rate=2m", "--tries=1", "-O", "out.csv"], 4,
                     marks=pytest.mark.needs("wget")),
    ],
)
def test_database_failing_mid_export_cuts_the_response(
    server: Server, database_url: str, long_views: None, tmp_path: Path,
    client: list[str], exit_code: int,
) -> None:
    # Earlier tests' rows of `endless` written first: the newest row is then this one's.
    before = last_audit_id(database_url, server.url)
    process = _start_endless_download([*client, server.url + "/datasets/endless.csv"], tmp_path)
    try:
        assert wait_until(lambda: (tmp_path / "out.csv").exists()
                          and (tmp_path / "out.csv").stat().st_size > 100_000, 10)
        pids = active_copies(database_url)
        assert len(pids) == 1
        run_sql(database_url, f"SELECT pg_terminate_backend({pids[0]})")
        # The cut reaches the client after what is buffered on the way, at 2 MB/s: the
        # loopback socket buffers of a slow reader grow to tens of MiB. The endless view
        # never ends on its own, so a missing cut still fails here.
        assert process.wait(60) == exit_code
    finally:
        process.kill()
        process.wait()
    assert (tmp_path / "out.csv").stat().st_size > 100_000  # partial, and known to be
    assert "export" in server.log() and "failed" in server.log()
    [audit] = audited(database_url, "id > $1 AND target = 'endless'", before)
    assert audit["status"] == "failed"
    assert "connection was closed" in str(audit["error"]) or "terminat" in str(audit["error"])
    # and the server keeps serving
    assert httpx.get(server.url + "/datasets/orders.csv?limit=3").status_code == 200
    assert wait_until(lambda: pool_checked_out(server) == 0, 10)


def test_statement_timeout_gives_504_and_cancels(
    make_server: type[Server], database_url: str, long_views: None
) -> None:
    with make_server({"EXPORTER_STATEMENT_TIMEOUT": "1"}) as s:
        started = time.monotonic()
        r = httpx.get(s.url + "/datasets/sleepy.csv", timeout=30)
        assert r.status_code == 504
        assert "1 s" in r.json()["error"]["message"]
        # Cut by the timeout, not by the view's 60 s sleep; generous for a busy machine.
        assert time.monotonic() - started < 30
        assert wait_until(lambda: active_copies(database_url) == [], 15)
        assert last_audit(database_url, "sleepy")["http_status"] == 504


def test_database_unreachable_gives_503(make_server: type[Server], tmp_path: Path) -> None:
    pg = EmbeddedPostgres(tmp_path / "pg")
    url = pg.start()
    try:
        with make_server(url=url) as s:
            run_sql(url, "CREATE SCHEMA exports", "CREATE VIEW exports.v AS SELECT 1 AS n")
            assert httpx.get(s.url + "/datasets/v.csv").content == b"n\n1\n"
            pg.stop()
            r = httpx.get(s.url + "/datasets/v.csv", timeout=30)
            assert r.status_code == 503
            assert r.json()["error"]["message"].startswith("the database is unavailable")
            assert httpx.get(s.url + "/datasets", timeout=30).status_code == 503
            assert httpx.get(s.url + "/healthz", timeout=30).status_code == 503
    finally:
        pg.stop()


def test_server_starts_without_a_database_and_answers_503(make_server: type[Server]) -> None:
    bad_url = "postgresql://postgres@127.0.0.1:9/nothing"
    command = [sys.executable, "-m", "uvicorn", "--factory", "exporter.app:create_app",
               "--host", "127.0.0.1"]
    s = make_server(url=bad_url)
    s.command = [*command, "--port", str(s.port)]
    with s:
        r = httpx.get(s.url + "/datasets/orders.csv", timeout=30)
        assert r.status_code == 503
        assert r.json()["error"]["status"] == 503


def test_memory_stays_flat_for_two_million_rows(
    memory_server: Server, long_views: None
) -> None:
    """Peak RSS of the server while exporting 2,000,000 rows (about 200 MB of CSV) must
    stay within 40 MiB of its peak after a 10-row export: the export is streamed."""
    s = memory_server
    reset_peak_rss(s.pid)
    assert httpx.get(s.url + "/datasets/two_million.csv?limit=10").status_code == 200
    baseline = peak_rss_bytes(s.pid)
    total = 0
    # Identity: the raw bytes are the CSV (httpx asks for gzip and zstd by itself).
    with httpx.stream("GET", s.url + "/datasets/two_million.csv",
                      headers={"Accept-Encoding": "identity"}, timeout=120) as r:
        for chunk in r.iter_raw():
            total += len(chunk)
    assert total > 200_000_000
    peak = peak_rss_bytes(s.pid)
    growth = peak - baseline
    print(f"baseline peak {baseline / 2**20:.1f} MiB, peak {peak / 2**20:.1f} MiB")
    assert growth < 40 * 2**20, f"grew by {growth / 2**20:.1f} MiB"
    assert rss_bytes(s.pid) < 200 * 2**20


def test_export_runs_in_one_read_only_repeatable_read_snapshot(
    server: Server, database_url: str
) -> None:
    run_sql(
        database_url,
        "CREATE OR REPLACE VIEW exports.txinfo AS SELECT"
        " current_setting('transaction_isolation') AS isolation,"
        " current_setting('transaction_read_only') AS read_only",
    )
    r = httpx.get(server.url + "/datasets/txinfo.csv")
    assert r.content == b"isolation,read_only\nrepeatable read,on\n"


def test_rows_written_during_an_export_do_not_appear_in_it(
    server: Server, database_url: str
) -> None:
    run_sql(
        database_url,
        "DROP TABLE IF EXISTS exports.moving",
        "CREATE TABLE exports.moving AS SELECT g AS id, 0 AS v FROM generate_series(1, 300000) g",
    )
    body = bytearray()
    with httpx.stream("GET", server.url + "/datasets/moving.csv",
                      headers={"Accept-Encoding": "identity"}, timeout=60) as r:
        chunks = r.iter_raw()
        body += next(chunks)
        run_sql(database_url, "UPDATE exports.moving SET v = 1",
                "INSERT INTO exports.moving SELECT g, 2 FROM generate_series(300001, 300100) g")
        for chunk in chunks:
            body += chunk
    lines = bytes(body).decode().splitlines()
    assert lines[0] == "id,v"
    assert len(lines) == 300_001
    assert {line.split(",")[1] for line in lines[1:]} == {"0"}


def test_first_bytes_leave_before_the_query_ends(server: Server, database_url: str) -> None:
    run_sql(
        database_url,
        "CREATE OR REPLACE VIEW exports.stalls AS SELECT g, repeat('z', 100) AS pad"
        " FROM (SELECT generate_series(1, 20001) AS g) AS s"
        " WHERE CASE WHEN g <= 20000 THEN true ELSE pg_sleep(4) IS NOT NULL END",
    )
    started = time.monotonic()
    with httpx.stream("GET", server.url + "/datasets/stalls.csv",
                      headers={"Accept-Encoding": "identity"}, timeout=30) as r:
        chunks = r.iter_raw()
        first = next(chunks)
        # The query is still running (its last row sleeps 4 s) when the first bytes are
        # here: an event, where a time bound would fail on a busy machine.
        running_at_first_bytes = active_copies(database_url)
        rest = b"".join(chunks)
    total_at = time.monotonic() - started
    assert first.startswith(b"g,pad\n1,zzz")
    assert total_at > 4
    assert running_at_first_bytes, "the first bytes came after the query had ended"
    assert len(first + rest) > 2_000_000


def test_audit_records_a_complete_export(server: Server, database_url: str) -> None:
    # Identity: the audit counts the bytes sent, compressed ones when the body is.
    r = httpx.get(server.url + "/datasets/orders.ndjson?id=lte.1234&select=id,note",
                  headers={"Accept-Encoding": "identity"})
    assert r.status_code == 200

    def written() -> bool:
        # Rows are written in batches: until this one is, the last row is another test's.
        rows = fetch(database_url, "SELECT * FROM exporter.downloads WHERE target = 'orders'"
                     " ORDER BY id DESC LIMIT 1")
        return bool(rows) and rows[0]["format"] == "ndjson" and rows[0]["status"] == "complete"

    assert wait_until(written, 5)
    audit = last_audit(database_url, "orders")
    assert audit["format"] == "ndjson"
    assert audit["rows"] == 1234
    assert audit["bytes"] == len(r.content)
    assert audit["params"] == '{"id": ["lte.1234"], "select": ["id,note"]}'
    assert audit["client"] == "127.0.0.1"
    assert audit["http_status"] == 200
    assert audit["ended_at"] is not None and audit["started_at"] <= audit["ended_at"]

    assert httpx.get(server.url + "/datasets/orders.csv?id=gt.zzz").status_code == 400
