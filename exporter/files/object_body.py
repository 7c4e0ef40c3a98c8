"""A response body read from an object in the store (exporter/objects.py): stream.py's
`FileBody` for bytes that live in a bucket, and the open object `respond_with_file`
takes in place of an open file.

Each part of the layout is one streamed ranged GET, pinned to the object's ETag as it
was when the headers were made: an object replaced meanwhile cuts the answer (the client
sees a broken download, as with a local file rewritten under it) rather than splice two
versions under one validator.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import stat
from collections.abc import AsyncGenerator, AsyncIterator

from exporter.audit import COMPLETE, Audit, Download
from exporter.compression import Coding, compressed
from exporter.files.digests import DigestStore, FileKey
from exporter.files.ranges import Layout
from exporter.files.stream import FileChanged, ReadBudget
from exporter.objects import ObjectInfo, ObjectStore
from exporter.streaming import audited, run_detached

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


class ObjectBody:
    """FileBody's counterpart: the layout's parts read from the store, counted, audited
    and (a whole object whose digest is not known yet) hashed on the way."""

    def __init__(self, obj: OpenObject, key: FileKey, layout: Layout, sizes: ReadBudget,
                 download: Download, audit: Audit, digests: DigestStore,
                 digest_known: bool = False, coding: Coding | None = None,
                 level: int | None = None) -> None:
        self._object = obj
        self._key = key
        self._layout = layout
        self._sizes = sizes
        self.download = download
        self._audit = audit
        self._digests = digests
        self._coding = coding
        self._level = level
        self._hash = hashlib.sha256() if layout.whole_file and not digest_known else None

    def __aiter__(self) -> AsyncIterator[bytes]:
        def end(status: str, error: str | None) -> None:
            run_detached(self._finish(status, error))

        if self._coding is not None:
            return audited(compressed(self._chunks(), self._coding, self._level),
                           self.download, end, drain=True)
        return audited(self._chunks(), self.download, end,
                       complete=lambda: self.download.bytes == self._layout.length,
                       drain=True)

    async def _chunks(self) -> AsyncGenerator[bytes, None]:
        sizes = self._sizes
        sizes.active += 1
        held = 0
        try:
            for part in self._layout.parts:
                if part.range is None:
                    yield part.literal
                    continue
                start, remaining = part.range.start, part.range.length
                stream = self._object.chunks(start, start + remaining, sizes.chunk_size())
                async with contextlib.aclosing(stream):  # type: ignore[type-var]
                    async for chunk in stream:
                        if len(chunk) > remaining:
                            raise FileChanged(f"{self._key.path}: more bytes than its size")
                        held = len(chunk)
                        sizes.held += held
                        if self._hash is not None:
                            self._hash.update(chunk)
                        yield chunk
                        remaining -= len(chunk)
                        del chunk
                        sizes.held -= held
                        held = 0
                if remaining:
                    raise FileChanged(f"{remaining} bytes missing at the end")
        finally:
            sizes.held -= held
            sizes.ended()

    async def _finish(self, status: str, error: str | None) -> None:
        try:
            if status == COMPLETE and self._hash is not None:
                await self._digests.put(self._key, self._hash.digest())
        except Exception:
            log.exception("could not store the digest of %s", self._key.path)
        finally:
            with contextlib.suppress(Exception):
                await self._object.close()
            await self._audit.finish(self.download, status, http_status=self._layout.status,
                                     error=error)
