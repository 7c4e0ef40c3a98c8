"""The change cursor: `Export-Cursor` on every export of a table and `?since=` with it
(exporter/exports/cursor.py). Writers hold real transactions open on their own
connections (asyncpg, on a loop of their own) while the app pulls in process; the
concurrent test and the HTTP details run on a real server.

Runs on every PostgreSQL of `--postgres` (tests/conftest.py): snapshots, subtransactions
and xid arithmetic are the database's."""

from __future__ import annotations

import asyncio
import base64
import json
import random
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import asyncpg
import httpx
import pytest

from exporter.config import Settings
from exporter.errors import ApiError
from exporter.exports import cursor
from tests.inprocess import InProcess
from tests.support import Server, asyncpg_dsn, fetch, run_sql, wait_until


@pytest.fixture(scope="module")
def app(database_url: str) -> Iterator[InProcess]:
    settings = Settings(database_url=database_url, public_datasets=["*"], public_files=["*"])
    with InProcess(settings) as running:
        yield running


@pytest.fixture
def table(database_url: str) -> Iterator[str]:
    """A fresh table `exports.<name>` (id, v), dropped at the end."""
    name = f"cur_{uuid.uuid4().hex[:8]}"
    run_sql(database_url, f"CREATE TABLE exports.{name} (id bigint PRIMARY KEY, v text)")
    try:
        yield name
    finally:
        run_sql(database_url, f"DROP TABLE IF EXISTS exports.{name} CASCADE")


class Writer:
    """A connection of its own whose transactions stay open between the test's steps."""

    def __init__(self, url: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._conn: asyncpg.Connection = self._loop.run_until_complete(
            asyncpg.connect(asyncpg_dsn(url)))

    def __call__(self, *statements: str) -> None:
        for statement in statements:
            self._loop.run_until_complete(self._conn.execute(statement))

    def value(self, query: str) -> Any:
        return self._loop.run_until_complete(self._conn.fetchval(query))

    def close(self) -> None:
        self._loop.run_until_complete(self._conn.close())
        self._loop.close()


@pytest.fixture
def writers(database_url: str) -> Iterator[list[Writer]]:
    made: list[Writer] = []
    yield made
    for w in made:
        w.close()


def writer(database_url: str, writers: list[Writer]) -> Writer:
    w = Writer(database_url)
    writers.append(w)
    return w


def pull(app: InProcess, table: str, since: str | None = None,
         query: str = "") -> tuple[list[dict[str, Any]], str]:
    """The rows of an NDJSON export, and its Export-Cursor."""
    params = f"since={since}&{query}" if since else query
    r = app.get(f"/datasets/{table}.ndjson?{params}")
    assert r.status_code == 200, r.text
    rows = [json.loads(line) for line in r.content.split(b"\n") if line]
    token = r.headers.get(cursor.HEADER, "")
    assert token or "limit=" in query, "a whole export of a table has a cursor"
    return rows, token


def ids(rows: list[dict[str, Any]]) -> list[int]:
    return sorted(row["id"] for row in rows)


def test_the_late_commit_is_delivered_by_the_next_pull(
        app: InProcess, table: str, database_url: str, writers: list[Writer]) -> None:
    a, b = writer(database_url, writers), writer(database_url, writers)
    a("BEGIN", f"INSERT INTO exports.{table} VALUES (1000011, 'a')")
    b("BEGIN", f"INSERT INTO exports.{table} VALUES (1000012, 'b')", "COMMIT")
    rows, first = pull(app, table)
    assert ids(rows) == [1000012]
    a("COMMIT")
    rows, second = pull(app, table, first)
    assert ids(rows) == [1000011]
    rows, _ = pull(app, table, second)
    assert rows == []


def test_rows_written_in_savepoints_of_an_open_transaction_are_not_lost(
        app: InProcess, table: str, database_url: str, writers: list[Writer]) -> None:
    a, b = writer(database_url, writers), writer(database_url, writers)
    a("BEGIN", f"INSERT INTO exports.{table} VALUES (1, 'top')",
      "SAVEPOINT s1", f"INSERT INTO exports.{table} VALUES (2, 'released')",
      "RELEASE SAVEPOINT s1",
      "SAVEPOINT s2", f"INSERT INTO exports.{table} VALUES (3, 'open')",
      "SAVEPOINT s3", f"INSERT INTO exports.{table} VALUES (4, 'rolled back')",
      "ROLLBACK TO SAVEPOINT s3")
    # Committed after a's savepoints: its xid is above theirs, so they are in the window.
    b(f"INSERT INTO exports.{table} VALUES (5, 'b')")
    # A plpgsql EXCEPTION block is a subtransaction too.
    a(f"DO $$ BEGIN BEGIN INSERT INTO exports.{table} VALUES (6, 'block');"
      " EXCEPTION WHEN others THEN NULL; END; END $$")
    rows, first = pull(app, table)
    assert ids(rows) == [5]
    assert changed_ids(app, table, first) == ([], [])
    a("COMMIT")
    assert changed_ids(app, table, first) == ([1, 2, 3, 6], [1, 2, 3, 6])
    rows, second = pull(app, table, first)
    assert ids(rows) == [1, 2, 3, 6]
    assert pull(app, table, second)[0] == []


def test_an_update_is_delivered_once_and_again_only_if_it_changes_again(
        app: InProcess, table: str, database_url: str) -> None:
    run_sql(database_url, f"INSERT INTO exports.{table} SELECT g, 'x' FROM"
                          " generate_series(1, 50) AS g")
    rows, c1 = pull(app, table)
    assert len(rows) == 50
    run_sql(database_url, f"UPDATE exports.{table} SET v = 'y' WHERE id = 7")
    rows, c2 = pull(app, table, c1)
    assert rows == [{"id": 7, "v": "y"}]
    assert changed_ids(app, table, c1) == ([7], [7])
    rows, c3 = pull(app, table, c2)
    assert rows == []
    run_sql(database_url, f"UPDATE exports.{table} SET v = 'z' WHERE id = 7")
    rows, _ = pull(app, table, c3)
    assert rows == [{"id": 7, "v": "z"}]
    # A cursor is a snapshot, not a position: the old one still gives what changed since.
    assert pull(app, table, c1)[0] == [{"id": 7, "v": "z"}]


def test_since_combines_with_filters_select_order_limit_and_formats(
        app: InProcess, table: str, database_url: str) -> None:
    run_sql(database_url, f"INSERT INTO exports.{table} SELECT g, 'old' FROM"
                          " generate_series(1, 20) AS g")
    _, c = pull(app, table)
    run_sql(database_url, f"INSERT INTO exports.{table} SELECT g, 'new' FROM"
                          " generate_series(21, 30) AS g",
            f"UPDATE exports.{table} SET v = 'changed' WHERE id IN (3, 4)")
    rows, limited = pull(app, table, c, "select=id&id=gte.4&order=id.desc&limit=3")
    assert rows == [{"id": 30}, {"id": 29}, {"id": 28}]
    assert limited == ""  # a part of the rows: a cursor would claim the rows left out
    r = app.get(f"/datasets/{table}.csv?since={c}&v=eq.changed&order=id")
    assert r.status_code == 200
    assert r.content == b"id,v\n3,changed\n4,changed\n"
    assert r.headers[cursor.HEADER]
    # With PostgREST's logic trees and renames: only changed rows, whatever the tree says.
    r = app.get(f"/datasets/{table}.csv?since={c}&or=(id.eq.1,id.eq.3,id.eq.25)"
                "&select=ident:id&order=id")
    assert r.status_code == 200, r.text
    assert r.content == b"ident\n3\n25\n"
    # A column named `since` is reached quoted, as `limit` is.
    run_sql(database_url, f"ALTER TABLE exports.{table} ADD COLUMN since int DEFAULT 1")
    app.run(app.state.catalog.reload())
    r = app.get(f'/datasets/{table}.csv?"since"=eq.1&select=id&order=id&limit=1')
    assert r.status_code == 200 and r.content == b"id\n1\n"


def test_the_cursor_is_compact_url_safe_and_on_tables_only(
        app: InProcess, table: str, database_url: str) -> None:
    run_sql(database_url, f"CREATE VIEW exports.{table}_view AS SELECT * FROM exports.{table}")
    app.run(app.state.catalog.reload())
    r = app.get(f"/datasets/{table}.csv")
    token = r.headers[cursor.HEADER]
    assert len(token) < 100 and all(c.isalnum() or c in "-_" for c in token)
    assert cursor.HEADER not in app.head(f"/datasets/{table}.csv").headers
    view = app.get(f"/datasets/{table}_view.csv")
    assert view.status_code == 200 and cursor.HEADER not in view.headers
    refused = app.get(f"/datasets/{table}_view.csv?since={token}")
    assert refused.status_code == 400
    assert refused.json()["error"]["parameter"] == "since"
    assert "xmin" in refused.json()["error"]["message"]


def _flip(token: str, at: int) -> str:
    raw = bytearray(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    raw[at] ^= 0x01
    return base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()


def test_hostile_tokens_are_a_400_naming_since(app: InProcess, table: str) -> None:
    token = pull(app, table)[1]
    key = cursor.cursor_key(app.call(lambda st: st.links.key()))
    good = cursor.decode(token, key)
    other_key = cursor.encode(good, cursor.cursor_key(b"another deployment"))
    future = bytearray(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    future[0] = 2  # a later version, signed with the right key
    body = bytes(future[:-16])
    import hashlib
    import hmac
    resigned = body + hmac.new(key, body, hashlib.sha256).digest()[:16]
    version_2 = base64.urlsafe_b64encode(resigned).rstrip(b"=").decode()
    hostile = [
        "", "x", token[:-1], token[:10], token + "A", token + "AAAA", _flip(token, 0),
        _flip(token, 5), _flip(token, -1), other_key, version_2, "A" * 5000,
        "%00", "é" * 10, token.replace("-", "+").replace("_", "/") + "==",
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", "=" * 40, "9" * 1025,
    ]
    for bad in hostile:
        r = app.get(f"/datasets/{table}.csv", params={"since": bad})
        assert r.status_code == 400, (bad, r.status_code, r.text)
        assert r.json()["error"]["parameter"] == "since", bad
        h = app.head(f"/datasets/{table}.csv", params={"since": bad})
        assert h.status_code == 400, bad
    twice = app.get(f"/datasets/{table}.csv?since={token}&since={token}")
    assert twice.status_code == 400


def test_a_cursor_of_another_cluster_is_refused_with_a_full_pull_asked(
        app: InProcess, table: str) -> None:
    key = cursor.cursor_key(app.call(lambda st: st.links.key()))
    good = cursor.decode(pull(app, table)[1], key)
    elsewhere = cursor.Cursor(good.system ^ 1, good.xmin, good.xmax, good.conservative,
                              good.invisible)
    r = app.get(f"/datasets/{table}.csv?since={cursor.encode(elsewhere, key)}")
    assert r.status_code == 410
    assert "pull everything again" in r.json()["error"]["message"]
    # 2^31 xids cannot be burnt in a test: the check itself, on a later snapshot.
    later = cursor.Snapshot(None, cursor.Cursor(good.system, good.xmin + 2**31,
                                                good.xmin + 2**31, good.xmin + 2**31, ()))
    with pytest.raises(ApiError) as refused:
        cursor.check(good, later)
    assert refused.value.status == 410 and "older than 2^31" in refused.value.message
    cursor.check(good, cursor.Snapshot(None, good))


def changed_ids(app: InProcess, table: str, token: str) -> tuple[list[int], list[int]]:
    """The ids `since` finds, by age(xmin) and by xmin's text, in one snapshot."""
    key = cursor.cursor_key(app.call(lambda st: st.links.key()))
    since = cursor.decode(token, key)

    async def both(st: Any) -> tuple[list[int], list[int]]:
        async with st.engine.connect() as conn:
            conn = await conn.execution_options(isolation_level="REPEATABLE READ")
            now = await cursor.take(conn)
            assert now.reference is not None
            found = []
            for reference in (now.reference, None):
                where = cursor.condition(since, reference)
                rows = await conn.exec_driver_sql(
                    f"SELECT id FROM exports.{table} WHERE {where} ORDER BY id")
                found.append([r[0] for r in rows])
            return found[0], found[1]

    return app.run(both(app.state))


def test_the_token_round_trips_and_the_longest_fits() -> None:
    key = cursor.cursor_key(b"k")
    c = cursor.Cursor(2**63 + 5, 2**40, 2**40 + 900, 2**40 + 800,
                      tuple(2**40 + i for i in range(0, 800, 4))[:cursor.MAX_LISTED], True)
    token = cursor.encode(c, key)
    assert cursor.decode(token, key) == c
    # The longest take() makes: the most xids listed, spread as wide as the probe goes.
    xmin = 2**63 - 2**32
    gaps = [16384] * 4 + [128] * (cursor.MAX_LISTED - 4)
    listed = tuple(xmin + sum(gaps[:i + 1]) for i in range(len(gaps)))
    assert listed[-1] < xmin + cursor.PROBE_LIMIT
    longest = cursor.Cursor(2**64 - 1, xmin, xmin + 2**31, xmin + cursor.PROBE_LIMIT, listed)
    token = cursor.encode(longest, key)
    assert len(token) <= cursor.MAX_LENGTH
    assert cursor.decode(token, key) == longest


def test_table_rewrites_and_freezing_give_the_rows_again_or_lose_none(
        app: InProcess, table: str, database_url: str) -> None:
    run_sql(database_url, f"INSERT INTO exports.{table} SELECT g, 'x' FROM"
                          " generate_series(1, 10) AS g")
    _, c = pull(app, table)
    # Same rows, same xmin (VACUUM FREEZE keeps the raw xmin): nothing to deliver.
    run_sql(database_url, f"VACUUM FREEZE exports.{table}", f"VACUUM FULL exports.{table}",
            f"CLUSTER exports.{table} USING {table}_pkey")
    rows, c = pull(app, table, c)
    assert rows == []
    # A rewrite by ALTER ... TYPE writes every row anew: all come again.
    run_sql(database_url, f"ALTER TABLE exports.{table} ALTER COLUMN v TYPE varchar(20)")
    app.run(app.state.catalog.reload())
    rows, c = pull(app, table, c)
    assert ids(rows) == list(range(1, 11))
    # Deletes and TRUNCATE are not seen; what is inserted after is.
    run_sql(database_url, f"DELETE FROM exports.{table} WHERE id = 1",
            f"TRUNCATE exports.{table}", f"INSERT INTO exports.{table} VALUES (99, 'n')")
    rows, _ = pull(app, table, c)
    assert ids(rows) == [99]


def test_partitioned_tables_and_materialized_views(
        app: InProcess, table: str, database_url: str) -> None:
    run_sql(database_url,
            f"CREATE TABLE exports.{table}_p (id int, v text) PARTITION BY RANGE (id)",
            f"CREATE TABLE exports.{table}_p1 PARTITION OF exports.{table}_p"
            " FOR VALUES FROM (0) TO (100)",
            f"CREATE TABLE exports.{table}_p2 PARTITION OF exports.{table}_p"
            " FOR VALUES FROM (100) TO (200)",
            f"INSERT INTO exports.{table}_p VALUES (1, 'a'), (150, 'b')",
            f"INSERT INTO exports.{table} VALUES (1, 'a'), (2, 'b')",
            f"CREATE MATERIALIZED VIEW exports.{table}_m AS SELECT * FROM exports.{table}",
            f"CREATE UNIQUE INDEX ON exports.{table}_m (id)")
    app.run(app.state.catalog.reload())
    try:
        _, c = pull(app, f"{table}_p")
        # Moving a row to another partition is a delete and an insert: it comes again.
        run_sql(database_url, f"UPDATE exports.{table}_p SET id = 2 WHERE id = 150",
                f"INSERT INTO exports.{table}_p VALUES (120, 'c')")
        rows, _ = pull(app, f"{table}_p", c)
        assert ids(rows) == [2, 120]
        _, c = pull(app, f"{table}_m")
        run_sql(database_url, f"UPDATE exports.{table} SET v = 'changed' WHERE id = 2",
                f"REFRESH MATERIALIZED VIEW CONCURRENTLY exports.{table}_m")
        rows, c = pull(app, f"{table}_m", c)
        assert rows == [{"id": 2, "v": "changed"}]
        # A plain REFRESH rewrites the whole view: every row comes again.
        run_sql(database_url, f"REFRESH MATERIALIZED VIEW exports.{table}_m")
        rows, _ = pull(app, f"{table}_m", c)
        assert ids(rows) == [1, 2]
    finally:
        run_sql(database_url, f"DROP TABLE exports.{table}_p",
                f"DROP MATERIALIZED VIEW exports.{table}_m")


# --- over a real server -----------------------------------------------------------------


@pytest.fixture(scope="module")
def live(make_module_server: type[Server], tmp_path_factory: pytest.TempPathFactory,
         ) -> Iterator[Server]:
    env = {"EXPORTER_PUBLIC_DATASETS": '["*"]', "EXPORTER_CORS_ORIGINS": '["http://app"]',
           "EXPORTER_EXPORTS_DIR": str(tmp_path_factory.mktemp("stored"))}
    with make_module_server(env) as s:
        yield s


def _write_randomly(url: str, table: str, stop: threading.Event, seed: int,
                    committed: list[int], next_id: Iterator[int], lock: threading.Lock,
                    errors: list[BaseException]) -> None:
    """Transactions of random length, some with savepoints (kept or rolled back), some
    rolled back whole; inserts of new ids and updates of committed ones."""
    rng = random.Random(seed)

    async def go() -> None:
        conn = await asyncpg.connect(asyncpg_dsn(url))
        try:
            while not stop.is_set():
                await conn.execute("BEGIN")
                try:
                    for _ in range(rng.randint(1, 6)):
                        savepoint = rng.random() < 0.4
                        if savepoint:
                            await conn.execute("SAVEPOINT s")
                        if rng.random() < 0.5 or not committed:
                            with lock:
                                new = next(next_id)
                            await conn.execute(
                                f"INSERT INTO exports.{table} VALUES ($1, 0)", new)
                        else:
                            with lock:
                                old = rng.choice(committed)
                            await conn.execute(
                                f"UPDATE exports.{table} SET v = v + 1 WHERE id = $1", old)
                        if savepoint and rng.random() < 0.3:
                            await conn.execute("ROLLBACK TO SAVEPOINT s")
                        elif savepoint:
                            await conn.execute("RELEASE SAVEPOINT s")
                        await asyncio.sleep(rng.random() * 0.15)
                    if rng.random() < 0.1:
                        await conn.execute("ROLLBACK")
                        continue
                    await conn.execute("COMMIT")
                except asyncpg.PostgresError:  # a deadlock between two writers' updates
                    await conn.execute("ROLLBACK")
                    continue
                inserted = await conn.fetch(f"SELECT id FROM exports.{table}")
                with lock:
                    committed[:] = [r["id"] for r in inserted]
        finally:
            await conn.close()

    try:
        asyncio.run(go())
    except BaseException as error:
        errors.append(error)


def test_pulls_while_writers_commit_in_any_order_lose_nothing(
        live: Server, table: str, database_url: str) -> None:
    run_sql(database_url, f"ALTER TABLE exports.{table} ALTER COLUMN v TYPE int USING 0")
    stop, lock = threading.Event(), threading.Lock()
    committed: list[int] = []
    counter = iter(range(1, 10**9))
    errors: list[BaseException] = []
    threads = [threading.Thread(target=_write_randomly, args=(
        database_url, table, stop, seed, committed, counter, lock, errors)) for seed in range(4)]
    pulled: dict[int, int] = {}
    pulls = delivered = 0
    token: str | None = None
    with httpx.Client(base_url=live.url, timeout=30) as client:

        def pull_once() -> None:
            nonlocal token, pulls, delivered
            params = {"since": token} if token else {}
            r = client.get(f"/datasets/{table}.ndjson", params=params)
            assert r.status_code == 200, r.text
            for line in r.content.split(b"\n"):
                if line:
                    row = json.loads(line)
                    pulled[row["id"]] = row["v"]
                    delivered += 1
            token = r.headers[cursor.HEADER]
            pulls += 1

        for t in threads:
            t.start()
        def enough() -> bool:
            with lock:
                return len(committed) > 50 and pulls > 10

        try:
            # 5 s of pulls among the writers, and on until they have written what the checks
            # below need: a loaded machine wrote 49 rows in 5 s.
            started = time.monotonic()
            while time.monotonic() - started < 5 or (
                    not enough() and time.monotonic() - started < 60):
                pull_once()
                time.sleep(random.random() * 0.2)
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        assert not errors, errors
        pull_once()
    table_rows = {r["id"]: r["v"]
                  for r in fetch(database_url, f"SELECT id, v FROM exports.{table}")}
    assert len(table_rows) > 50 and pulls > 10
    assert pulled == table_rows
    # Each pull brought only what changed (a full pull each time would be far more).
    assert delivered < 3 * len(table_rows) + 10 * pulls


def test_cursor_header_is_exposed_to_other_origins_and_kept_in_stored_manifests(
        live: Server, table: str, database_url: str) -> None:
    run_sql(database_url, f"INSERT INTO exports.{table} VALUES (1, 'a')")
    r = httpx.get(f"{live.url}/datasets/{table}.csv", headers={"Origin": "http://app"})
    assert r.status_code == 200 and r.headers[cursor.HEADER]
    exposed = [h.strip().lower() for h in r.headers["access-control-expose-headers"].split(",")]
    assert "export-cursor" in exposed
    started = httpx.post(f"{live.url}/exports", json={"url": f"/datasets/{table}.csv"})
    assert started.status_code == 202, started.text
    location = started.headers["location"]
    assert wait_until(lambda: httpx.get(live.url + location).status_code == 200, 30)
    manifest = httpx.get(live.url + location).json()
    assert manifest["status"] == "complete" and manifest["cursor"]
    # The file carries it too (a resumed streamed export is answered from such a file).
    stored = httpx.get(manifest["file_url"], headers={"Range": "bytes=2-"})
    assert stored.status_code == 206 and stored.headers[cursor.HEADER] == manifest["cursor"]
    run_sql(database_url, f"INSERT INTO exports.{table} VALUES (2, 'b')")
    since = httpx.get(f"{live.url}/datasets/{table}.csv",
                      params={"since": manifest["cursor"]})
    assert since.status_code == 200 and since.content == b"id,v\n2,b\n"
    # Asked with `since`, a stored export runs it too.
    started = httpx.post(f"{live.url}/exports", json={
        "url": f"/datasets/{table}.csv?since={manifest['cursor']}"})
    assert started.status_code == 202, started.text
    location = started.headers["location"]
    assert wait_until(lambda: httpx.get(live.url + location).status_code == 200, 30)
    file_url = httpx.get(live.url + location).json()["file_url"]
    assert httpx.get(file_url).content == b"id,v\n2,b\n"
    bad = httpx.post(f"{live.url}/exports", json={"url": f"/datasets/{table}.csv?since=x"})
    assert bad.status_code == 400 and bad.json()["error"]["parameter"] == "since"


def test_the_audit_trail_takes_since_as_an_export(app: InProcess) -> None:
    token = app.call(lambda st: st.tokens.create(f"cursor-admin-{uuid.uuid4().hex[:6]}",
                                                 ["admin"], None))
    auth = {"Authorization": f"Bearer {token}"}
    # No limit: a part of the rows has no cursor (no row at all is a whole answer).
    first = app.get("/downloads.csv?id=lt.0", headers=auth)
    assert first.status_code == 200
    cursor_token = first.headers[cursor.HEADER]
    app.get("/datasets/orders.csv?limit=1")  # one more audit row, written in batches
    later = app.get(f"/downloads.csv?since={cursor_token}&select=target", headers=auth)
    assert later.status_code == 200 and later.headers[cursor.HEADER]
    listing = app.get(f"/downloads?since={cursor_token}", headers=auth)
    assert listing.status_code == 400 and listing.json()["error"]["parameter"] == "since"


def test_two_server_processes_accept_each_others_cursors(
        live: Server, make_server: type[Server], table: str, database_url: str) -> None:
    other = make_server({"EXPORTER_PUBLIC_DATASETS": '["*"]'}).start()
    run_sql(database_url, f"INSERT INTO exports.{table} VALUES (1, 'a')")
    token = httpx.get(f"{live.url}/datasets/{table}.csv").headers[cursor.HEADER]
    run_sql(database_url, f"INSERT INTO exports.{table} VALUES (2, 'b')")
    r = httpx.get(f"{other.url}/datasets/{table}.csv", params={"since": token})
    assert r.status_code == 200 and r.content == b"id,v\n2,b\n"
    back = httpx.get(f"{live.url}/datasets/{table}.csv",
                     params={"since": r.headers[cursor.HEADER]})
    assert back.status_code == 200 and back.content == b"id,v\n"


def test_a_transaction_that_ends_between_the_probe_and_its_check_makes_it_conservative(
        app: InProcess, table: str, database_url: str, writers: list[Writer]) -> None:
    """A transaction of the snapshot ends between the probe and the status check (made
    to happen): from its xid on, everything counts as not visible, so b's row, committed
    before the snapshot, comes again. (Here the probe had seen a's savepoint anyway; the
    bound is what keeps safe a probe that ran while a ended, half before, half after.)"""
    a, b = writer(database_url, writers), writer(database_url, writers)
    run_sql(database_url, f"INSERT INTO exports.{table} VALUES (1, 'before')")
    a("BEGIN", f"INSERT INTO exports.{table} VALUES (2, 'a')",
      "SAVEPOINT s", f"INSERT INTO exports.{table} VALUES (3, 'a, savepoint')",
      "RELEASE SAVEPOINT s")
    b(f"INSERT INTO exports.{table} VALUES (4, 'b')")
    top = int(a.value("SELECT pg_current_xact_id()::text"))
    key = cursor.cursor_key(app.call(lambda st: st.links.key()))

    async def racing(st: Any) -> cursor.Snapshot:
        async with st.engine.connect() as conn:
            conn = await conn.execution_options(isolation_level="REPEATABLE READ",
                                                postgresql_readonly=True)
            row = await cursor.probe(conn)
            # a's xid, and its savepoint's found in progress.
            assert top in row.xip and top in row.running
            assert any(x > top and x not in row.xip for x in row.running)
            await asyncio.get_running_loop().run_in_executor(None, a, "COMMIT")
            return await cursor.settle(conn, row)

    snapshot = app.run(racing(app.state))
    taken = snapshot.cursor
    # a ended: every xid from its own on counts as not visible (b's included).
    assert taken.conservative <= top and all(x < top for x in taken.invisible)
    token = cursor.encode(taken, key)
    rows, _ = pull(app, table, token)
    assert ids(rows) == [2, 3, 4]


def test_the_condition_across_the_32_bit_wraparound(database_url: str) -> None:
    """xids near 2^32 and just past it, and the special ones (1 bootstrap, 2 frozen),
    through the condition's xmin arithmetic (the form used without an age() reference),
    by PostgreSQL itself on a column named xmin."""
    low = 2**32 - 6
    xmin = 3 * 2**32 + low
    since = cursor.Cursor(0, xmin, xmin + 20, xmin + 20, (xmin + 2,))
    raw = [1, 2, low - 1, low, low + 2, 3, 14, 100]
    values = ", ".join(f"('{x}'::xid)" for x in raw)
    rows = fetch(database_url, f"SELECT xmin::text AS x FROM (VALUES {values}) AS t(xmin)"
                               f" WHERE {cursor.condition(since)}")
    # low + 2 is listed as not visible; 3 is xmin + 9, visible; 14 is xmax, 100 after it.
    assert [int(r["x"]) for r in rows] == [low + 2, 14, 100]


def test_a_role_that_may_not_read_the_cluster_identity_exports_without_a_cursor(
        database_url: str, table: str) -> None:
    from sqlalchemy.engine import make_url

    role = f"cur_limited_{uuid.uuid4().hex[:6]}"
    run_sql(database_url, f"CREATE ROLE {role} LOGIN",
            f"GRANT USAGE ON SCHEMA exports, exporter TO {role}",
            f"GRANT SELECT ON ALL TABLES IN SCHEMA exports TO {role}",
            f"GRANT ALL ON ALL TABLES IN SCHEMA exporter TO {role}",
            f"GRANT ALL ON ALL SEQUENCES IN SCHEMA exporter TO {role}",
            "REVOKE EXECUTE ON FUNCTION pg_control_system() FROM PUBLIC",
            f"INSERT INTO exports.{table} VALUES (1, 'a')")
    try:
        url = make_url(database_url).set(username=role, password=None)
        settings = Settings(database_url=url.render_as_string(hide_password=False),
                            public_datasets=["*"])
        with InProcess(settings) as limited:
            r = limited.get(f"/datasets/{table}.csv")
            assert r.status_code == 200 and r.content == b"id,v\n1,a\n"
            assert cursor.HEADER not in r.headers
            token = cursor.encode(cursor.Cursor(0, 3, 3, 3, ()), cursor.cursor_key(
                limited.call(lambda st: st.links.key())))
            refused = limited.get(f"/datasets/{table}.csv?since={token}")
            assert refused.status_code == 503
            assert "pg_control_system" in refused.json()["error"]["message"]
    finally:
        run_sql(database_url, "GRANT EXECUTE ON FUNCTION pg_control_system() TO PUBLIC",
                f"DROP OWNED BY {role}", f"DROP ROLE {role}")


def test_more_savepoints_than_a_token_lists_still_lose_nothing(
        app: InProcess, table: str, database_url: str, writers: list[Writer]) -> None:
    a, b = writer(database_url, writers), writer(database_url, writers)
    a("BEGIN", f"INSERT INTO exports.{table} VALUES (0, 'top')")
    count = cursor.MAX_LISTED + 50
    a(f"DO $$ BEGIN FOR i IN 1..{count} LOOP BEGIN INSERT INTO exports.{table}"
      " VALUES (i, 'block'); EXCEPTION WHEN others THEN NULL; END; END LOOP; END $$")
    b(f"INSERT INTO exports.{table} VALUES (100000, 'b')")
    rows, first = pull(app, table)
    assert ids(rows) == [100000]
    key = cursor.cursor_key(app.call(lambda st: st.links.key()))
    taken = cursor.decode(first, key)
    # The list is capped: from the first xid left out on, everything counts as new.
    assert len(taken.invisible) == cursor.MAX_LISTED and taken.conservative < taken.xmax
    a("COMMIT")
    rows, _ = pull(app, table, first)
    # b's row, written after the bound, comes again; none of a's is lost.
    assert ids(rows) == [*range(0, count + 1), 100000]


def test_a_part_of_the_rows_gets_no_cursor(app: InProcess, table: str,
                                           database_url: str) -> None:
    """limit, offset or a page of items leave rows of the snapshot out: the next pull from
    such a cursor would skip them, so none is given (the whole filtered export has one)."""
    run_sql(database_url, f"INSERT INTO exports.{table} SELECT g, 'x' FROM"
                          " generate_series(1, 20) AS g")
    assert cursor.HEADER in app.get(f"/datasets/{table}.csv?id=gt.5").headers
    for query, headers in [("limit=5", {}), ("offset=5", {}), ("limit=0", {}),
                           ("", {"Range": "0-4", "Range-Unit": "items"}),
                           ("", {"Range": "5-"})]:
        r = app.get(f"/datasets/{table}.csv?order=id&{query}", headers=headers)
        assert r.status_code in (200, 206), (query, headers, r.text)
        assert cursor.HEADER not in r.headers, (query, headers)
