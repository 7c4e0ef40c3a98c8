"""Stored exports and resume copies in an object store (EXPORTER_EXPORTS_DIR=s3://...),
served by two hosts: two exporter processes with local folders of their own, one
PostgreSQL and one store (a real SeaweedFS, tests/s3.py), as docs/deploy.md lays out.

A stored export started on host A is polled and fetched from host B (Range, multi-range,
`curl -C -`, digests); a streamed export cut on A is resumed with `curl -C -` on B,
byte-identical; an export that fails mid-write (its token revoked) leaves no object and
no upload; host A killed with SIGKILL mid-export: its client sees a broken download, B's
clean-up marks the exports failed and aborts the uploads it left. In process: the
quota's eviction, expiry and the clean-up delete objects."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from exporter.config import Settings
from exporter.objects import ObjectMissing, ObjectStore, StoreOptions, Upload
from exporter.state import State
from exporter.stored.store import ASYNC
from tests.inprocess import InProcess
from tests.s3 import Seaweed
from tests.support import Server, fetch, run_async, run_sql, wait_until
from tests.test_access import bearer, cli, new_token
from tests.test_stored_exports import start, wait_done
from tests.test_stored_store import add_owners, begin

pytestmark = pytest.mark.needs("curl", "wget")

PART = 5 * 1024 * 1024
# About 6.6 MB of CSV: more than one part, so that its copy is a multipart upload.
ROWS = 160_000
VIEW = "s3_rows"
IDENTITY = {"Accept-Encoding": "identity"}
# No quota on the hosts (its rules over the store: the in-process test): the endless
# exports below run until they are stopped.
QUOTA = {"EXPORTER_EXPORTS_MAX_BYTES": "0"}
FAST = {"EXPORTER_EXPORTS_PROGRESS_INTERVAL": "0.2", "EXPORTER_EXPORTS_CLEANUP_INTERVAL": "1",
        "EXPORTER_EXPORTS_RESUME_FINISH": "60", "EXPORTER_S3_PART_SIZE": str(PART)}


@pytest.fixture(scope="module")
def views(database_url: str) -> None:
    run_sql(database_url,
            f"CREATE OR REPLACE VIEW exports.{VIEW} AS SELECT g AS id, md5(g::text) AS note"
            f" FROM generate_series(1, {ROWS}) AS g",
            "CREATE OR REPLACE VIEW exports.s3_endless AS"
            " SELECT generate_series(1, 1000000000) AS id, repeat('x', 200) AS pad")


@pytest.fixture(scope="module")
def prefix(s3: Seaweed) -> str:
    return s3.url(f"hosts-{uuid.uuid4().hex[:8]}")


class Hosts:
    def __init__(self, make: type[Server], s3: Seaweed, prefix: str, folder: Path,
                 database_url: str) -> None:
        self._make, self._s3, self.prefix, self._folder = make, s3, prefix, folder
        self.database_url = database_url

    def host(self, name: str) -> Server:
        """A host: its own data folder and files root, the shared database and store."""
        local = self._folder / f"{name}-{uuid.uuid4().hex[:6]}"
        (local / "files").mkdir(parents=True)
        return self._make({**self._s3.env, **FAST, **QUOTA,
                           "EXPORTER_EXPORTS_DIR": self.prefix,
                           "EXPORTER_DATA_DIR": str(local),
                           "EXPORTER_FILES_ROOT": str(local / "files")})

    def store(self) -> ObjectStore:
        for name, value in self._s3.env.items():
            os.environ.setdefault(name, value)
        return ObjectStore(self.prefix, StoreOptions(allow_http=True, timeout=10))


@pytest.fixture(scope="module")
def hosts(make_module_server: type[Server], s3: Seaweed, prefix: str, database_url: str,
          tmp_path_factory: pytest.TempPathFactory, views: None) -> Hosts:
    return Hosts(make_module_server, s3, prefix, tmp_path_factory.mktemp("hosts"),
                 database_url)


@pytest.fixture(scope="module")
def a(hosts: Hosts) -> Iterator[Server]:
    with hosts.host("a") as s:
        yield s


@pytest.fixture(scope="module")
def b(hosts: Hosts) -> Iterator[Server]:
    with hosts.host("b") as s:
        yield s


@pytest.fixture(scope="module")
def token(database_url: str) -> str:
    return new_token(database_url, f"s3-{uuid.uuid4().hex[:8]}", "datasets:*")


def expected() -> bytes:
    """The view's CSV, made here."""
    return b"id,note\n" + b"".join(
        b"%d,%s\n" % (g, hashlib.md5(str(g).encode()).hexdigest().encode())
        for g in range(1, ROWS + 1))


def head(hosts: Hosts, key: str) -> int | None:
    async def go() -> int | None:
        try:
            return (await hosts.store().head(key)).size
        except ObjectMissing:
            return None

    return run_async(go)


def uploads(hosts: Hosts) -> list[Upload]:
    async def go() -> list[Upload]:
        return await hosts.store().uploads()

    return run_async(go)


def status(database_url: str, export_id: str) -> dict[str, Any]:
    rows = fetch(database_url, "SELECT status, error, bytes FROM exporter.stored_exports"
                 " WHERE id = $1", export_id)
    return dict(rows[0])


def test_eviction_and_the_clean_up_delete_objects(
        database_url: str, files_root: Path, s3: Seaweed, s3_prefix: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """In process, the quota's rules over the store: a copy removed to make room, an
    expired one and an object no row names go from the store; what is not ours stays."""
    for name, value in s3.env.items():
        monkeypatch.setenv(name, value)
    settings = Settings(database_url=database_url, files_root=files_root,
                        exports_dir=s3_prefix, exports_max_bytes=1_000_000,
                        exports_quota_per_principal=1.0, exports_resume_share=1.0,
                        exports_progress_interval=0.1, exports_cleanup_interval=3600,
                        s3_allow_http=True)
    store = ObjectStore(s3_prefix, StoreOptions(allow_http=True, timeout=10))
    run_sql(database_url, "DELETE FROM exporter.stored_exports")
    add_owners(database_url)  # whatever ran before on this database

    async def fill(st: State) -> list[str]:
        assert st.stored is not None
        ids = []
        for size in (300_000, 300_000, 400_000):  # the quota, full of copies
            writer = await begin(st)
            await writer.write(b"x" * size)
            await writer.finish(1, None)
            ids.append(writer.id)
        assert [(await store.head(i)).size for i in ids] == [300_000, 300_000, 400_000]
        new = await begin(st, kind=ASYNC)  # the oldest copy goes, its object with it
        await new.fail("done")
        await store.put("orphan1234", b"nobody's")
        await store.put("not-ours.txt", b"left alone")
        return ids

    try:
        with InProcess(settings) as app:
            evicted, expired, kept = app.call(fill)
            assert "make room" in str(status(database_url, evicted)["error"])
            run_sql(database_url, "UPDATE exporter.stored_exports SET expires = now()"
                    f" - interval '1s' WHERE id = '{expired}'")
            assert app.state.stored is not None
            assert app.run(app.state.stored.clean_up())["orphans"] == 1

            async def left() -> list[str]:
                return sorted([o.key async for page in store.walk() for o in page])

            assert app.run(left()) == sorted([kept, "not-ours.txt"])

            async def read_on(st: State) -> list[int]:
                # As a resume compares two copies' first bytes: read on, a part at a time.
                assert st.stored is not None
                opened, stat = await st.stored.storage.open(kept)
                assert stat.st_size == 400_000
                sizes = [len(await opened.read(150_000)) for _ in range(4)]
                await opened.close()
                return sizes

            assert app.call(read_on) == [150_000, 150_000, 100_000, 0]
    finally:
        run_sql(database_url, "DELETE FROM exporter.stored_exports")


def test_a_stored_export_started_on_a_is_fetched_from_b(
        a: Server, b: Server, hosts: Hosts, token: str, tmp_path: Path) -> None:
    r = start(a, token, f"/datasets/{VIEW}.csv?order=id")
    assert r.status_code == 202, r.text
    export_id = r.json()["id"]
    done = wait_done(b, token, r.headers["location"])
    assert done.status_code == 200, done.text
    m = done.json()
    whole = httpx.get(m["file_url"], headers=bearer(token), timeout=60)
    assert whole.status_code == 200 and len(whole.content) == m["bytes"] > PART
    assert whole.content == expected()
    assert m["file_url"].startswith(b.url) and m["sha256"] == \
        hashlib.sha256(whole.content).hexdigest()
    assert whole.headers["repr-digest"] == f"sha-256=:{m['sha256_base64']}:"
    assert whole.headers["etag"] == f'"{export_id}"'
    assert head(hosts, export_id) == m["bytes"]  # the object, under its id
    # Ranges across parts, several at once, conditions; a HEAD.
    data = whole.content
    r = httpx.get(m["file_url"], headers={**bearer(token), "Range": f"bytes={PART - 5}-{PART + 4}"})
    assert r.status_code == 206 and r.content == data[PART - 5:PART + 5]
    assert r.headers["content-range"] == f"bytes {PART - 5}-{PART + 4}/{len(data)}"
    r = httpx.get(m["file_url"], headers={**bearer(token), "Range": "bytes=0-9,-10"})
    assert r.status_code == 206 and data[:10] in r.content and data[-10:] in r.content
    assert httpx.get(m["file_url"], headers={**bearer(token), "If-None-Match": f'"{export_id}"'}
                     ).status_code == 304
    r = httpx.head(m["file_url"], headers=bearer(token))
    assert r.status_code == 200 and int(r.headers["content-length"]) == len(data)
    # curl and wget resume a partial file from B (host A made it).
    out = tmp_path / "resumed.csv"
    out.write_bytes(data[:12345])
    subprocess.run(["curl", "-sS", "-f", "-C", "-", "-o", str(out), "-H",
                    f"Authorization: Bearer {token}", m["file_url"]], check=True, timeout=60)
    assert out.read_bytes() == data
    out.write_bytes(data[:PART + 3])
    subprocess.run(["wget", "-q", "-c", "-O", str(out), "--header",
                    f"Authorization: Bearer {token}", m["file_url"]], check=True, timeout=60)
    assert out.read_bytes() == data
    # Removed from A: the object goes too, and B answers 404.
    assert httpx.delete(f"{a.url}/exports/{export_id}", headers=bearer(token)).status_code == 204
    assert head(hosts, export_id) is None
    assert httpx.get(m["file_url"], headers=bearer(token)).status_code == 404


def test_a_streamed_export_cut_on_a_is_resumed_on_b(
        a: Server, b: Server, hosts: Hosts, token: str, tmp_path: Path) -> None:
    path = f"/datasets/{VIEW}.csv?order=id&note=neq.cut"
    headers = {**bearer(token), **IDENTITY}
    with httpx.stream("GET", a.url + path, headers=headers, timeout=60) as r:
        assert r.status_code == 200
        etag = r.headers["etag"]
        held = b""
        for chunk in r.iter_raw():
            held += chunk
            if len(held) > 200_000:
                break
    copy_id = etag.strip('"')
    # A finishes the copy after its client left: a multipart upload, then an object.
    assert wait_until(lambda: status(hosts.database_url, copy_id)["status"] != "running", 60)
    out = tmp_path / "out.csv"
    out.write_bytes(held[:150_000])
    done = subprocess.run(["curl", "-sS", "-f", "-C", "-", "-o", str(out), "-H",
                           f"Authorization: Bearer {token}", b.url + path],
                          capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    whole = expected()  # every row: the filter keeps them all
    assert len(whole) > PART and out.read_bytes() == whole
    assert head(hosts, copy_id) == len(whole)


def test_an_export_that_fails_mid_write_leaves_no_object(
        a: Server, b: Server, hosts: Hosts, database_url: str) -> None:
    """Its token revoked once parts are up: the upload is aborted, and the export looks
    failed from either host."""
    name = f"s3-revoked-{uuid.uuid4().hex[:8]}"
    token = new_token(database_url, name, "datasets:*")
    r = start(a, token, "/datasets/s3_endless.csv")
    assert r.status_code == 202, r.text
    export_id = r.json()["id"]
    assert wait_until(lambda: uploads_of(hosts, export_id), 30)  # a part is up
    cli(database_url, "token", "revoke", name)
    boss = new_token(database_url, f"s3-boss-{uuid.uuid4().hex[:8]}", "admin")
    done = wait_done(b, boss, r.headers["location"])
    assert done.status_code == 410, done.text
    m = done.json()
    assert m["status"] == "failed" and "revoked" in m["error"], m
    assert m["bytes"] > PART
    assert head(hosts, export_id) is None
    assert uploads_of(hosts, export_id) == []
    assert httpx.get(f"{b.url}/exports/{export_id}/file", headers=bearer(boss)
                     ).status_code == 410


def test_the_clean_up_removes_objects_no_row_names(b: Server, hosts: Hosts) -> None:
    orphan = uuid.uuid4().hex[:22]
    # Stored (its ETag back). Not looked at again first: a clean-up may run at any moment
    # and find it before the HEAD would (seen in a full run).
    assert run_async(lambda: hosts.store().put(orphan, b"left by nobody"))
    assert wait_until(lambda: head(hosts, orphan) is None, 30)


def test_a_host_killed_mid_export(a: Server, b: Server, hosts: Hosts,
                                  database_url: str) -> None:
    """SIGKILL on host A (the last test it serves) while it writes a stored export and
    streams an export (with its copy), both multipart uploads under way: the client's
    download is broken; B's clean-up marks both failed (nothing stays running) and aborts
    the uploads A left."""
    token = new_token(database_url, f"s3-kill-{uuid.uuid4().hex[:8]}", "datasets:*")
    r = start(a, token, "/datasets/s3_endless.csv")
    assert r.status_code == 202, r.text
    export_id = r.json()["id"]
    broken = False
    got = 0
    with httpx.stream("GET", f"{a.url}/datasets/s3_endless.csv?id=gt.5",
                      headers={**bearer(token), **IDENTITY}, timeout=60) as streamed:
        copy_id = streamed.headers["etag"].strip('"')
        try:
            for chunk in streamed.iter_raw():
                got += len(chunk)
                if got > PART + 1024 * 1024 and a.process is not None \
                        and a.process.poll() is None:
                    # Read no further meanwhile: the export (and its copy) waits for us.
                    assert wait_until(lambda: uploads_of(hosts, export_id)
                                      and uploads_of(hosts, copy_id), 30)
                    os.killpg(a.pid, signal.SIGKILL)
                    a.process.wait(10)
        except httpx.HTTPError:
            broken = True
    assert broken and got > PART  # chunked, never ended: curl would exit with 18

    def settled() -> bool:
        rows = [status(database_url, i) for i in (export_id, copy_id)]
        return all(row["status"] == "failed" for row in rows)

    assert wait_until(settled, 30), [status(database_url, i) for i in (export_id, copy_id)]
    assert status(database_url, export_id)["error"] == "the server stopped while it ran"
    assert wait_until(lambda: not uploads_of(hosts, export_id)
                      and not uploads_of(hosts, copy_id), 30)
    assert head(hosts, export_id) is None and head(hosts, copy_id) is None
    r = httpx.get(f"{b.url}/exports/{export_id}", headers=bearer(token))
    assert r.status_code == 410 and r.json()["status"] == "failed"


def uploads_of(hosts: Hosts, key: str) -> list[Upload]:
    return [u for u in uploads(hosts) if u.key == key]


def test_the_setting_takes_a_folder_or_a_store(tmp_path: Path) -> None:
    store = Settings(exports_dir="s3://bucket/a/b/")
    assert store.exports_store == "s3://bucket/a/b"
    folder = Settings(exports_dir=tmp_path)
    assert folder.exports_store is None and folder.exports_folder == tmp_path
    for bad in ("s3://B/x", "s3://bucket/a/../x", "s3://bucket:9000/x", "s3://bucket/x?y=1"):
        with pytest.raises(ValidationError):
            Settings(exports_dir=bad)


def test_a_store_that_is_down_is_503_never_500(
        database_url: str, files_root: Path, s3: Seaweed, monkeypatch: pytest.MonkeyPatch,
        s3_prefix: str) -> None:
    for name, value in s3.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens
    settings = Settings(database_url=database_url, files_root=files_root,
                        exports_dir=s3_prefix, s3_allow_http=True, s3_timeout=2,
                        exports_cleanup_interval=3600)
    export_id = uuid.uuid4().hex[:22]
    run_sql(database_url,
            "INSERT INTO exporter.stored_exports (id, owner, principal, kind, url, dataset,"
            " format, content_type, filename, status, storage_key, sha256, bytes, expires)"
            f" VALUES ('{export_id}', 'nobody', 'nobody', 'async', '/datasets/orders.csv',"
            " 'orders', 'csv', 'text/csv', 'orders.csv', 'complete',"
            f" '{export_id}', sha256(''), 0, now() + interval '1h')")
    try:
        with InProcess(settings) as app:
            token = app.call(lambda st: st.tokens.create(f"down-{uuid.uuid4().hex[:6]}",
                                                         ["admin"], None))
            r = app.get(f"/exports/{export_id}/file", headers=bearer(token))
            assert r.status_code == 503 and r.headers["retry-after"] == "5", r.text
            assert "cannot be read" in r.json()["message"]
    finally:
        run_sql(database_url, f"DELETE FROM exporter.stored_exports WHERE id = '{export_id}'")
