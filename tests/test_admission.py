"""One admission for every request that uses the database for an export (issue 20, item
3): a HEAD with a count takes the principal's slot like a GET, is audited and logged,
runs under EXPORTER_STATEMENT_TIMEOUT, and is cancelled on the server when its client
leaves; regular expressions are bounded in size and in compile time; a stored export has
the same deadline and stops when its token is revoked."""

from __future__ import annotations

import json
import os
import random
import sys
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from exporter.exports.sql import MAX_PATTERN_LENGTH
from tests.support import Server, audited, fetch, run_sql, wait_until
from tests.test_access import bearer, new_token

# Over 30 s per row of 100+ characters in PostgreSQL's regex engine (backtracking over
# the back references), so a count of three rows runs for minutes unless stopped.
SLOW_REGEX = r"^(.*?)(.*?)(.*?)(.*?)(.*?)\5\4\3\2\1$"
# About 6 s to compile alone, however short the text it is matched against.
COMPILE_BOMB = r"((.{0,18}){0,18}){0,18}x\1"
BAIT = "regex_bait"
ANSWERED_WITHIN = 2.0  # seconds after the client left, no backend runs its query


@pytest.fixture(scope="module")
def bait(database_url: str) -> Iterator[str]:
    run_sql(database_url,
            f"CREATE TABLE IF NOT EXISTS exports.{BAIT} (id int PRIMARY KEY, details text)",
            f"INSERT INTO exports.{BAIT} SELECT i, left(string_agg(md5((i * 100 + g)::text), ''),"
            f" 106) FROM generate_series(1, 3) AS i, generate_series(1, 4) AS g GROUP BY i"
            " ON CONFLICT DO NOTHING")
    yield BAIT
    # Gone with the module: other modules list the datasets of the shared database.
    run_sql(database_url, f"DROP TABLE IF EXISTS exports.{BAIT}")


@pytest.fixture(scope="module")
def logged(make_module_server: type[Server], bait: str) -> Iterator[Server]:
    """A server with its access log on, a long statement timeout (what stops the queries
    below is their client leaving) and a short wait for a slot."""
    s = make_module_server({"EXPORTER_STATEMENT_TIMEOUT": "30", "EXPORTER_LIMIT_WAIT": "0.5"})
    s.command = [sys.executable, "-m", "exporter.cli", "serve", "--port", str(s.port)]
    with s:
        yield s


@pytest.fixture(scope="module")
def short(make_module_server: type[Server], bait: str,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server with a 2 s statement timeout, and stored exports that beat every 0.2 s."""
    with make_module_server({
            "EXPORTER_STATEMENT_TIMEOUT": "2", "EXPORTER_EXPORTS_PROGRESS_INTERVAL": "0.2",
            "EXPORTER_EXPORTS_DIR": str(tmp_path_factory.mktemp("stored"))}) as s:
        yield s


def running(database_url: str, fragment: str) -> list[str]:
    """The queries of the exporter's backends now running that contain `fragment`."""
    rows = fetch(database_url, "SELECT query FROM pg_stat_activity WHERE state = 'active'"
                 " AND application_name = 'exporter' AND position($1 in query) > 0", fragment)
    return [str(r["query"]) for r in rows]


def give_up_after(method: str, url: str, seconds: float, **kw: object) -> httpx.Response | None:
    """The answer, or None if the client gave up first (and closed its connection)."""
    try:
        return httpx.request(method, url, timeout=seconds, **kw)  # type: ignore[arg-type]
    except httpx.TimeoutException:
        return None


def test_a_head_count_is_cancelled_audited_and_logged_when_its_client_leaves(
    logged: Server, database_url: str
) -> None:
    marker = random.randrange(10**8, 10**9)
    path = f"/datasets/{BAIT}.csv?id=neq.{marker}&details=match.{SLOW_REGEX}"
    answer = give_up_after("HEAD", logged.url + path, 1, headers={"Prefer": "count=exact"})
    assert answer is None, answer  # the count takes minutes
    left = time.monotonic()
    assert wait_until(lambda: not running(database_url, r"\5\4\3\2\1"), ANSWERED_WITHIN), \
        "the count went on after its client left"
    assert time.monotonic() - left < ANSWERED_WITHIN + 1
    row = audited(database_url, "target = $1 AND params->'id' ? $2", BAIT, f"neq.{marker}")[0]
    assert row["kind"] == "export"
    assert json.loads(row["params"])["method"] == ["HEAD"]
    assert row["status"] == "aborted"
    assert wait_until(lambda: f"HEAD /datasets/{BAIT}.csv?id=neq.{marker}" in logged.log(), 5)


def test_heads_of_one_anonymous_client_take_its_slots_not_the_pool(
    logged: Server, database_url: str
) -> None:
    """40 HEADs with a count that never ends, at once, from one address: the principal's
    cap (4) lets 4 run; the others get 429; the pool (30) and /healthz are untouched."""
    marker = random.randrange(10**8, 10**9)
    path = f"/datasets/{BAIT}.csv?id=neq.{marker}&details=match.{SLOW_REGEX}"
    answers: list[httpx.Response | None] = []
    lock = threading.Lock()

    def one() -> None:
        answer = give_up_after("HEAD", logged.url + path, 4, headers={"Prefer": "count=exact"})
        with lock:
            answers.append(answer)

    threads = [threading.Thread(target=one) for _ in range(40)]
    for t in threads:
        t.start()
    most = 0
    healthy = True
    while any(t.is_alive() for t in threads):
        most = max(most, len(running(database_url, r"\5\4\3\2\1")))
        healthy = healthy and httpx.get(logged.url + "/healthz", timeout=10).status_code == 200
        time.sleep(0.1)
    for t in threads:
        t.join()
    refused = [a for a in answers if a is not None and a.status_code == 429]
    assert len(refused) >= 40 - 4 * 2, [a and a.status_code for a in answers]
    assert all(a.headers.get("retry-after") for a in refused)
    assert most <= 4, f"{most} counts ran at once for one principal"
    assert healthy
    assert wait_until(lambda: not running(database_url, r"\5\4\3\2\1"), ANSWERED_WITHIN + 3)


def test_compile_heavy_regexes_are_refused_quickly_and_long_ones_at_once(
    logged: Server, database_url: str
) -> None:
    query = "&".join([f"details=match.{COMPILE_BOMB}"] * 6)
    started = time.monotonic()
    r = httpx.head(logged.url + f"/datasets/{BAIT}.csv?{query}", timeout=20)
    assert r.status_code == 400
    assert time.monotonic() - started < 8  # six compiles alone take 30 s
    assert not running(database_url, "{0,18}")
    r = httpx.get(logged.url + f"/datasets/{BAIT}.csv?{query}", timeout=20)
    assert r.status_code == 400
    assert r.json()["error"]["parameter"] == "details"
    assert "compile" in r.json()["error"]["message"]
    long = "a" * (MAX_PATTERN_LENGTH + 1)
    for name, value in [("details", f"match.{long}"), ("details", f"imatch.{long}"),
                        ("details", f"fts.{long}")]:
        r = httpx.get(logged.url + f"/datasets/{BAIT}.csv?{name}={value}", timeout=20)
        assert r.status_code == 400, (name, value[:10], r.text)
        assert r.json()["error"]["parameter"] == name
        assert f"at most {MAX_PATTERN_LENGTH}" in r.json()["error"]["message"]


def test_a_head_is_audited(logged: Server, database_url: str) -> None:
    marker = random.randrange(10**8, 10**9)
    r = httpx.head(logged.url + f"/datasets/orders.csv?id=neq.{marker}",
                   headers={"Prefer": "count=exact"}, timeout=20)
    assert r.status_code == 200
    row = audited(database_url, "target = 'orders' AND params->'id' ? $1", f"neq.{marker}")[0]
    assert row["status"] == "complete"
    assert row["http_status"] == 200
    assert row["bytes"] == 0
    assert json.loads(row["params"])["method"] == ["HEAD"]


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_statement_timeout_bounds_counts_and_the_first_row(
    short: Server, database_url: str, method: str
) -> None:
    s = short
    for prefer in ("count=exact", None):
        started = time.monotonic()
        r = httpx.request(method, s.url + f"/datasets/{BAIT}.csv?details=match.{SLOW_REGEX}",
                          headers={"Prefer": prefer} if prefer else {}, timeout=20)
        took = time.monotonic() - started
        # A HEAD without a count reads no row: nothing to wait for.
        assert r.status_code == (200 if (method, prefer) == ("HEAD", None) else 504), \
            (prefer, r.status_code)
        assert took < 5, (prefer, took)
        if method == "GET":
            assert "EXPORTER_STATEMENT_TIMEOUT" in r.json()["error"]["message"]
        assert wait_until(lambda: not running(database_url, r"\5\4\3\2\1"), ANSWERED_WITHIN)


def test_a_stored_export_has_the_same_deadline(short: Server, database_url: str) -> None:
    s = short
    r = httpx.get(s.url + f"/datasets/{BAIT}.csv?details=match.{SLOW_REGEX}",
                  headers={"Prefer": "respond-async"}, timeout=20)
    assert r.status_code == 202, r.text
    status = r.json()["status_url"]

    def ended() -> bool:
        return httpx.get(s.url + status, timeout=10).status_code == 410

    assert wait_until(ended, 10), httpx.get(s.url + status, timeout=10).text
    assert "EXPORTER_STATEMENT_TIMEOUT" in httpx.get(s.url + status).json()["error"]
    assert wait_until(lambda: not running(database_url, r"\5\4\3\2\1"), ANSWERED_WITHIN)


def test_a_stored_export_stops_when_its_token_is_revoked(short: Server,
                                                         database_url: str) -> None:
    # Rows for hours, a trickle of them (the stored file stays small); a view of its own:
    # test_stored_exports makes `trickle` with other columns in the same database.
    run_sql(database_url, "CREATE OR REPLACE VIEW exports.hours_of_trickle AS SELECT g AS id"
            " FROM generate_series(1, 1000000000) AS g, LATERAL pg_sleep(0.01) AS s")
    name = f"revoked-while-stored-{os.getpid()}-{random.randrange(10**6)}"
    secret = new_token(database_url, name, "datasets:*")
    s = short
    r = httpx.get(s.url + "/datasets/hours_of_trickle.csv", timeout=20,
                  headers={"Prefer": "respond-async", **bearer(secret)})
    assert r.status_code == 202, r.text
    status = s.url + r.json()["status_url"]
    assert httpx.get(status, headers=bearer(secret)).status_code == 202
    run_sql(database_url,
            f"UPDATE exporter.tokens SET revoked_at = now() WHERE name = '{name}'")
    admin = new_token(database_url, f"{name}-admin", "admin")

    def stopped() -> bool:
        return httpx.get(status, headers=bearer(admin), timeout=10).status_code == 410

    assert wait_until(stopped, 10)
    assert "revoked" in httpx.get(status, headers=bearer(admin)).json()["error"]
    assert wait_until(lambda: not running(database_url, "hours_of_trickle"), 5)
