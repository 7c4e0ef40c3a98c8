"""The SHA-256 of each file, kept in the database and served as `Repr-Digest` (RFC 9530).

An entry names the file's size, mtime and inode; it is used only while all three
still match, so a file changed since is never described by its old digest. A download
reads it from memory: what the database said of a file's key, digest or none, is kept
in this process (a digest for as long as the key holds, none for MISS_TTL seconds).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import logging
import os
import time
from collections import OrderedDict
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


def legacy_digest(sha256: bytes) -> str:
    """The same as RFC 3230's `Digest` value, the one aria2 verifies a download with."""
    return f"SHA-256={base64.b64encode(sha256).decode()}"


def hash_file(path: Path, chunk_size: int, progress: Callable[[int], None]) -> bytes:
    """SHA-256 of a file, reporting each chunk's size (for `exporter digest`)."""
    h = hashlib.sha256()
    with path.open("rb", buffering=0) as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
            progress(len(chunk))
    return h.digest()


# Digests known in this process, by database and file key: a hit saves a pool check-out
# and a query on every request for a file already hashed. As safe as the table itself,
# whose rows are valid only for this very key.
_KNOWN: OrderedDict[tuple[str, FileKey], bytes] = OrderedDict()
KNOWN_MAX = 4096
# Keys the database had no digest for, and when it said so: range requests never hash
# their file, and asked the database on every request. A digest computed by another
# process (or `exporter digest`) is seen after at most MISS_TTL seconds; one computed
# here at once.
_MISSED: OrderedDict[tuple[str, FileKey], float] = OrderedDict()
MISS_TTL = 5.0


def _remember(where: str, key: FileKey, sha256: bytes) -> None:
    _MISSED.pop((where, key), None)
    _KNOWN[where, key] = sha256
    _KNOWN.move_to_end((where, key))
    while len(_KNOWN) > KNOWN_MAX:
        _KNOWN.popitem(last=False)


def _missed(where: str, key: FileKey) -> bool:
    """Whether the database had no digest for this key less than MISS_TTL seconds ago."""
    said = _MISSED.get((where, key))
    if said is None:
        return False
    if time.monotonic() - said < MISS_TTL:
        return True
    del _MISSED[where, key]
    return False


def _remember_miss(where: str, key: FileKey) -> None:
    _MISSED[where, key] = time.monotonic()
    _MISSED.move_to_end((where, key))
    while len(_MISSED) > KNOWN_MAX:
        _MISSED.popitem(last=False)


@functools.lru_cache(maxsize=16)
def _where(engine: AsyncEngine) -> str:
    # Made for each file request: rendering the URL each time cost 2 % of one. Keyed by
    # the engine (hashed by identity): a URL's hash renders the URL.
    return engine.url.render_as_string(hide_password=True)


class DigestStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._where = _where(engine)

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
        known = _KNOWN.get((self._where, key))
        if known is not None:
            return known
        if _missed(self._where, key):
            return None
        found = (await self.get_many([key])).get(key.path)
        if found is not None:
            _remember(self._where, key, found)
        else:
            _remember_miss(self._where, key)
        return found

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
        _remember(self._where, key, sha256)
