"""The stored exports' writer and clean-up (exporter/stored/store.py), in process against
the real database and a real folder: what the routes and the stored copies of streamed
exports build on."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from exporter.access.principal import Principal
from exporter.config import Settings
from exporter.errors import ApiError
from exporter.state import State
from exporter.stored.resume_copies import StoredResumeCopies
from exporter.stored.storage import (
    BATCH_BYTES,
    PARTIAL,
    LocalStorage,
    LocalWriter,
    StorageWriter,
)
from exporter.stored.store import (
    ASYNC,
    COPIES_EXCEEDED,
    EVICTED,
    EXPIRED,
    QUOTA_EXCEEDED,
    SERVER_STOPPED,
    SHARE_EXCEEDED,
    STALE_BEATS,
    STREAMED,
    WriterStopped,
    owner_of,
)
from tests.inprocess import InProcess
from tests.support import fetch, run_sql, wait_until

# Token rows of their own, far above the ids the suite's tokens get: a stored export
# checks at each beat that the token it runs for is still valid (issue 20).
ALICE_ID, BOB_ID = 900_007, 900_008
ALICE = Principal("token", "alice", frozenset({"datasets:*"}), limit_key="token alice #7",
                  token_id=ALICE_ID)


@pytest.fixture
def app(database_url: str, files_root: Path, tmp_path: Path,
        request: pytest.FixtureRequest) -> Iterator[InProcess]:
    """The quota 1,000,000 bytes; the shares (a principal's, the copies') all of it unless
    the test is parametrized with {"share": f, "copies": f}."""
    settings = Settings(database_url=database_url, files_root=files_root,
                        exports_dir=tmp_path / "exports", exports_progress_interval=0.1,
                        exports_max_bytes=1_000_000, exports_cleanup_interval=3600,
                        exports_quota_per_principal=getattr(request, "param", {}).get(
                            "share", 1.0),
                        exports_resume_share=getattr(request, "param", {}).get(
                            "copies", 1.0))
    run_sql(database_url, "DELETE FROM exporter.stored_exports")
    add_owners(database_url)
    with InProcess(settings) as running:
        yield running
    run_sql(database_url, "DELETE FROM exporter.stored_exports")


def add_owners(database_url: str) -> None:
    """Alice's and Bob's tokens, whose rows a writer's heartbeat checks (a token that is
    not there counts as revoked: the export stops)."""
    run_sql(database_url,
            "INSERT INTO exporter.tokens (id, name, secret_hash, scopes) OVERRIDING SYSTEM"
            f" VALUE VALUES ({ALICE_ID}, 'stored-store-alice', 'alice-not-a-hash',"
            f" '{{datasets:*}}'), ({BOB_ID}, 'stored-store-bob', 'bob-not-a-hash',"
            " '{datasets:*}') ON CONFLICT (id) DO NOTHING")


BOB = Principal("token", "bob", frozenset({"datasets:*"}), limit_key="token bob #8",
                token_id=BOB_ID)
# A link Alice made: her share too.
LINK = Principal("link", "alice", frozenset({"datasets:*"}), limit_key="token alice #7",
                 token_id=ALICE_ID)
ANONYMOUS = Principal("anonymous", "10.0.0.9", frozenset({"datasets:orders"}),
                      limit_key="anonymous 10.0.0.9")


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
    assert r["owner"] == f"token {ALICE_ID}" and r["kind"] == "streamed"
    assert r["expires"] is not None


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
        with pytest.raises(WriterStopped):
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
        with pytest.raises(WriterStopped, match="quota"):
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


async def _stored(st: State, size: int, principal: Principal = ALICE,
                  kind: str = ASYNC) -> str:
    writer = await begin(st, principal, kind=kind)
    await writer.write(b"x" * size)
    await writer.finish(1, None)
    return str(writer.id)


@pytest.mark.parametrize("app", [{"share": 0.3}], indirect=True)
def test_one_principal_cannot_fill_the_quota_for_everyone(app: InProcess) -> None:
    async def go(st: State) -> None:
        await _stored(st, 300_000)  # Alice's whole share
        for principal in (ALICE, LINK):
            with pytest.raises(ApiError) as refused:
                await begin(st, principal, kind=ASYNC)
            assert refused.value.status == 507 and "share" in refused.value.message
        # Others still have theirs; a running export crossing its share stops.
        await _stored(st, 250_000, BOB)
        second = await begin(st, BOB, kind=ASYNC)
        with pytest.raises(WriterStopped):
            await second.write(b"x" * 60_000)
        assert second.reason == SHARE_EXCEEDED
        await second.fail(second.reason or "")
        await _stored(st, 300_000, ANONYMOUS)
        # A copy is nobody's share: Alice's streamed downloads still keep theirs.
        await _stored(st, 100_000, ALICE, STREAMED)

    app.call(go)


def test_copies_make_room_whenever_a_stored_export_needs_it(app: InProcess,
                                                             database_url: str) -> None:
    """The quota is not full (1,000 bytes left) when a 3 KB export starts: the copy goes
    as soon as the export needs its room, not only once usage reaches the cap."""
    async def go(st: State) -> tuple[str, str]:
        copy = await _stored(st, 999_000, kind=STREAMED)
        return copy, await _stored(st, 3_000, BOB)

    copy, export = app.call(go)
    assert row(database_url, export)["status"] == "complete"
    assert row(database_url, export)["bytes"] == 3_000
    assert row(database_url, copy)["status"] == "failed"
    assert row(database_url, copy)["error"] == EVICTED


@pytest.mark.parametrize("app", [{"copies": 0.5}], indirect=True)
def test_copies_hold_their_share_at_most_oldest_first(app: InProcess,
                                                      database_url: str) -> None:
    async def go(st: State) -> list[str]:
        ids = [await _stored(st, 200_000, kind=STREAMED) for _ in range(2)]
        ids.append(await _stored(st, 250_000, BOB, STREAMED))  # the oldest goes
        too_big = await begin(st)
        with pytest.raises(WriterStopped):
            await too_big.write(b"x" * 600_000)
        assert too_big.reason == COPIES_EXCEEDED
        await too_big.fail(too_big.reason or "")
        ids.append(await _stored(st, 400_000, BOB))  # stored exports: beyond that share
        return ids

    ids = app.call(go)
    assert [row(database_url, i)["status"] for i in ids] == [
        "failed", "complete", "complete", "complete"]
    assert row(database_url, ids[0])["error"] == EVICTED


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
    # A resume copy's file goes; its row stays, failed, for as long as a download may be
    # resumed (a resume must know every response of its URL), then goes too.
    gone = row(database_url, done)
    assert gone["status"] == "failed" and gone["error"] == EXPIRED
    run_sql(database_url, "UPDATE exporter.stored_exports SET expires = now() - interval '1s'"
            f" WHERE id = '{done}'")
    app.run(app.state.stored.clean_up())
    assert row(database_url, done) == {}
    r = row(database_url, dead)
    assert r["status"] == "failed" and r["error"] == SERVER_STOPPED
    assert row(database_url, alive)["status"] == "running"
    left = sorted(p.name for p in (tmp_path / "exports").iterdir())
    assert left == sorted(["not-ours.txt", f"{alive}.part"])


def test_owners() -> None:
    anonymous = Principal("anonymous", "10.0.0.7", frozenset(), limit_key="anonymous 10.0.0.7")
    link = Principal("link", "alice", frozenset(), limit_key="token alice #7",
                     token_id=ALICE_ID)
    assert owner_of(ALICE) == owner_of(link) == f"token {ALICE_ID}"
    assert owner_of(anonymous) == "anonymous 10.0.0.7"


def test_a_local_writer_gathers_chunks_into_few_thread_calls_and_loses_none(
        tmp_path: Path) -> None:
    """The first chunk is written at once (a disk without room shows at once), the rest in
    calls of BATCH_BYTES; the commit writes what is left and the digest covers it all."""
    chunks = [os.urandom(65536 + i) for i in range(40)]
    final, partial = tmp_path / "c", tmp_path / f"c{PARTIAL}"

    async def go() -> bytes:
        writer = LocalWriter(final, partial, os.open(partial, os.O_WRONLY | os.O_CREAT))
        digest = hashlib.sha256()
        await writer.write_hashed(chunks[0], digest)
        assert partial.stat().st_size == len(chunks[0])
        given = len(chunks[0])
        for chunk in chunks[1:]:
            await writer.write_hashed(chunk, digest)
            given += len(chunk)
            assert 0 <= given - partial.stat().st_size < BATCH_BYTES
        assert partial.stat().st_size < given  # the last ones wait for the commit
        await writer.commit()
        return digest.digest()

    digest = asyncio.run(go())
    assert final.read_bytes() == b"".join(chunks) and not partial.exists()
    assert digest == hashlib.sha256(b"".join(chunks)).digest()

    async def dropped() -> None:
        writer = LocalWriter(final, partial, os.open(partial, os.O_WRONLY | os.O_CREAT))
        for chunk in chunks[:3]:
            await writer.write_hashed(chunk, hashlib.sha256())
        await writer.abort()

    final.unlink()
    asyncio.run(dropped())
    assert not partial.exists() and not final.exists()


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


def test_a_copy_is_kept_long_only_while_its_download_is_cut(app: InProcess,
                                                            database_url: str) -> None:
    """EXPORTER_EXPORTS_RESUME_RETENTION (1h) for a copy whose response was cut,
    EXPORTER_EXPORTS_RESUME_COMPLETE_RETENTION (1m) once one was sent whole."""
    copies = app.state.resume_copies
    assert isinstance(copies, StoredResumeCopies)

    async def copy(delivered: int) -> str:
        writer = await begin(app.state)
        await writer.write(b"x" * 1000)
        await copies.record_delivered(writer.id, delivered)  # the response ended
        await writer.finish(1, None)
        await copies.keep_for_resuming(writer.id)
        return str(writer.id)

    def kept(copy_id: str) -> float:
        rows = fetch(database_url, "SELECT extract(epoch FROM expires - finished) AS s"
                     " FROM exporter.stored_exports WHERE id = $1", copy_id)
        return float(rows[0]["s"])

    cut, whole = app.run(copy(400)), app.run(copy(1000))
    assert kept(cut) == 3600 and kept(whole) == 60
    # A resume of the cut one that ran to the end: from now on kept briefly too.
    app.run(copies.record_delivered(cut, 1000))
    left = fetch(database_url, "SELECT extract(epoch FROM expires - now()) AS s"
                 " FROM exporter.stored_exports WHERE id = $1", cut)[0]["s"]
    assert 0 < float(left) <= 60


class SlowCommits(LocalStorage):
    """A folder whose commits take as long as an object store's completion of a large
    upload (its last part, then CompleteMultipartUpload): seconds."""

    def __init__(self, folder: Path, seconds: float) -> None:
        super().__init__(folder)
        self.seconds = seconds
        self.committing = asyncio.Event()

    async def create(self, key: str) -> StorageWriter:
        writer = await super().create(key)
        commit = writer.commit

        async def slow_commit() -> None:
            self.committing.set()
            await asyncio.sleep(self.seconds)
            await commit()

        writer.commit = slow_commit  # type: ignore[method-assign]
        return writer


def test_a_writer_beats_on_while_it_commits(app: InProcess, database_url: str,
                                            tmp_path: Path) -> None:
    """A commit longer than the beats the clean-up waits for (another host's, say) is no
    sign of a dead server: the export completes. It failed when the beats stopped first."""
    stale = STALE_BEATS * app.settings.exports_progress_interval

    async def go(st: State) -> tuple[str, dict[str, int]]:
        assert st.stored is not None
        kept = st.stored.storage
        slow = SlowCommits(tmp_path / "slow", seconds=3 * stale)
        st.stored.storage = slow
        try:
            writer = await begin(st)
            await writer.write(b"x" * 1000)
            finishing = asyncio.ensure_future(writer.finish(1, None))
            await slow.committing.wait()
            await asyncio.sleep(2 * stale)  # what is tested: the time without a beat
            counts = await st.stored.clean_up()
            await finishing
        finally:
            st.stored.storage = kept
        return str(writer.id), counts

    export_id, counts = app.call(go)
    assert counts["stale"] == 0
    assert row(database_url, export_id)["status"] == "complete"
