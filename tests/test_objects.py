"""exporter/objects.py against a real S3 server (SeaweedFS, tests/s3.py): keys that
cannot escape the prefix, heads, ranged streamed reads, listings, the multipart writer
(whole or nothing), deletes, pre-signed URLs, and a store that is down."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from typing import TypeVar

import httpx
import pytest

from exporter.objects import (
    BadKey,
    ObjectChanged,
    ObjectMissing,
    ObjectStore,
    StoreOptions,
    StoreUnavailable,
    StoreUrl,
    check_folder,
    check_key,
)
from tests.s3 import Seaweed

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
