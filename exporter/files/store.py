"""Files in object storage (EXPORTER_FILES_ROOT=s3://bucket/prefix): what a request path
names there, and a folder's listing, under the same rules as a folder's.

A path is checked by the same `segments` as on disk (no `..`, `.`, empty name, backslash,
control character; hidden names unless allowed), then as a key (exporter/objects.py), so
no request names anything outside the prefix. A store has no links, devices or FIFOs:
what the folder's walk guards against does not exist there, and where a path leads is the
path itself (`real_relative`), which the principal's rules are checked against. A folder
is a key prefix with something under it; a key that cannot be asked for (a backslash, an
empty segment, a name longer than a file system allows) is neither served nor listed.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from datetime import UTC
from typing import Any

from exporter.errors import ApiError
from exporter.files.digests import DigestStore, FileKey, repr_digest
from exporter.files.listing import Allowed, url_path
from exporter.files.paths import MAX_NAME_BYTES, not_found, segments
from exporter.objects import BadKey, ObjectInfo, ObjectStore, StoreUnavailable, check_key

log = logging.getLogger(__name__)


def store_unavailable(error: StoreUnavailable) -> ApiError:
    # The store's own words (its address, its XML) go to the log, not to the client.
    log.warning("the file store is unavailable: %s", error)
    return ApiError(503, "the file store is unavailable", headers={"Retry-After": "5"})


@dataclass
class StoreTarget:
    """A checked path in the store: a file (its head) or a folder (`info` None)."""

    relative: str
    wants_folder: bool
    info: ObjectInfo | None
    serve_hidden: bool = False  # what its listing shows

    @property
    def real_relative(self) -> str:
        return self.relative  # no links in a store

    @property
    def is_dir(self) -> bool:
        return self.info is None

    @property
    def is_file(self) -> bool:
        return self.info is not None

    @property
    def name(self) -> str:
        return self.relative.rsplit("/", 1)[-1]

    def close(self) -> None:
        """Nothing is held open (the interface of the folder's Target)."""


def object_key(path: str, info: ObjectInfo) -> FileKey:
    """A digest's key for an object: its ETag stands for the inode (a new object under
    the same key has a new ETag, as a file replaced has a new inode)."""
    modified = info.modified
    mtime_ns = int(modified.replace(microsecond=0).timestamp()) * 10**9 \
        + modified.microsecond * 1000
    tag = hashlib.sha256((info.etag or "").encode()).digest()
    return FileKey(path, info.size, mtime_ns, int.from_bytes(tag[:8], "big"))


async def open_store_path(store: ObjectStore, path: str, serve_hidden: bool) -> StoreTarget:
    """The file or folder at `path` in the store, or the folder's 404 (same words)."""
    names, wants_folder = segments(path, serve_hidden)
    relative = "/".join(names)
    if relative == "":
        return StoreTarget("", True, None, serve_hidden)
    try:
        check_key(relative)
    except BadKey:
        raise not_found(path) from None
    try:
        if not wants_folder:
            try:
                return StoreTarget(relative, False, await store.head(relative), serve_hidden)
            except LookupError:
                pass
        if await store.folder_exists(relative):
            return StoreTarget(relative, wants_folder, None, serve_hidden)
    except StoreUnavailable as error:
        raise store_unavailable(error) from None
    raise not_found(path)


def servable(key: str, serve_hidden: bool) -> bool:
    """Whether a request could name this key (each of its names passes)."""
    return all(_visible(name, serve_hidden) for name in key.split("/"))


def _visible(name: str, serve_hidden: bool) -> bool:
    if not name or (name.startswith(".") and not serve_hidden):
        return False
    try:
        check_key(name)
    except BadKey:
        return False
    return len(name.encode()) <= MAX_NAME_BYTES


async def store_listing(store: ObjectStore, folder: StoreTarget, base_url: str, limit: int,
                        offset: int, digests: DigestStore, allowed: Allowed,
                        dirs_first: bool = False) -> dict[str, Any]:
    """The same page as files/listing.py's `listing`, of a folder in the store. Folders'
    mtime is null: a prefix has none."""
    try:
        found = await store.list_folder(folder.relative)
    except StoreUnavailable as error:
        raise store_unavailable(error) from None
    prefix = f"{folder.relative}/" if folder.relative else ""
    entries: list[tuple[str, bool, ObjectInfo | None]] = []
    for sub in found.folders:
        name = sub[len(prefix):].rstrip("/")
        if _visible(name, folder.serve_hidden) and allowed(prefix + name, True):
            entries.append((name, True, None))
    for obj in found.objects:
        name = obj.key[len(prefix):]
        if "/" not in name and _visible(name, folder.serve_hidden) and allowed(obj.key, False):
            entries.append((name, False, obj))
    entries.sort(key=lambda e: e[0])
    if dirs_first:
        entries.sort(key=lambda e: not e[1])
    page = entries[offset:offset + limit]
    keys = [object_key(prefix + name, info) for name, _, info in page if info is not None]
    try:
        known = await digests.get_many(keys)
    except Exception:
        known = {}  # digests are a bonus; the listing stands without them
    items: list[dict[str, Any]] = []
    for name, is_dir, info in page:
        path = prefix + name + ("/" if is_dir else "")
        item: dict[str, Any] = {
            "name": name,
            "kind": "dir" if is_dir else "file",
            "size": info.size if info is not None else None,
            "mtime": info.modified.astimezone(UTC).isoformat() if info is not None
            else None,
            "url": f"{base_url}/files/{url_path(path)}",
        }
        if info is not None:
            sha = known.get(prefix + name)
            item["digest"] = repr_digest(sha) if sha is not None else None
        items.append(item)
    return {"path": prefix, "total": len(entries), "offset": offset, "limit": limit,
            "entries": items}
