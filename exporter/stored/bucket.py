"""Stored exports' bytes in an object store (EXPORTER_EXPORTS_DIR=s3://bucket/prefix):
storage.py's `Storage` over exporter/objects.py, for hosts that share no disk.

A writer is a multipart upload fed as the export streams (about two parts in memory),
visible under its key only once completed: a half-written export is never an object.
An upload whose writer stopped (abort) is aborted; one whose process died stays
incomplete in the store until the clean-up finds it (`list` shows it as partial) and
aborts it (`discard`). The store's errors come out as the folder's would: a missing
object as FileNotFoundError, any other failure as OSError, which the callers already
answer (503, a download without its copy).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import stat
from collections.abc import AsyncIterator, Iterator
from typing import Any

from exporter.objects import (
    ObjectChanged,
    ObjectInfo,
    ObjectMissing,
    ObjectStore,
    ObjectWriter,
    StoreUnavailable,
)
from exporter.stored.storage import Stored, check_key

log = logging.getLogger(__name__)


class OpenObject:
    """An object to serve: its head (size, ETag, time) taken once, its bytes read by
    range. `read` reads on from where the last one stopped, as a file's would (a
    comparison of two objects' first bytes); `close` lets its stream go."""

    def __init__(self, store: ObjectStore, info: ObjectInfo) -> None:
        self.store = store
        self.info = info
        self._stream: AsyncIterator[bytes] | None = None
        self._buffer = b""

    @property
    def stat(self) -> os.stat_result:
        """What the HTTP validators read of a file's stat (size, modification time), for
        respond_with_file; no inode: its ETag is the caller's (stored exports) or made
        of size and time."""
        seconds = int(self.info.modified.timestamp())
        ns = seconds * 1_000_000_000
        return os.stat_result((stat.S_IFREG | 0o440, 0, 0, 1, 0, 0, self.info.size,
                               seconds, seconds, seconds, float(seconds), float(seconds),
                               float(seconds), ns, ns, ns))

    def chunks(self, start: int, end: int, chunk_size: int) -> AsyncIterator[bytes]:
        """Bytes [start, end) as the network brings them; ObjectChanged if the object is
        another one by now."""
        return self.store.read(self.info.key, start, end, chunk_size=chunk_size,
                               etag=self.info.etag)

    async def read(self, size: int) -> bytes:
        if self._stream is None:
            self._stream = self.chunks(0, self.info.size, 1024 * 1024)
        while len(self._buffer) < size:
            try:
                self._buffer += await self._stream.__anext__()
            except StopAsyncIteration:
                break
        data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data

    async def close(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None and hasattr(stream, "aclose"):
            await stream.aclose()


@contextlib.contextmanager
def _as_os_errors(key: str) -> Iterator[None]:
    try:
        yield
    except ObjectMissing:
        raise FileNotFoundError(errno.ENOENT, "no such stored export", key) from None
    except (StoreUnavailable, ObjectChanged) as error:
        raise OSError(errno.EIO, f"the object store failed: {error}") from error


class BucketWriter:
    def __init__(self, writer: ObjectWriter) -> None:
        self._writer = writer

    async def write(self, data: bytes) -> None:
        with _as_os_errors(self._writer.key):
            await self._writer.write(data)

    async def write_hashed(self, data: bytes, digest: Any) -> None:
        # The upload's parts are sent by the object store's client: hashed meanwhile.
        await asyncio.gather(self.write(data), asyncio.to_thread(digest.update, data))

    async def commit(self) -> None:
        with _as_os_errors(self._writer.key):
            await self._writer.complete()

    async def abort(self) -> None:
        await self._writer.abort()


class BucketStorage:
    """Objects named by their keys, right under the store's prefix."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    def __repr__(self) -> str:
        return f"BucketStorage({str(self.store.url)!r})"

    async def create(self, key: str) -> BucketWriter:
        return BucketWriter(self.store.writer(check_key(key)))

    async def open(self, key: str) -> tuple[OpenObject, os.stat_result]:
        with _as_os_errors(key):
            opened = OpenObject(self.store, await self.store.head(check_key(key)))
        return opened, opened.stat

    async def size(self, key: str) -> int | None:
        try:
            with _as_os_errors(key):
                return (await self.store.head(check_key(key))).size
        except FileNotFoundError:
            return None

    async def delete(self, key: str) -> None:
        with _as_os_errors(key):
            await self.store.delete(check_key(key))
        await self.discard(key)

    async def discard(self, key: str) -> None:
        check_key(key)
        with _as_os_errors(key):
            for upload in await self.store.uploads(key=key):
                await self.store.abort_upload(upload)

    async def list(self) -> list[Stored]:
        found: list[Stored] = []
        with _as_os_errors(""):
            async for page in self.store.walk():
                found.extend(Stored(o.key, o.size, False, o.modified.timestamp())
                             for o in page if _ours(o.key))
        try:
            uploads = await self.store.uploads()
        except StoreUnavailable as error:
            # Credentials from an instance role, a store without the call: the objects
            # are still cleaned up; the bucket's lifecycle rule takes the uploads.
            log.warning("the incomplete uploads of the stored exports cannot be listed"
                        " (left to the bucket's lifecycle rule): %s", error)
            return found
        found.extend(Stored(u.key, 0, True, u.initiated.timestamp())
                     for u in uploads if _ours(u.key))
        return found


def _ours(key: str) -> bool:
    try:
        check_key(key)
    except ValueError:
        return False  # not a stored export's: left alone
    return True
