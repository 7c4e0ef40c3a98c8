"""The SHA-256 of each file, kept in the database and served as `Repr-Digest` (RFC 9530).

An entry names the file's size, mtime and inode; it is used only while all three
still match, so a file changed since is never described by its old digest.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncEngine

from exporter.tables import file_digests

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FileKey:
    path: str
    size: int
    mtime_ns: int
    inode: int

    @classmethod
    def of(cls, path: str, st: os.stat_result) -> FileKey:
        return cls(path, st.st_size, st.st_mtime_ns, st.st_ino)


def repr_digest(sha256: bytes) -> str:
    return f"sha-256=:{base64.b64encode(sha256).decode()}:"


def hash_file(path: Path, chunk_size: int, progress: Callable[[int], None]) -> bytes:
    """SHA-256 of a file, reporting each chunk's size (for `exporter digest`)."""
    h = hashlib.sha256()
    with path.open("rb", buffering=0) as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
            progress(len(chunk))
    return h.digest()


class DigestStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def get_many(self, keys: Iterable[FileKey]) -> dict[str, bytes]:
        """Digests still valid for these files, by path."""
        wanted = {k.path: k for k in keys}
        if not wanted:
            return {}
        t = file_digests.c
        async with self._engine.connect() as conn:
            rows = await conn.execute(
                sa.select(t.path, t.size, t.mtime_ns, t.inode, t.sha256)
                .where(t.path.in_(list(wanted)))
            )
        found: dict[str, bytes] = {}
        for path, size, mtime_ns, inode, sha256 in rows:
            if FileKey(path, size, mtime_ns, int(inode)) == wanted[path]:
                found[path] = bytes(sha256)
        return found

    async def get(self, key: FileKey) -> bytes | None:
        return (await self.get_many([key])).get(key.path)

    async def lookup(self, key: FileKey) -> bytes | None:
        """Like get, but a database failure only means "not known" (the file is still served)."""
        try:
            return await self.get(key)
        except Exception as error:
            log.warning("could not read the digest of %s: %s", key.path, error)
            return None

    async def put(self, key: FileKey, sha256: bytes) -> None:
        values = {"path": key.path, "size": key.size, "mtime_ns": key.mtime_ns,
                  "inode": key.inode, "sha256": sha256, "computed_at": sa.func.now()}
        statement = insert(file_digests).values(**values)
        statement = statement.on_conflict_do_update(
            index_elements=[file_digests.c.path],
            set_={k: statement.excluded[k] for k in values if k != "path"},
        )
        async with self._engine.begin() as conn:
            await conn.execute(statement)
