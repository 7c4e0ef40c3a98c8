"""No database on the file hot path (issue 24): in steady state a file download checks
its token from memory, takes its slot from those its process holds, reads its digest from
memory and queues its audit row; two processes on one database still learn a revocation
or a narrowed scope within a second, and hold the per-principal cap together.

The servers of this module run on a database of their own, so that its
`pg_stat_database` counts their transactions and nobody else's."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import datetime
from pathlib import Path

import asyncpg
import httpx
import pytest
from sqlalchemy.engine import make_url

from exporter.cli import migrate
from tests.support import (
    FreshDatabase,
    Server,
    asyncpg_dsn,
    exporter_cli,
    fetch,
    run_async,
    run_sql,
    wait_until,
)

CAP = 3
DOWNLOADS = 200
# A held download's file: more than loopback's socket buffers take (tens of MiB), so
# that a client that reads nothing holds its download (sparse: nothing is written).
HELD_SIZE = 256 * 1024 * 1024
LINGER = 0.3
SMALL = os.urandom(64 * 1024)


@pytest.fixture(scope="module")
def hot(server_url_root: str, tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[tuple[str, Server, Server]]:
    """Two server processes on one fresh database (its URL; the servers): what two
    hosts or workers are."""
    root = tmp_path_factory.mktemp("hot")
    (root / "small.bin").write_bytes(SMALL)
    (root / "nested").mkdir()
    (root / "nested" / "inner.txt").write_bytes(b"inner\n")
    with (root / "held.bin").open("wb") as f:
        f.truncate(HELD_SIZE)
    env = {"EXPORTER_FILES_ROOT": str(root), "EXPORTER_PUBLIC_FILES": "[]",
           "EXPORTER_PUBLIC_DATASETS": "[]",
           "EXPORTER_MAX_DOWNLOADS_PER_PRINCIPAL": str(CAP), "EXPORTER_LIMIT_WAIT": "0",
           "EXPORTER_SLOT_LINGER": str(LINGER)}
    logs = tmp_path_factory.mktemp("hot-logs")
    fresh = FreshDatabase(server_url_root)
    with fresh as url, ExitStack() as stack:
        migrate(url)
        a = stack.enter_context(Server(url, logs / "a.log", env))
        b = stack.enter_context(Server(url, logs / "b.log", env))
        yield url, a, b


def database_of(url: str) -> str:
    return str(make_url(url).database)


def token(url: str, name: str, *scopes: str) -> str:
    args = ["token", "create", "--name", name]
    for scope in scopes:
        args += ["--scope", scope]
    return exporter_cli(*args, env={"EXPORTER_DATABASE_URL": url}).stdout.strip()


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def _name() -> str:
    return f"hot-{hashlib.sha256(os.urandom(8)).hexdigest()[:8]}"


async def _flushed_commits(server_url: str, database: str) -> int:
    """The database's committed transactions, every backend's counted: they are ended
    (PostgreSQL 15+ flushes a backend's counts at most once a second, and when it exits);
    the servers connect again as they need to. Asked from another database, so that the
    asking is not counted."""
    conn = await asyncpg.connect(asyncpg_dsn(server_url))
    try:
        ended = await conn.fetchval(
            "SELECT array_agg(pid) FROM pg_stat_activity, pg_terminate_backend(pid)"
            " WHERE datname = $1", database)
        for _ in range(500):
            if not await conn.fetchval("SELECT count(*) FROM pg_stat_activity"
                                       " WHERE pid = ANY($1::int[])", ended or []):
                break
            await asyncio.sleep(0.01)
        return int(await conn.fetchval(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = $1", database))
    finally:
        await conn.close()


def flushed_commits(server_url: str, database: str) -> int:
    return run_async(lambda: _flushed_commits(server_url, database))


def test_200_file_downloads_make_fewer_than_100_transactions(
        hot: tuple[str, Server, Server], server_url_root: str) -> None:
    url, a, _ = hot
    database = database_of(url)
    secret = token(url, _name(), "files:*")
    with httpx.Client(base_url=a.url, headers=bearer(secret), timeout=30) as client:
        before = flushed_commits(server_url_root, database)
        # Listening again (its connection was ended with the others'): the caches are on.
        assert wait_until(lambda: client.get("/healthz").json()["caches"] == "on", 10)
        # The first download learns the token, takes a slot, computes the digest; counted.
        assert client.get("/files/small.bin").content == SMALL
        for i in range(DOWNLOADS):
            start = (i * 97) % len(SMALL)
            r = client.get("/files/small.bin", headers={"Range": f"bytes={start}-"})
            assert r.status_code == 206 and r.content == SMALL[start:], i
        # Every row written (the server's own queue says so; /healthz asks the
        # database on a connection of its own, counted too).
        assert wait_until(lambda: client.get("/healthz").json()["audit"]["pending"] == 0, 10)
    used = flushed_commits(server_url_root, database) - before
    rows = run_async(lambda: _count_rows(url, secret))
    assert rows == DOWNLOADS + 1
    # Before issue 24 about five per download (token, slot taken and given back, digest,
    # audit): 1,031 for 200.
    print(f"{used} transactions for {DOWNLOADS} downloads")
    assert used < 100, used


async def _count_rows(url: str, secret: str) -> int:
    del secret
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        return int(await conn.fetchval(
            "SELECT count(*) FROM exporter.downloads WHERE target = 'small.bin'"
            " AND status = 'complete'"))
    finally:
        await conn.close()


def _refused_after(server: Server, path: str, secret: str, since: float,
                   within: float) -> float:
    """Seconds from `since` (monotonic) to the start of the first request that `server`
    refused (401 or 403) to the token, asked again and again; fails after `within`."""
    while True:
        started = time.monotonic()
        status = httpx.get(server.url + path, headers=bearer(secret), timeout=10).status_code
        if status in (401, 403):
            return started - since
        assert status == 200, status
        assert started - since < within, f"still served {started - since:.2f} s after"
        time.sleep(0.02)


def test_a_revoked_token_stops_within_a_second_on_both_processes(
        hot: tuple[str, Server, Server]) -> None:
    url, a, b = hot
    name = _name()
    secret = token(url, name, "files:*")
    admin = token(url, _name(), "admin")
    for s in (a, b):  # known to both (in their caches from here on)
        for _ in range(2):
            assert httpx.get(s.url + "/files/nested/inner.txt",
                             headers=bearer(secret)).status_code == 200
    r = httpx.delete(f"{a.url}/tokens/{name}", headers=bearer(admin))
    assert r.status_code == 200
    revoked = time.monotonic()
    # The process that revoked it at once (its first request after); the other by the
    # database's notification, within a second.
    assert httpx.get(a.url + "/files/nested/inner.txt",
                     headers=bearer(secret)).status_code == 401
    assert _refused_after(b, "/files/nested/inner.txt", secret, revoked, 1.0) < 1.0


def test_a_scope_narrowed_by_hand_applies_within_a_second_on_both_processes(
        hot: tuple[str, Server, Server]) -> None:
    url, a, b = hot
    name = _name()
    secret = token(url, name, "files:*")
    for s in (a, b):
        assert httpx.get(s.url + "/files/small.bin", headers=bearer(secret)).status_code == 200
    run_async(lambda: _narrow(url, name))
    narrowed = time.monotonic()
    for s in (a, b):
        assert _refused_after(s, "/files/small.bin", secret, narrowed, 1.0) < 1.0
        assert httpx.get(s.url + "/files/nested/inner.txt",
                         headers=bearer(secret)).status_code == 200


async def _narrow(url: str, name: str) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        await conn.execute("UPDATE exporter.tokens SET scopes = '{files:nested/}'"
                           " WHERE name = $1", name)
    finally:
        await conn.close()


@contextmanager
def held(server: Server, secret: str) -> Iterator[int]:
    """A download whose client reads nothing: its status while the block runs."""
    client = httpx.Client(timeout=30)
    response = client.send(client.build_request("GET", server.url + "/files/held.bin",
                                                headers=bearer(secret)), stream=True)
    try:
        yield response.status_code
    finally:
        response.close()
        client.close()


def test_two_processes_hold_the_per_principal_cap_together(
        hot: tuple[str, Server, Server]) -> None:
    url, a, b = hot
    secret = token(url, _name(), "files:*")
    with ExitStack() as first:
        assert [first.enter_context(held(a, secret)) for _ in range(2)] == [200, 200]
        with held(b, secret) as third:
            assert third == 200
            # The cap is reached in the deployment: neither process admits a fourth.
            for s in (a, b):
                with held(s, secret) as fourth:
                    assert fourth == 429
    # A's two ended: within its linger it gives the slots back, and B may take all of
    # them (a process holds what it does not use for EXPORTER_SLOT_LINGER at most).
    with ExitStack() as second:
        statuses: list[int] = []

        def one_more() -> bool:
            status = second.enter_context(held(b, secret))
            if status == 200:
                statuses.append(status)
            return len(statuses) == CAP

        assert wait_until(one_more, 5, interval=0.1), statuses
        with held(a, secret) as over:
            assert over == 429


@contextmanager
def table_locked(url: str, table: str) -> Iterator[None]:
    """`table` locked against every write (a database that is busy, not down) while the
    block runs."""
    locked, release = threading.Event(), threading.Event()

    async def hold() -> None:
        conn = await asyncpg.connect(asyncpg_dsn(url))
        try:
            async with conn.transaction():
                await conn.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
                locked.set()
                await asyncio.to_thread(release.wait, 60)
        finally:
            await conn.close()

    holder = threading.Thread(target=lambda: asyncio.run(hold()))
    holder.start()
    try:
        assert locked.wait(30)
        yield
    finally:
        release.set()
        holder.join(30)


def test_a_busy_database_refuses_no_download_and_lapses_no_lease(
        hot: tuple[str, Server, Server], tmp_path: Path) -> None:
    """The audit's table locked (its writes wait), the pool's only connection held by the
    waiting write: downloads go on until the bounded queue is full, then are refused
    visibly; the lease is renewed all the while, on its own connection."""
    url, a, _ = hot
    pending = 10
    env = {**a.env, "EXPORTER_AUDIT_MAX_PENDING": str(pending), "EXPORTER_SLOT_LEASE": "3",
           "EXPORTER_POOL_SIZE": "1", "EXPORTER_POOL_MAX_OVERFLOW": "0"}
    with Server(url, tmp_path / "c.log", env) as c, \
            httpx.Client(base_url=c.url, timeout=30) as client:
        secret = token(url, _name(), "files:*")
        client.headers.update(bearer(secret))
        assert client.get("/files/small.bin").content == SMALL  # token, slot, digest known
        served = 0
        with table_locked(url, "exporter.downloads"):
            lease = _lease_of(url, c.pid)
            # The audit's writes wait for the lock; the downloads do not.
            while (r := client.get("/files/small.bin")).status_code == 200:
                assert r.content == SMALL
                served += 1
                assert served <= pending + 1, "the queue of audit rows has no bound"
            # Its row waits (a start and an end are two); at the bound, the download is
            # refused rather than left unrecorded, and that shows.
            assert served >= pending // 2 - 1, served
            assert r.status_code == 503 and "audit rows wait" in r.text
            health = client.get("/healthz").json()
            assert health["status"] == "degraded" and health["audit"]["overflowed"] == 1
            # Renewed every second (a third of the lease), though no pool connection is
            # free: before, the renewal waited for one and the slots lapsed.
            assert wait_until(lambda: _lease_of(url, c.pid) > lease, 5)
        assert re.search(r" ERROR .*download refused: \d+ audit rows wait", c.log())
        # Written once the database is free again, every one of them.
        assert wait_until(lambda: client.get("/healthz").json()["audit"]["pending"] == 0, 10)
        assert client.get("/files/small.bin").status_code == 200
        assert "could not renew" not in c.log()
        # Its lease forgotten by hand (as another process does once it ran out): the
        # next renewal finds its slots gone, and its downloads take new ones.
        run_sql(url, f"DELETE FROM exporter.instances WHERE pid = {c.pid}")
        assert wait_until(lambda: "lease had lapsed" in c.log(), 5)
        assert client.get("/files/small.bin").status_code == 200
        assert fetch(url, "SELECT count(*) AS n FROM exporter.slots s JOIN exporter.instances"
                     " i ON i.id = s.instance WHERE i.pid = $1", c.pid)[0]["n"] >= 1
    rows = fetch(url, "SELECT count(*) AS n FROM exporter.downloads WHERE principal LIKE $1",
                 f"token {_token_name_of(url, secret)}")
    assert rows[0]["n"] == served + 3  # and the first, the one after, the one after that


def _lease_of(url: str, pid: int) -> datetime:
    rows = fetch(url, "SELECT expires_at FROM exporter.instances WHERE pid = $1", pid)
    assert len(rows) == 1, rows
    expires: datetime = rows[0]["expires_at"]
    return expires


def _token_name_of(url: str, secret: str) -> str:
    rows = fetch(url, "SELECT name FROM exporter.tokens WHERE secret_hash = $1",
                 hashlib.sha256(secret.encode()).digest())
    return str(rows[0]["name"])
