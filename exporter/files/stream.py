"""A response body read from an open file (from the page cache on the event loop, else
`os.pread` in a worker thread as aiofiles would), or from an object in the store (one
ranged GET per part), one chunk at a time.

Why it works this way: docs/internals.md, section `files/stream.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hashlib
import logging
import os
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from exporter.audit import COMPLETE, Audit, Download
from exporter.compression import Coding, compressed
from exporter.files.digests import DigestStore, FileKey
from exporter.files.ranges import Layout
from exporter.objects import ObjectChanged, ObjectInfo, ObjectStore
from exporter.streaming import Chunk, FileSpan, Piece, audited, run_detached

log = logging.getLogger(__name__)

_NOWAIT: int = getattr(os, "RWF_NOWAIT", 0)  # Linux only
# The end of each part sent from spans (FileSpan) that is read instead (FileBody._part).
_TAIL = 4096
_SPAN = 8 * 1024 * 1024


def _malloc_trim() -> None:
    """Hand the C heap's free pages back to the system (glibc only; elsewhere nothing).

    Chunks are allocated by the reading threads, in glibc arenas of their own, and freed
    by the event loop after a socket took them: the pages stay with the process.
    1,000 slow downloads left the server at 155 MB after they all ended (88 MB idle).
    """
    # The symbols already loaded in this process, libc's among them.
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)


class ReadBudget:
    """Read sizes for file bodies, from one memory budget shared by the downloads in progress.

    Larger reads are much faster under uvicorn (one download on loopback: 1.2 GB/s with
    256 KiB reads, 2.1 GB/s with 1 MiB) but a chunk stays in the server until its
    client has taken it, and a slow client takes long. So `held` counts the bytes read
    and not yet taken by a socket, and a read gets a fair share of `budget` (at most
    `ceiling`) but no more than what is left of it, and never less than `floor`: a few
    fast downloads read 1 MiB at a time, while 1,000 stalled ones hold about
    `budget` plus `floor` each.
    """

    # Seconds after the last download ended before the freed memory is handed back: a
    # next download often comes at once.
    trim_delay = 1.0

    def __init__(self, budget: int, floor: int, ceiling: int) -> None:
        self.budget, self.floor, self.ceiling = budget, floor, max(floor, ceiling)
        self.active = 0
        self.held = 0
        self._trim_pending = False

    def ended(self) -> None:
        """A download ended; when none is left, memory is handed back a little later."""
        self.active -= 1
        if self.active == 0 and not self._trim_pending:
            self._trim_pending = True
            asyncio.get_running_loop().call_later(self.trim_delay, self._trim)

    def _trim(self) -> None:
        self._trim_pending = False
        if self.active == 0:
            run_detached(asyncio.to_thread(_malloc_trim))

    def chunk_size(self) -> int:
        share = min(self.budget // max(1, self.active), self.budget - self.held)
        return max(self.floor, min(self.ceiling, share))


def read_cached(fd: int, offset: int, size: int) -> memoryview | None:
    """Up to `size` bytes at `offset` if the page cache holds them (the first page at
    least), else None; OSError where the file system cannot tell (EOPNOTSUPP).

    With RWF_NOWAIT (Linux 4.14) the read never waits for the disk, so it may run on
    the event loop: a file in the cache then costs no hand-over to a thread and back
    (100 concurrent 10 MiB ranges: 0.74-0.78 s of the server's CPU per GiB, against
    0.92-1.03 s with every read in a thread; docs/benchmarks.md). The buffer is new for
    each read and handed on as it is.
    """
    buffer = bytearray(size)
    try:
        got = os.preadv(fd, [buffer], offset, _NOWAIT)
    except BlockingIOError:
        return None
    if got <= 0:
        return None
    return memoryview(buffer)[:got] if got < size else memoryview(buffer)


class FileChanged(Exception):
    """The file was changed (written, truncated, replaced in place) while it was sent."""


class Body:
    """A file's answer body: the layout's parts, hashed on the way when whole, with the
    audit row and the digest written at its end. Each source reads its own bytes
    (`_part`): FileBody from an open file, ObjectBody from the object store."""

    def __init__(self, key: FileKey, layout: Layout, sizes: ReadBudget,
                 download: Download, audit: Audit, digests: DigestStore,
                 digest_known: bool = False, coding: Coding | None = None,
                 level: int | None = None) -> None:
        self._coding = coding  # compressed on the fly (a whole file only)
        self._level = level
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

    def __aiter__(self) -> AsyncIterator[Piece]:
        if self._coding is not None:
            # Complete when the compressed stream ran to its end (its trailer taken by
            # the socket: `drain`); its length is known only then.
            return audited(compressed(self._bytes(), self._coding, self._level),
                           self.download,
                           lambda status, error: run_detached(self._finish(status, error)),
                           drain=True)
        # Complete by bytes: every byte of the layout went into the socket.
        return audited(self._chunks(), self.download,
                       lambda status, error: run_detached(self._finish(status, error)),
                       complete=lambda: self.download.bytes == self._layout.length,
                       drain=True)

    async def _chunks(self) -> AsyncGenerator[Piece, None]:
        """The layout's parts; a read only once the chunk before went into the socket
        (`audited` with `drain` asks for the next chunk only then)."""
        sizes = self._sizes
        sizes.active += 1
        try:
            for part in self._layout.parts:
                if part.range is None:
                    yield part.literal
                    continue
                async with contextlib.aclosing(
                        self._part(part.range.start, part.range.length)) as chunks:
                    async for chunk in chunks:
                        if self._hash is not None:
                            assert not isinstance(chunk, FileSpan)
                            self._hash.update(chunk)
                        yield chunk
        finally:
            sizes.ended()

    def _part(self, offset: int, length: int) -> AsyncGenerator[Piece, None]:
        """`length` bytes from `offset`, in chunks of the read budget's size, each counted
        in `self._sizes.held` until the next is asked for."""
        raise NotImplementedError

    async def _bytes(self) -> AsyncGenerator[Chunk, None]:
        """The body as bytes (a compressed one is: its spans are never asked for)."""
        async for piece in self._chunks():
            assert not isinstance(piece, FileSpan)
            yield piece

    async def _finish(self, status: str, error: str | None) -> None:
        try:
            if status == COMPLETE and self._hash is not None and await self._unchanged():
                await self._digests.put(self._key, self._hash.digest())
        except Exception:
            log.exception("could not store the digest of %s", self._key.path)
        finally:
            await self._close()
            await self._audit.finish(self.download, status, http_status=self._layout.status,
                                     error=error)

    async def _unchanged(self) -> bool:
        """Whether the file is still what it was when the response began."""
        return True

    async def _close(self) -> None:
        pass


class FileBody(Body):
    """Read from an open file, one chunk at a time: on the event loop what the page
    cache holds (`RWF_NOWAIT`), in a worker thread (`os.pread`) what must come from the
    disk."""

    def __init__(self, file: Any, key: FileKey, layout: Layout, sizes: ReadBudget,
                 download: Download, audit: Audit, digests: DigestStore,
                 digest_known: bool = False, coding: Coding | None = None,
                 level: int | None = None, zero_copy: bool = False,
                 paced: bool = False) -> None:
        super().__init__(key, layout, sizes, download, audit, digests, digest_known, coding,
                         level)
        self._file = file  # an aiofiles binary file, owned (and closed) by this body
        self._fd: int = file.fileno()
        self._links: tuple[int, int] | None = None  # (st_nlink, st_ctime_ns) at the first read
        self._nowait = _NOWAIT != 0  # reads that never wait for the disk work here
        # Spans the server sends itself (server/sendfile.py), where no byte must pass
        # through here: not hashed, not compressed.
        self._spans = zero_copy and self._hash is None and coding is None
        # Each span costs a pass through the middleware and a worker thread's call: 8 MiB
        # spans took half the CPU of 1 MiB ones (docs/benchmarks.md). A paced download
        # (EXPORTER_MAX_BYTES_PER_SECOND, paced per message) keeps the chunks' size.
        self._span = sizes.ceiling if paced else _SPAN
        # The read in a worker thread, if one was started: _close waits for it.
        self._reading: asyncio.Future[bytes] | None = None

    async def _part(self, offset: int, length: int) -> AsyncGenerator[Piece, None]:
        if self._spans:
            # The part's last bytes are read, checked and then sent: a file changed while
            # its spans went out is seen before the answer could look complete.
            tail = min(length, _TAIL)
            async for span in self._spans_of(offset, length - tail):
                yield span
            offset, length = offset + length - tail, tail
        async for chunk in self._read_part(offset, length):
            yield chunk

    async def _read_part(self, offset: int, length: int) -> AsyncGenerator[Chunk, None]:
        sizes = self._sizes
        held = 0  # this body's part of `sizes.held`
        remaining = length
        try:
            while remaining:
                held = min(sizes.chunk_size(), remaining)
                sizes.held += held
                chunk: Chunk | None = self._read_cached(offset, held)
                if chunk is None:
                    # Shielded: a download cancelled meanwhile leaves the read to end in
                    # its thread, and the file is closed after it (_close), not under it:
                    # its number may name another file or socket at once.
                    self._reading = asyncio.get_running_loop().run_in_executor(
                        None, self._read, offset, held)
                    chunk = await asyncio.shield(self._reading)
                else:
                    # A read that did not wait must still let the loop run: uvicorn's
                    # `send` to a client that left returns at once, and without this
                    # the body would read the whole file for nobody before Starlette's
                    # watch for the disconnect could cancel it (and call it complete).
                    await asyncio.sleep(0)
                if not chunk:
                    raise FileChanged(f"{remaining} bytes missing at the end")
                yield chunk
                offset += len(chunk)
                remaining -= len(chunk)
                del chunk
                sizes.held -= held
                held = 0
        finally:
            sizes.held -= held

    async def _spans_of(self, offset: int, length: int) -> AsyncGenerator[FileSpan, None]:
        """`length` bytes from `offset` in spans, the file looked at before each goes out."""
        most = self._span
        while length:
            self._check(os.fstat(self._fd))
            span = FileSpan(self._fd, offset, min(most, length))
            yield span
            offset += span.count
            length -= span.count

    def _read_cached(self, offset: int, size: int) -> memoryview | None:
        """On the event loop: what `read_cached` finds, if the file is unchanged."""
        if not self._nowait:
            return None
        try:
            chunk = read_cached(self._fd, offset, size)
        except OSError:  # a file system without RWF_NOWAIT (EOPNOTSUPP): threads only
            self._nowait = False
            return None
        if chunk is not None:
            self._check(os.fstat(self._fd))
        return chunk

    def _read(self, offset: int, size: int) -> bytes:
        """In a worker thread: `size` bytes at `offset`, if the file is still the one the
        response began with."""
        data = os.pread(self._fd, size, offset)
        self._check(os.fstat(self._fd))
        return data

    def _check(self, st: os.stat_result) -> None:
        """Raises FileChanged unless `st` (an fstat after a read) is still the file the
        response began with.

        Its validators (ETag, Last-Modified, Content-Length) were sent with the headers:
        a file rewritten in place meanwhile would otherwise reach the client as a
        complete answer of mixed bytes under the old ETag, which a resume (If-Range)
        then splices further. So the file is looked at after each read (one fstat, a
        microsecond) and the answer is cut if it changed: the client sees an error (curl
        exits with 18), and the audit row says `failed`.
        """
        if self._links is None:
            self._links = st.st_nlink, st.st_ctime_ns
        nlink, ctime_ns = self._links
        # The ctime catches a rewrite whose mtime was set back (`rsync --inplace -t`);
        # but renaming another file over this one (the safe way to replace it) changes
        # the ctime too, through the link count, and leaves the open file whole.
        if (FileKey.of(self._key.path, st) != self._key
                or (st.st_ctime_ns != ctime_ns and st.st_nlink == nlink)):
            raise FileChanged(
                f"{self._key.path} changed while it was sent (size {self._key.size} -> "
                f"{st.st_size}, mtime_ns {self._key.mtime_ns} -> {st.st_mtime_ns}, "
                f"ctime_ns {ctime_ns} -> {st.st_ctime_ns})")

    async def _unchanged(self) -> bool:
        st = os.fstat(self._file.fileno())
        return FileKey.of(self._key.path, st) == self._key

    async def _close(self) -> None:
        try:
            if self._reading is not None:
                with contextlib.suppress(Exception):
                    await self._reading
        finally:
            await self._file.close()


class ObjectBody(Body):
    """Read from the object store: one ranged GET per part, streamed as the client takes
    it, and only while the object is the one whose ETag the headers carried (else the
    answer is cut, as for a file changed on disk)."""

    def __init__(self, store: ObjectStore, info: ObjectInfo, key: FileKey, layout: Layout,
                 sizes: ReadBudget, download: Download, audit: Audit, digests: DigestStore,
                 digest_known: bool = False, coding: Coding | None = None,
                 level: int | None = None,
                 first: tuple[int, AsyncGenerator[bytes, None]] | None = None) -> None:
        super().__init__(key, layout, sizes, download, audit, digests, digest_known, coding,
                         level)
        self._store = store
        # The object as its head found it: read by its key in the store (`key` is what
        # digests know it by, which for a stored export is its URL path), at its ETag.
        self._object = info
        # The first part's GET, made before the answer started (files/source.py), owned
        # here: by where it starts.
        self._first = first

    async def _part(self, offset: int, length: int) -> AsyncGenerator[Chunk, None]:
        sizes = self._sizes
        held = 0
        got = 0
        opened, self._first = self._first, None
        if opened is not None and opened[0] != offset:
            await opened[1].aclose()
            opened = None
        try:
            async with contextlib.aclosing(opened[1] if opened is not None else self._store.read(
                    self._object.key, offset, offset + length, chunk_size=sizes.chunk_size(),
                    etag=self._object.etag)) as chunks:
                async for chunk in chunks:
                    held = len(chunk)
                    sizes.held += held
                    got += held
                    yield chunk
                    sizes.held -= held
                    held = 0
        except ObjectChanged:
            raise FileChanged(f"{self._key.path} changed while it was sent") from None
        finally:
            sizes.held -= held
        if got != length:
            raise FileChanged(f"{length - got} bytes missing at the end")

    async def _close(self) -> None:
        """The first part's GET, if the body never got to it (the client left)."""
        opened, self._first = self._first, None
        if opened is not None:
            await opened[1].aclose()
