"""An open file as the HTTP code serves it (files/response.py's `respond_with_file`), from
either source: a file on disk (`LocalFile`) or an object in the store (`StoreFile`).

Each gives what the answer needs: its size, validators (ETag, Last-Modified), its digest
key, and a body for a layout of ranges; the HTTP (conditions, ranges, codings, headers)
stays in one place, whatever the bytes come from.
"""

from __future__ import annotations

import os
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from email.utils import formatdate
from typing import Any, Protocol

from exporter.audit import Download
from exporter.compression import Coding
from exporter.errors import ApiError
from exporter.files.conditions import Validators
from exporter.files.context import Files
from exporter.files.digests import DigestStore, FileKey
from exporter.files.paths import not_found
from exporter.files.ranges import Layout
from exporter.files.store import store_unavailable
from exporter.files.stream import Body, FileBody, ObjectBody
from exporter.objects import (
    ObjectChanged,
    ObjectInfo,
    ObjectMissing,
    ObjectStore,
    StoreUnavailable,
)


class OpenFile(Protocol):
    key: FileKey

    @property
    def size(self) -> int: ...

    def validators(self) -> Validators: ...

    async def prepare(self, layout: Layout, chunk_size: int) -> None:
        """Whatever can fail before the answer starts: an error here is still an HTTP
        error (404, 503), not a broken download."""

    def body(self, files: Files, layout: Layout, download: Download, digests: DigestStore,
             digest_known: bool, coding: Coding | None, level: int | None,
             zero_copy: bool) -> Body:
        """`zero_copy`: the server sends spans of an open file itself (streaming.zero_copy)."""

    async def close(self) -> None:
        """Let go of it without a body (HEAD, 304, an error)."""


@dataclass
class LocalFile:
    """An open file (an aiofiles binary file, whose body then owns it) and its stat."""

    file: Any
    stat: os.stat_result
    key: FileKey

    @property
    def size(self) -> int:
        return self.stat.st_size

    def validators(self) -> Validators:
        return Validators.of(self.stat)

    async def prepare(self, layout: Layout, chunk_size: int) -> None:
        pass  # the descriptor is open already

    def body(self, files: Files, layout: Layout, download: Download, digests: DigestStore,
             digest_known: bool, coding: Coding | None, level: int | None,
             zero_copy: bool) -> Body:
        return FileBody(self.file, self.key, layout, files.read_budget, download, files.audit,
                        digests, digest_known=digest_known, coding=coding, level=level,
                        zero_copy=zero_copy, paced=files.settings.max_bytes_per_second > 0)

    async def close(self) -> None:
        await self.file.close()


@dataclass
class StoreFile:
    """An object in the store, as its head found it; its body reads only that version."""

    store: ObjectStore
    info: ObjectInfo
    key: FileKey
    # The first part's GET, made by `prepare` before the answer starts.
    first: tuple[int, AsyncGenerator[bytes, None]] | None = None

    @property
    def size(self) -> int:
        return self.info.size

    def validators(self) -> Validators:
        # The store's own ETag (strong; an MD5 or a multipart's digest of digests): the
        # same from every host in front of the store, unlike a folder's inode.
        mtime = int(self.info.modified.timestamp())
        etag = self.info.etag or ""
        if not (len(etag) > 2 and etag.startswith('"') and etag.endswith('"')):
            etag = f'"{self.key.size:x}-{self.key.mtime_ns:x}"'  # none, or a weak one
        return Validators(etag, formatdate(mtime, usegmt=True), mtime)

    async def prepare(self, layout: Layout, chunk_size: int) -> None:
        """The first part's GET, now: an object gone since its HEAD is a 404, a store
        that fails a 503, one replaced meanwhile a 503 to try again."""
        part = next((p.range for p in layout.parts if p.range is not None), None)
        if part is None or part.length == 0:
            return
        try:
            chunks = await self.store.open_read(
                self.info.key, part.start, part.start + part.length, chunk_size=chunk_size,
                etag=self.info.etag)
        except ObjectMissing:
            raise not_found(self.key.path) from None
        except ObjectChanged:
            raise ApiError(503, "the file changed while it was opened; ask again",
                           headers={"Retry-After": "1"}) from None
        except StoreUnavailable as error:
            raise store_unavailable(error) from None
        self.first = (part.start, chunks)

    def body(self, files: Files, layout: Layout, download: Download, digests: DigestStore,
             digest_known: bool, coding: Coding | None, level: int | None,
             zero_copy: bool) -> Body:
        first, self.first = self.first, None  # the body owns it now
        return ObjectBody(self.store, self.info, self.key, layout, files.read_budget,
                          download, files.audit, digests, digest_known=digest_known,
                          coding=coding, level=level, first=first)

    async def close(self) -> None:
        first, self.first = self.first, None
        if first is not None:
            await first[1].aclose()
