"""A response body read from an open file with aiofiles, one chunk at a time.

Each chunk is read only after the previous one was handed to the server, and
uvicorn's `send` waits while its write buffer is full, so a slow client slows the
reading down and memory stays at about one chunk per connection. When the client
leaves, Starlette (listening for `http.disconnect`) cancels this generator, which
stops the reading; what is left to do then runs in a detached task, because
awaits in a cancelled generator's `finally` are cancelled too.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

from exporter.audit import ABORTED, COMPLETE, FAILED, Audit, Download
from exporter.files.digests import DigestStore, FileKey
from exporter.files.ranges import Layout
from exporter.streaming import run_detached

log = logging.getLogger(__name__)



class ReadBudget:
    """Read sizes for file bodies, from one memory budget shared by the downloads in progress.

    Larger reads are much faster under uvicorn (one download on loopback: 1.2 GB/s with
    256 KiB reads, 2.1 GB/s with 1 MiB) but hold more memory per connection. So a
    download alone reads `ceiling` bytes at a time, and many share `budget` between them,
    down to `floor`: memory stays bounded while few fast clients get full speed.
    """

    def __init__(self, budget: int, floor: int, ceiling: int) -> None:
        self.budget, self.floor, self.ceiling = budget, floor, max(floor, ceiling)
        self.active = 0

    def chunk_size(self) -> int:
        return max(self.floor, min(self.ceiling, self.budget // max(1, self.active)))


class FileChanged(Exception):
    """The file became shorter while it was being sent."""


class FileBody:
    def __init__(self, file: Any, key: FileKey, layout: Layout, sizes: ReadBudget,
                 download: Download, audit: Audit, digests: DigestStore,
                 digest_known: bool = False) -> None:
        self._file = file  # an aiofiles binary file, owned (and closed) by this body
        self._key = key
        self._layout = layout
        self._sizes = sizes
        self.download = download
        self._audit = audit
        self._digests = digests
        # The whole file goes through here anyway: hashing it on the way costs no read.
        # Once the digest is known for this very file (same size, mtime, inode) it is
        # not computed again: at 600 MB/s the hash took about 40% of the loop's core.
        self._hash = hashlib.sha256() if layout.whole_file and not digest_known else None

    async def __aiter__(self) -> AsyncIterator[bytes]:
        d = self.download
        error: str | None = None
        status: str | None = None
        self._sizes.active += 1
        try:
            for part in self._layout.parts:
                if part.range is None:
                    yield part.literal
                    d.bytes += len(part.literal)
                    continue
                await self._file.seek(part.range.start)
                remaining = part.range.length
                while remaining:
                    chunk = await self._file.read(min(self._sizes.chunk_size(), remaining))
                    if not chunk:
                        raise FileChanged(f"{remaining} bytes missing at the end")
                    if self._hash is not None:
                        self._hash.update(chunk)
                    yield chunk
                    d.bytes += len(chunk)
                    remaining -= len(chunk)
        except Exception as exc:
            status, error = FAILED, f"{type(exc).__name__}: {exc}"
            log.error("file %s failed after %d bytes: %s", d.target, d.bytes, error)
            raise
        finally:
            self._sizes.active -= 1
            # By bytes, not by exception: a finished body may still see CancelledError.
            if status is None:
                status = COMPLETE if d.bytes == self._layout.length else ABORTED
            run_detached(self._finish(status, error))

    async def _finish(self, status: str, error: str | None) -> None:
        try:
            if status == COMPLETE and self._hash is not None and self._unchanged():
                await self._digests.put(self._key, self._hash.digest())
        except Exception:
            log.exception("could not store the digest of %s", self._key.path)
        finally:
            await self._file.close()
            await self._audit.finish(self.download, status, http_status=self._layout.status,
                                     error=error)

    def _unchanged(self) -> bool:
        """Whether the open file still is what it was when the response began."""
        st = os.fstat(self._file.fileno())
        return FileKey.of(self._key.path, st) == self._key
