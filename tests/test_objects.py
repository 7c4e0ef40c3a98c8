"""exporter/objects.py against a real S3 server (SeaweedFS, tests/s3.py): keys that
cannot escape the prefix, heads, ranged streamed reads, listings, the multipart writer
(whole or nothing), deletes, pre-signed URLs, and a store that is down."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import httpx
import obstore
import pytest
from obstore.store import S3Store

from exporter.objects import (
    BadKey,
    ListingCache,
    ObjectChanged,
    ObjectInfo,
    ObjectMissing,
    ObjectStore,
    StoreOptions,
    StoreUnavailable,
    StoreUrl,
    check_folder,
    check_key,
)
from exporter.objects import Listing as FolderListing
from exporter.stored.bucket import BucketStorage
from tests.s3 import ACCESS_KEY, REGION, SECRET_KEY, Seaweed
from tests.support import free_port, wait_until

T = TypeVar("T")
OPTIONS = StoreOptions(allow_http=True, timeout=10, part_size=5 * 1024 * 1024)


@pytest.fixture
def store(s3: Seaweed, s3_prefix: str, monkeypatch: pytest.MonkeyPatch) -> ObjectStore:
    for name, value in s3.env.items():
        monkeypatch.setenv(name, value)
    return ObjectStore(s3_prefix, OPTIONS)


def run(go: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await go()

    return asyncio.run(main())


async def collect(chunks: AsyncIterator[bytes]) -> bytes:
    return b"".join([c async for c in chunks])


@pytest.mark.parametrize("key", [
    "", "/abs", "a//b", "a/", "./a", "a/./b", "..", "../x", "a/../../x", "a\\..\\x", "a\\b",
    "a\x00b", "a\nb", "a\x7fb", "x" * 1025, "\udcff",
])
def test_keys_that_could_escape_are_refused(key: str) -> None:
    with pytest.raises(BadKey):
        check_key(key)


@pytest.mark.parametrize("key", ["a", "a/b.txt", "we ird%[x]~#é.txt", ".hidden", "a/..b/c.."])
def test_ordinary_keys_pass(key: str) -> None:
    assert check_key(key) == key


def test_folders_and_urls() -> None:
    assert check_folder("") == ""
    assert check_folder("a/b/") == check_folder("a/b") == "a/b/"
    for bad in ("/", "a//", "../"):
        with pytest.raises(BadKey):
            check_folder(bad)
    assert StoreUrl.parse("s3://bucket/a/b/") == StoreUrl("bucket", "a/b")
    assert str(StoreUrl.parse("s3://bucket")) == "s3://bucket"
    for bad in ("http://bucket/x", "s3://B/x", "s3://bucket/a/../b", "s3://u@bucket/x",
                "s3://bucket:9000/x", "s3://bucket/x?y=1", "s3://bucket/a//b"):
        with pytest.raises(ValueError):
            StoreUrl.parse(bad)


def test_put_head_read_ranges_list_delete(store: ObjectStore) -> None:
    data = bytes(range(256)) * 4096  # 1 MiB

    async def go() -> None:
        etag = await store.put("d/one.bin", data)
        await store.put("d/sub/two.txt", b"two")
        await store.put("top.txt", b"top")
        info = await store.head("d/one.bin")
        assert (info.key, info.size, info.etag) == ("d/one.bin", len(data), etag)
        assert etag and etag.startswith('"')
        assert await collect(store.read("d/one.bin")) == data
        assert await collect(store.read("d/one.bin", 1000, 70_000)) == data[1000:70_000]
        assert await collect(store.read("d/one.bin", len(data) - 5)) == data[-5:]
        assert await collect(store.read("d/one.bin", 7, 7)) == b""
        chunks = [c async for c in store.read("d/one.bin", chunk_size=64 * 1024)]
        # As the network brings them (the server's frames), never the whole at once.
        assert b"".join(chunks) == data and len(chunks) >= 3, [len(c) for c in chunks]
        assert max(map(len, chunks)) <= 512 * 1024, [len(c) for c in chunks]
        assert await store.get("top.txt") == b"top"

        top = await store.list_folder()
        assert [o.key for o in top.objects] == ["top.txt"] and top.folders == ["d/"]
        d = await store.list_folder("d")
        assert [(o.key, o.size) for o in d.objects] == [("d/one.bin", len(data))]
        assert d.folders == ["d/sub/"]
        every = [o.key async for page in store.walk(page=1) for o in page]
        assert sorted(every) == ["d/one.bin", "d/sub/two.txt", "top.txt"]

        await store.delete("d/one.bin")
        await store.delete("d/one.bin")  # gone already: no error
        with pytest.raises(ObjectMissing):
            await store.head("d/one.bin")
        with pytest.raises(ObjectMissing):
            await collect(store.read("d/one.bin"))

    run(go)


def test_prefixes_keep_apart(s3: Seaweed, store: ObjectStore) -> None:
    """A store sees its prefix only; a bad key fails before any request."""
    other = ObjectStore(s3.url(store.url.prefix + "-other"), OPTIONS)

    async def go() -> None:
        await store.put("mine.txt", b"mine")
        await other.put("theirs.txt", b"theirs")
        assert [o.key for o in (await store.list_folder()).objects] == ["mine.txt"]
        with pytest.raises(ObjectMissing):
            await store.head("theirs.txt")
        for escape in ("../" + store.url.prefix + "-other/theirs.txt", "/theirs.txt", "a\\b"):
            with pytest.raises(BadKey):
                await store.head(escape)
            with pytest.raises(BadKey):
                await collect(store.read(escape))
            with pytest.raises(BadKey):
                await store.put(escape, b"x")
            with pytest.raises(BadKey):
                store.writer(escape)
        assert [o.key for o in (await other.list_folder()).objects] == ["theirs.txt"]

    run(go)


def test_read_with_an_etag_that_changed(store: ObjectStore) -> None:
    async def go() -> None:
        old = await store.put("f.txt", b"first version")
        await store.put("f.txt", b"second version")
        with pytest.raises(ObjectChanged):
            await collect(store.read("f.txt", etag=old))
        now = (await store.head("f.txt")).etag
        assert await collect(store.read("f.txt", 0, 6, etag=now)) == b"second"

    run(go)


def test_writer_small_large_and_aborted(store: ObjectStore) -> None:
    piece = os.urandom(64 * 1024)
    large = 11 * 1024 * 1024 + 123  # three parts of 5 MiB

    async def go() -> None:
        small = store.writer("small.bin")
        await small.write(b"abc")
        await small.write(b"def")
        assert await small.complete()
        assert await store.get("small.bin") == b"abcdef"

        empty = store.writer("empty.bin")
        await empty.complete()
        assert (await store.head("empty.bin")).size == 0

        writer = store.writer("large.bin")
        digest, written = hashlib.sha256(), 0
        while written < large:
            chunk = piece[: large - written]
            await writer.write(chunk)
            digest.update(chunk)
            written += len(chunk)
            if written > 6 * 1024 * 1024:  # a part is up, the object is not there
                with pytest.raises(ObjectMissing):
                    await store.head("large.bin")
        etag = await writer.complete()
        info = await store.head("large.bin")
        assert (info.size, info.etag) == (large, etag)
        assert hashlib.sha256(await collect(store.read("large.bin"))).digest() \
            == digest.digest()

        aborted = store.writer("aborted.bin")
        for _ in range(120):  # 7.5 MiB: one part uploaded
            await aborted.write(piece)
        await aborted.abort()
        await aborted.abort()
        with pytest.raises(RuntimeError):
            await aborted.write(piece)
        with pytest.raises(ObjectMissing):
            await store.head("aborted.bin")
        # An upload that replaces an object leaves the old one whole when aborted.
        again = store.writer("small.bin")
        await again.write(piece * 100)
        await again.abort()
        assert await store.get("small.bin") == b"abcdef"

    run(go)


def test_writer_as_a_context_aborts_unless_completed(store: ObjectStore) -> None:
    piece = os.urandom(1024 * 1024)

    async def go() -> None:
        with pytest.raises(ZeroDivisionError):
            async with store.writer("failed.bin") as w:
                for _ in range(7):  # a part is up
                    await w.write(piece)
                1 / 0  # noqa: B018
        with pytest.raises(ObjectMissing):
            await store.head("failed.bin")

        a_part_is_up = asyncio.Event()

        async def endless() -> None:
            async with store.writer("cancelled.bin") as w:
                for n in itertools.count():
                    await w.write(piece)
                    if n == 7:
                        a_part_is_up.set()

        task = asyncio.create_task(endless())
        await a_part_is_up.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        with pytest.raises(ObjectMissing):
            await store.head("cancelled.bin")

        async with store.writer("done.bin") as w:
            await w.write(piece)
            await w.complete()
        assert (await store.head("done.bin")).size == len(piece)
        # No task is left behind waiting for chunks.
        left = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        assert left == []

    run(go)


def test_presigned_get(store: ObjectStore) -> None:
    async def go() -> str:
        await store.put("dir/signed file.txt", b"signed bytes")
        return await store.presigned_get("dir/signed file.txt", timedelta(minutes=1))

    url = run(go)
    answer = httpx.get(url)
    assert answer.status_code == 200 and answer.content == b"signed bytes"
    assert httpx.get(url.replace("X-Amz-Signature=", "X-Amz-Signature=0")).status_code == 403
    assert httpx.get(url.split("?")[0]).status_code == 403  # unsigned: refused


def test_a_store_that_is_down(s3: Seaweed, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing listens: StoreUnavailable within the deadline, never obstore's error."""
    for name, value in s3.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    down = ObjectStore(s3.url("down"), StoreOptions(allow_http=True, timeout=2))

    async def go() -> None:
        with pytest.raises(StoreUnavailable):
            await down.head("x")
        with pytest.raises(StoreUnavailable):
            await collect(down.read("x"))
        with pytest.raises(StoreUnavailable):
            await down.list_folder()
        writer = down.writer("x")
        await writer.write(b"x")
        with pytest.raises(StoreUnavailable):
            await writer.complete()

    run(go)


def test_a_bucket_that_does_not_exist(s3: Seaweed, monkeypatch: pytest.MonkeyPatch) -> None:
    """Listing it is the store failing (a setting is wrong), not an empty folder."""
    for name, value in s3.env.items():
        monkeypatch.setenv(name, value)
    nowhere = ObjectStore("s3://no-such-bucket-here/x", OPTIONS)

    async def go() -> None:
        with pytest.raises(StoreUnavailable):
            await nowhere.list_folder()
        with pytest.raises(StoreUnavailable):
            await nowhere.folder_exists("a")
        with pytest.raises(StoreUnavailable):
            [p async for p in nowhere.walk()]
        with pytest.raises(ObjectMissing):
            await nowhere.head("a.txt")

    run(go)


def test_wrong_credentials_are_unavailable_not_missing(
        s3: Seaweed, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in s3.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    wrong = ObjectStore(s3.url("wrong"), OPTIONS)

    async def go() -> None:
        with pytest.raises(StoreUnavailable):
            await wrong.put("x", b"x")

    run(go)


def test_incomplete_uploads_listed_and_aborted(s3: Seaweed, store: ObjectStore) -> None:
    """A writer that stopped without a word (its process died) leaves its upload; the
    clean-up finds it under the prefix and aborts it. An aborted writer leaves none."""
    piece = os.urandom(64 * 1024)
    other = ObjectStore(s3.url(store.url.prefix + "-other"), OPTIONS)

    async def go() -> None:
        aborted, left, theirs = (store.writer("a/aborted.bin"), store.writer("a/left b+%.bin"),
                                 other.writer("left.bin"))
        for _ in range(100):  # 6.25 MiB: one part uploaded each
            for writer in (aborted, left, theirs):
                await writer.write(piece)

        async def listed(want: set[str], at: ObjectStore = store) -> bool:
            # The store's listing is the event: polled, as nothing announces it.
            for _ in range(200):
                if {u.key for u in await at.uploads()} == want:
                    return True
                await asyncio.sleep(0.05)
            return False

        await aborted.abort()
        assert await listed({"a/left b+%.bin"}), await store.uploads()
        assert await listed({"left.bin"}, other)
        [upload] = await store.uploads("a")
        assert await store.uploads("b") == []
        assert await store.uploads(key="a/left b+%.bin") == [upload]
        assert await store.uploads(key="a/left b") == []
        await store.abort_upload(upload)
        await store.abort_upload(upload)  # gone already: no error
        assert await store.uploads() == []
        with pytest.raises(BadKey):
            await store.uploads("../x")
        # Its task still feeds an upload that is gone: it fails, and is let go.
        await left.abort()
        await theirs.abort()
        assert await listed(set(), other)

    run(go)


def _names(listing: FolderListing) -> list[str]:
    return sorted(o.key for o in listing.objects) + listing.folders


def test_listings_are_kept_and_dropped_by_this_process_writes(s3: Seaweed, s3_prefix: str,
                                                              store: ObjectStore) -> None:
    """Within `list_cache`, a folder is LISTed once; what another client puts shows only
    after it, what any store of this process writes (a stored export's writer) at once."""
    kept = ObjectStore(s3_prefix, replace(OPTIONS, list_cache=60))
    other = ObjectStore(s3_prefix, OPTIONS)  # another store of this process (the exports')
    outsider = S3Store(s3.bucket, prefix=StoreUrl.parse(s3_prefix).prefix,
                       endpoint=s3.endpoint, access_key_id=ACCESS_KEY,
                       secret_access_key=SECRET_KEY, region=REGION, allow_http=True,
                       virtual_hosted_style_request=False)

    async def go() -> None:
        await other.put("f/a.txt", b"a")
        first = await kept.list_folder("f")
        assert _names(first) == ["f/a.txt"] and kept.lists == 1
        assert await kept.list_folder("f") is first and await kept.folder_exists("f")
        assert kept.lists == 1
        await obstore.put_async(outsider, "f/b.txt", b"b")  # another host
        assert _names(await kept.list_folder("f")) == ["f/a.txt"] and kept.lists == 1
        await other.put("f/c.txt", b"c")  # this process: seen at once
        assert _names(await kept.list_folder("f")) == ["f/a.txt", "f/b.txt", "f/c.txt"]
        assert kept.lists == 2
        # A stored export, its store's prefix inside this one's folder f/.
        exports = BucketStorage(ObjectStore(f"{s3_prefix}/f", OPTIONS))
        writer = await exports.create("stored")
        await writer.write(b"x,y\n")
        assert kept.lists == 2 and len((await kept.list_folder("f")).objects) == 3
        await writer.commit()
        assert "f/stored" in _names(await kept.list_folder("f")) and kept.lists == 3
        await other.put("g/elsewhere.txt", b"g")  # another folder's listing only
        await kept.list_folder("f")
        assert kept.lists == 3
        await exports.delete("stored")
        assert "f/stored" not in _names(await kept.list_folder("f"))
        assert kept.lists == 4

    run(go)


def test_listings_show_others_writes_after_their_time(s3: Seaweed, s3_prefix: str,
                                                      store: ObjectStore) -> None:
    short = ObjectStore(s3_prefix, replace(OPTIONS, list_cache=0.3))
    raw = S3Store(s3.bucket, prefix=StoreUrl.parse(s3_prefix).prefix, endpoint=s3.endpoint,
                  access_key_id=ACCESS_KEY, secret_access_key=SECRET_KEY, region=REGION,
                  allow_http=True, virtual_hosted_style_request=False)
    obstore.put(raw, "t/one.txt", b"1")
    assert _names(run(lambda: short.list_folder("t"))) == ["t/one.txt"]
    obstore.put(raw, "t/two.txt", b"2")
    started = time.monotonic()
    assert wait_until(lambda: len(run(lambda: short.list_folder("t")).objects) == 2, 10)
    assert time.monotonic() - started < 5
    never = ObjectStore(s3_prefix, replace(OPTIONS, list_cache=0))
    for _ in range(3):
        run(lambda: never.list_folder("t"))
    assert never.lists == 3


def test_listing_cache_is_bounded() -> None:
    cache = ListingCache(max_items=10)
    info = ObjectInfo("k", 1, None, datetime.now(UTC))

    def listing(n: int) -> FolderListing:
        return FolderListing([info] * n, [])

    cache.put(("b", "", "a/"), listing(4), cache.generation)
    cache.put(("b", "", "b/"), listing(4), cache.generation)
    assert cache.items == 10 and cache.get(("b", "", "a/"), 60) is not None
    cache.put(("b", "", "c/"), listing(3), cache.generation)  # the oldest goes
    assert cache.get(("b", "", "a/"), 60) is None and cache.items == 9
    cache.put(("b", "", "huge/"), listing(50), cache.generation)  # never kept
    assert cache.get(("b", "", "huge/"), 60) is None
    stale = cache.generation
    cache.wrote("b", "c/new.txt")
    assert cache.get(("b", "", "c/"), 60) is None and cache.get(("b", "", "b/"), 60)
    cache.put(("b", "", "c/"), listing(1), stale)  # listed before the write: not kept
    assert cache.get(("b", "", "c/"), 60) is None


def test_a_store_in_a_folder_named_relatively_starts(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """./scripts/serve --s3 keeps SeaweedFS under `var/s3`, relative to the checkout (weed
    runs in that folder: it looked for var/s3/var/s3/data and exited)."""
    monkeypatch.chdir(tmp_path)
    seaweed = Seaweed(Path("var") / "s3", free_port)
    try:
        seaweed.start()
        assert (tmp_path / "var" / "s3" / "data").is_dir()
        assert not (tmp_path / "var" / "s3" / "var").exists()
    finally:
        seaweed.stop()
