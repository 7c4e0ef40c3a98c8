"""Where stored exports' bytes live: a small interface, and a folder that implements it
(an object store implements it too: bucket.py; storages.py picks one from the settings).

Everything else (routes, the service, the clean-up) goes through `Storage`. A writer
writes under a temporary name and only `commit` makes the file visible under its key:
a half-written file is never taken for a whole one, by this host or by another one
sharing the folder (NFS renames are atomic on the server).

Every call that touches the disk runs in a worker thread: a write, an fsync or a walk
of the folder on a slow network file system must not stall the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiofiles

# Keys are ids made by secrets.token_urlsafe: nothing else reaches a path here, so no
# `..`, no slash and no NUL can ever name a file outside the folder.
_KEY = re.compile(r"[A-Za-z0-9_-]{1,64}")
PARTIAL = ".part"


class BadKey(ValueError):
    """Not a key this storage could have made."""


def check_key(key: str) -> str:
    if not _KEY.fullmatch(key):
        raise BadKey(f"bad storage key {key[:80]!r}")
    return key


@dataclass(frozen=True)
class Stored:
    """One object in the storage, as the clean-up sees it."""

    key: str
    size: int
    partial: bool  # still being written (or left behind by a writer that died)
    mtime: float


# Failures of the protocols below are OSError (FileNotFoundError: absent), whatever the
# storage: the callers answer them so (503, a download without its copy).
class StorageWriter(Protocol):
    async def write(self, data: bytes) -> None:
        """Append `data` (in a worker thread)."""

    async def write_hashed(self, data: bytes, digest: Any) -> None:
        """Append `data` and add it to `digest` (a hashlib object), in as few worker
        thread calls as the storage allows (each costs the event loop a hop)."""

    async def commit(self) -> None:
        """Make the bytes durable (fsync) and visible under the key, at once and whole."""

    async def abort(self) -> None:
        """Drop what was written; the key stays absent. Safe to call more than once."""


class Storage(Protocol):
    async def create(self, key: str) -> StorageWriter:
        """A writer of a new object `key`."""

    async def open(self, key: str) -> tuple[Any, os.stat_result]:
        """The committed object open (an aiofiles binary file, or stored/bucket.py's
        OpenObject: both `read` on and `close`; the caller closes it, or hands it to
        files/response.py's `respond_with_file`), with its stat; FileNotFoundError if
        there is none."""

    async def size(self, key: str) -> int | None:
        """The committed object's size, None if it is absent."""

    async def delete(self, key: str) -> None:
        """Remove the object and any partial write of it; absent is fine."""

    async def discard(self, key: str) -> None:
        """Remove a partial write of `key` only (left by a writer that stopped)."""

    async def list(self) -> list[Stored]:
        """Everything in the storage, partial writes included (for the clean-up)."""


# Bytes gathered into one worker thread call of a local writer (after its first chunk).
BATCH_BYTES = 1024 * 1024


class LocalWriter:
    def __init__(self, final: Path, partial: Path, fd: int) -> None:
        self._final = final
        self._partial = partial
        self._fd: int | None = fd
        # Chunks not written yet, and the digest they go into: each worker thread call
        # costs the event loop more than the hash and the write of a 64 KiB chunk, so
        # they are gathered to BATCH_BYTES a call (docs/internals.md, `stored/store.py`).
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._digest: Any = None
        self._written = False  # the first chunk goes at once: a full disk shows early

    def _write_all(self, chunks: list[bytes], digest: Any) -> None:
        assert self._fd is not None
        for chunk in chunks:
            if digest is not None:
                digest.update(chunk)  # releases the GIL on large buffers, as the write does
            view = memoryview(chunk)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]

    async def write(self, data: bytes) -> None:
        await self._add(data, None)

    async def write_hashed(self, data: bytes, digest: Any) -> None:
        await self._add(data, digest)

    async def _add(self, data: bytes, digest: Any) -> None:
        if self._fd is None:
            raise ValueError("the writer is closed")
        if self._pending and digest is not self._digest:
            await self._flush()
        self._pending.append(data)
        self._pending_bytes += len(data)
        self._digest = digest
        if self._pending_bytes >= BATCH_BYTES or not self._written:
            await self._flush()

    async def _flush(self) -> None:
        chunks, digest = self._pending, self._digest
        self._pending, self._pending_bytes, self._written = [], 0, True
        if chunks:
            await asyncio.to_thread(self._write_all, chunks, digest)

    def _commit(self) -> None:
        assert self._fd is not None
        fd, self._fd = self._fd, None
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(self._partial, self._final)
        # The rename itself durable too: the folder's entry is what other hosts read.
        folder = os.open(self._final.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)

    async def commit(self) -> None:
        await self._flush()
        await asyncio.to_thread(self._commit)

    def _abort(self) -> None:
        self._pending, self._pending_bytes = [], 0
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            self._partial.unlink()

    async def abort(self) -> None:
        await asyncio.to_thread(self._abort)


class LocalStorage:
    """A folder (EXPORTER_EXPORTS_DIR): `KEY` when committed, `KEY.part` while written."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def path(self, key: str) -> Path:
        return self.folder / check_key(key)

    def _create(self, key: str) -> LocalWriter:
        self.folder.mkdir(parents=True, exist_ok=True)
        final = self.path(key)
        partial = final.with_name(final.name + PARTIAL)
        # O_EXCL: a key is written once; O_NOFOLLOW: no link planted in a shared folder.
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o640)
        return LocalWriter(final, partial, fd)

    async def create(self, key: str) -> StorageWriter:
        return await asyncio.to_thread(self._create, key)

    async def open(self, key: str) -> tuple[Any, os.stat_result]:
        path = self.path(key)
        fd = await asyncio.to_thread(os.open, path, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            st = await asyncio.to_thread(os.fstat, fd)
            f = await aiofiles.open(fd, "rb", closefd=True)
        except BaseException:
            os.close(fd)
            raise
        return f, st

    async def size(self, key: str) -> int | None:
        try:
            return (await asyncio.to_thread(os.stat, self.path(key))).st_size
        except FileNotFoundError:
            return None

    def _delete(self, key: str) -> None:
        final = self.path(key)
        for path in (final, final.with_name(final.name + PARTIAL)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    async def delete(self, key: str) -> None:
        await asyncio.to_thread(self._delete, key)

    def _discard(self, key: str) -> None:
        final = self.path(key)
        with contextlib.suppress(FileNotFoundError):
            final.with_name(final.name + PARTIAL).unlink()

    async def discard(self, key: str) -> None:
        await asyncio.to_thread(self._discard, key)

    def _list(self) -> list[Stored]:
        found: list[Stored] = []
        try:
            entries: Iterable[os.DirEntry[str]] = os.scandir(self.folder)
        except FileNotFoundError:
            return found
        with contextlib.closing(entries):  # type: ignore[type-var]
            for entry in entries:
                partial = entry.name.endswith(PARTIAL)
                key = entry.name.removesuffix(PARTIAL)
                if not _KEY.fullmatch(key) or not entry.is_file(follow_symlinks=False):
                    continue  # not ours: left alone
                with contextlib.suppress(FileNotFoundError):
                    st = entry.stat(follow_symlinks=False)
                    found.append(Stored(key, st.st_size, partial, st.st_mtime))
        return found

    async def list(self) -> list[Stored]:
        return await asyncio.to_thread(self._list)
