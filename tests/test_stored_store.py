"""The stored exports' writer and clean-up (exporter/stored/store.py), in process against
the real database and a real folder: what the routes and the stored copies of streamed
exports build on."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from exporter.access.principal import Principal
from exporter.config import Settings
from exporter.errors import ApiError
from exporter.state import State
from exporter.stored.storage import PARTIAL, LocalStorage, LocalWriter
from exporter.stored.store import (
    ASYNC,
    QUOTA_EXCEEDED,
    SERVER_STOPPED,
    STREAMED,
    Stopped,
    owner_of,
)
from tests.inprocess import InProcess
from tests.support import fetch, run_sql, wait_until

ALICE = Principal("token", "alice", frozenset({"datasets:*"}), limit_key="token alice #7",
                  token_id=7)


@pytest.fixture
def app(database_url: str, files_root: Path, tmp_path: Path) -> Iterator[InProcess]:
    settings = Settings(database_url=database_url, files_root=files_root,
                        exports_dir=tmp_path / "exports", exports_progress_interval=0.1,
                        exports_max_bytes=1_000_000, exports_cleanup_interval=3600)
    run_sql(database_url, "DELETE FROM exporter.stored_exports")
    with InProcess(settings) as running:
        yield running
    run_sql(database_url, "DELETE FROM exporter.stored_exports")


def begin(st: State, principal: Principal = ALICE,  # type: ignore[no-untyped-def]
          kind: str = STREAMED):
    assert st.stored is not None
    return st.stored.begin(principal, url="/datasets/orders.csv", dataset="orders",
                           format="csv", coding=None, content_type="text/csv; charset=utf-8",
                           filename="orders.csv", kind=kind)


def row(database_url: str, export_id: str) -> dict[str, object]:
    rows = fetch(database_url, "SELECT * FROM exporter.stored_exports WHERE id = $1", export_id)
    return dict(rows[0]) if rows else {}


def test_a_finished_export_is_whole_hashed_and_in_place(app: InProcess, database_url: str,
                                                        tmp_path: Path) -> None:
    data = [os.urandom(70_000), b"", os.urandom(5)]

    async def go(st: State) -> str:
        writer = await begin(st)
        assert (tmp_path / "exports" / f"{writer.id}.part").exists()
        assert not (tmp_path / "exports" / writer.id).exists()  # never a half file there
        for chunk in data:
            await writer.write(chunk)
        await writer.progress(3)
        await writer.finish(3, None)
        return str(writer.id)

    export_id = app.call(go)
    whole = b"".join(data)
    assert (tmp_path / "exports" / export_id).read_bytes() == whole
    assert not (tmp_path / "exports" / f"{export_id}.part").exists()
    r = row(database_url, export_id)
    assert r["status"] == "complete" and r["bytes"] == len(whole) and r["rows"] == 3
    assert bytes(r["sha256"]) == hashlib.sha256(whole).digest()  # type: ignore[arg-type]
    assert r["owner"] == "token 7" and r["kind"] == "streamed" and r["expires"] is not None


def test_a_failed_export_leaves_no_file(app: InProcess, database_url: str,
                                        tmp_path: Path) -> None:
    async def go(st: State) -> str:
        writer = await begin(st)
        await writer.write(b"x" * 1000)
        await writer.fail("the client left")
        return str(writer.id)

    export_id = app.call(go)
    assert list((tmp_path / "exports").iterdir()) == []
    r = row(database_url, export_id)
    assert r["status"] == "failed" and r["error"] == "the client left"


def test_cancelled_from_elsewhere_stops_the_writer(app: InProcess, database_url: str,
                                                   tmp_path: Path) -> None:
    async def start(st: State) -> object:
        writer = await begin(st)
        await writer.write(b"x" * 10)
        return writer

    writer = app.call(start)
    run_sql(database_url, "UPDATE exporter.stored_exports SET status = 'cancelled'"
            f" WHERE id = '{writer.id}'")  # type: ignore[attr-defined]
    assert wait_until(lambda: writer.stopped.is_set(), 10)  # type: ignore[attr-defined]

    async def more(st: State) -> None:
        with pytest.raises(Stopped):
            await writer.write(b"y")  # type: ignore[attr-defined]
        await writer.fail("stopped")  # type: ignore[attr-defined]

    app.call(more)
    r = row(database_url, writer.id)  # type: ignore[attr-defined]
    assert r["status"] == "cancelled"
    assert list((tmp_path / "exports").iterdir()) == []


def test_the_quota(app: InProcess, database_url: str) -> None:
    # Stored exports (copies of streamed ones would be removed to make room: below).
    async def go(st: State) -> None:
        writer = await begin(st, kind=ASYNC)
        await writer.write(b"x" * 600_000)
        await writer.finish(1, None)
        second = await begin(st, kind=ASYNC)
        with pytest.raises(Stopped, match="quota"):
            for _ in range(100):
                await second.write(b"x" * 100_000)
                await __import__("asyncio").sleep(0.05)
        assert second.reason == QUOTA_EXCEEDED
        await second.fail(second.reason or "")
        third = await begin(st, kind=ASYNC)
        await third.write(b"x" * 400_000)  # exactly up to the quota
        await third.finish(1, None)
        with pytest.raises(ApiError) as refused:
            await begin(st, kind=ASYNC)
        assert refused.value.status == 507 and "quota" in refused.value.message

    app.call(go)


def test_copies_of_streamed_exports_make_room_oldest_first(app: InProcess,
                                                           database_url: str) -> None:
    async def go(st: State) -> list[str]:
        ids = []
        for size in (300_000, 300_000, 400_000):  # the quota, full of copies
            copy = await begin(st)
            await copy.write(b"x" * size)
            await copy.finish(1, None)
            ids.append(copy.id)
        new = await begin(st, kind=ASYNC)  # the oldest copy goes, and only it
        await new.fail("done")
        return ids

    ids = app.call(go)
    assert [row(database_url, i)["status"] for i in ids] == ["failed", "complete", "complete"]
    assert "make room" in str(row(database_url, ids[0])["error"])


def test_clean_up(app: InProcess, database_url: str, tmp_path: Path) -> None:
    async def go(st: State) -> tuple[str, str, object]:
        done = await begin(st)
        await done.write(b"old")
        await done.finish(1, None)
        dead = await begin(st)
        await dead.write(b"half")
        await dead._stop_beating()  # as if its server had been killed
        alive = await begin(st)
        return str(done.id), str(dead.id), alive

    done, dead, writer = app.call(go)
    try:
        _check_clean_up(app, database_url, tmp_path, done, dead,
                        str(writer.id))  # type: ignore[attr-defined]
    finally:
        # Its heartbeat would go on beating until the app's loop stops, which can stop it
        # inside a beat's transaction: left open, its row lock then holds every later
        # DELETE or clean-up of stored exports in this database (a run waited 10 minutes).
        app.call(lambda st: writer.fail("the test is over"))  # type: ignore[attr-defined]


def _check_clean_up(app: InProcess, database_url: str, tmp_path: Path, done: str, dead: str,
                    alive: str) -> None:
    (tmp_path / "exports" / "orphan1234").write_bytes(b"nobody's")
    (tmp_path / "exports" / "not-ours.txt").write_bytes(b"left alone")
    run_sql(database_url, "UPDATE exporter.stored_exports SET expires = now() - interval '1s'"
            f" WHERE id = '{done}'")
    run_sql(database_url, "UPDATE exporter.stored_exports SET heartbeat = now() - interval"
            f" '1 minute' WHERE id = '{dead}'")
    assert app.state.stored is not None
    counts = app.run(app.state.stored.clean_up())
    assert counts == {"stale": 1, "expired": 1, "orphans": 2}
    assert row(database_url, done) == {}
    r = row(database_url, dead)
    assert r["status"] == "failed" and r["error"] == SERVER_STOPPED
    assert row(database_url, alive)["status"] == "running"
    left = sorted(p.name for p in (tmp_path / "exports").iterdir())
    assert left == sorted(["not-ours.txt", f"{alive}.part"])


def test_owners() -> None:
    anonymous = Principal("anonymous", "10.0.0.7", frozenset(), limit_key="anonymous 10.0.0.7")
    link = Principal("link", "alice", frozenset(), limit_key="token alice #7", token_id=7)
    assert owner_of(ALICE) == owner_of(link) == "token 7"
    assert owner_of(anonymous) == "anonymous 10.0.0.7"


class FullDisk(LocalStorage):
    """A storage whose disk has no room left: every write fails with ENOSPC, as the
    kernel's /dev/full makes it fail."""

    def _create(self, key: str) -> LocalWriter:
        final = self.path(key)
        return LocalWriter(final, final.with_name(final.name + PARTIAL),
                           os.open("/dev/full", os.O_WRONLY))


def test_a_full_disk_costs_a_streamed_export_its_copy_never_its_download(
        app: InProcess, database_url: str, tmp_path: Path) -> None:
    st = app.state
    assert st.stored is not None
    token = app.call(lambda st: st.tokens.create(f"full-{os.urandom(3).hex()}",
                                                 ["datasets:*"], None))
    identity = {"Accept-Encoding": "identity", "Authorization": f"Bearer {token}"}
    whole = app.get("/datasets/orders.csv?order=id", headers=identity)
    assert whole.status_code == 200
    kept = st.stored.storage
    st.stored.storage = FullDisk(tmp_path / "full")
    try:
        r = app.get("/datasets/orders.csv?order=id", headers=identity)
    finally:
        st.stored.storage = kept
    assert r.status_code == 200 and r.content == whole.content
    copy_id = r.headers["etag"].strip('"')
    assert wait_until(lambda: row(database_url, copy_id).get("status") == "failed", 10)
    assert "could not be written" in str(row(database_url, copy_id)["error"])
