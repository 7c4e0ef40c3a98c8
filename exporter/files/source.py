"""An open file as the HTTP code serves it (files/response.py's `respond_with_file`), from
either source: a file on disk (`LocalFile`) or an object in the store (`StoreFile`).

Each gives what the answer needs: its size, validators (ETag, Last-Modified), its digest
key, and a body for a layout of ranges; the HTTP (conditions, ranges, codings, headers)
stays in one place, whatever the bytes come from.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from email.utils import formatdate
from typing import Any, Protocol

from exporter.audit import Download
from exporter.compression import Coding
from exporter.files.conditions import Validators
from exporter.files.context import Files
from exporter.files.digests import DigestStore, FileKey
from exporter.files.ranges import Layout
from exporter.files.stream import Body, FileBody, ObjectBody
from exporter.objects import ObjectInfo, ObjectStore


class OpenFile(Protocol):
    key: FileKey

    @property
    def size(self) -> int: ...

    def validators(self) -> Validators: ...

    def body(self, files: Files, layout: Layout, download: Download, digests: DigestStore,
             digest_known: bool, coding: Coding | None, level: int | None) -> Body: ...

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

    def body(self, files: Files, layout: Layout, download: Download, digests: DigestStore,
             digest_known: bool, coding: Coding | None, level: int | None) -> Body:
        return FileBody(self.file, self.key, layout, files.read_budget, download, files.audit,
                        digests, digest_known=digest_known, coding=coding, level=level)

    async def close(self) -> None:
        await self.file.close()


@dataclass
class StoreFile:
    """An object in the store, as its head found it; its body reads only that version."""

    store: ObjectStore
    info: ObjectInfo
    key: FileKey

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

    def body(self, files: Files, layout: Layout, download: Download, digests: DigestStore,
             digest_known: bool, coding: Coding | None, level: int | None) -> Body:
        return ObjectBody(self.store, self.info, self.key, layout, files.read_budget,
                          download, files.audit, digests, digest_known=digest_known,
                          coding=coding, level=level)

    async def close(self) -> None:
        pass
