"""JSON listings of folders under the files root, a page at a time.

Why it works this way: docs/internals.md, section `files/listing.py`.
"""

from __future__ import annotations

import asyncio
import os
import stat
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple, TypeVar
from urllib.parse import quote

from exporter.files.digests import DigestStore, FileKey, repr_digest
from exporter.files.paths import FilesRoot, Outside, Target, printable, storable

T = TypeVar("T")

# Folders whose index is kept (per process); the least recently used goes first.
CACHED_FOLDERS = 64
# A folder changed less than this before its index was read may have changed in the
# same timestamp tick: that index is used once, not kept.
SETTLE_SECONDS = 1.0

# (real path relative to the root, is a folder) -> may the caller see it
Allowed = Callable[[str, bool], bool]


class Indexed(NamedTuple):
    # A tuple: a 100,000-name index is built ~2x faster than with a frozen dataclass,
    # and the build shares the interpreter lock with the event loop.
    name: str
    is_dir: bool
    link: str | None  # for a link: where it leads, relative to the root


@dataclass(frozen=True)
class Index:
    entries: list[Indexed]  # sorted by name
    has_links: bool


@dataclass(frozen=True)
class Entry:
    name: str
    kind: str  # file | dir
    stat: os.stat_result


_Key = tuple[int, int, bool]
_Version = tuple[int, int, int]
_cache: OrderedDict[_Key, tuple[_Version, Index]] = OrderedDict()
_building: dict[tuple[_Key, _Version], asyncio.Future[Index]] = {}


async def in_thread_owned(fn: Callable[[], T], release: Callable[[T], None]) -> T:
    """`fn()` in a thread; if the caller is cancelled meanwhile, what `fn` returns (open
    descriptors) is released when it is done instead of being lost."""
    future = asyncio.get_running_loop().run_in_executor(None, fn)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        def later(done: asyncio.Future[T]) -> None:
            if not done.cancelled() and done.exception() is None:
                release(done.result())
        future.add_done_callback(later)
        raise


def _build(root: FilesRoot, fd: int, real_relative: str) -> Index:
    """The folder's index; `fd` (a descriptor of it) is closed here."""
    entries: list[Indexed] = []
    real_names = real_relative.split("/") if real_relative else []
    try:
        with os.scandir(fd) as it:
            for item in it:
                name = item.name
                if not root.is_visible(name):
                    continue
                try:
                    if item.is_symlink():
                        # The very walk a request gets: what is listed can be fetched, and
                        # links out of the root, FIFOs, sockets and devices are not there.
                        names, st, _ = root.walk([*real_names, name], open_folder=False,
                                                 open_file=False)
                        entries.append(Indexed(name, stat.S_ISDIR(st.st_mode),
                                               "/".join(names)))
                    elif item.is_dir(follow_symlinks=False):
                        entries.append(Indexed(name, True, None))
                    elif item.is_file(follow_symlinks=False):
                        entries.append(Indexed(name, False, None))
                except (Outside, OSError):
                    continue
    finally:
        os.close(fd)
    entries.sort()  # by name: names in one folder are unique
    return Index(entries, any(e.link is not None for e in entries))


async def _build_and_keep(root: FilesRoot, fd: int, folder: Target, key: _Key,
                          version: _Version) -> Index:
    started = time.time()
    index = await asyncio.to_thread(_build, root, fd, folder.real_relative)
    if folder.stat.st_mtime_ns / 1e9 < started - SETTLE_SECONDS:
        _cache[key] = (version, index)
        _cache.move_to_end(key)
        while len(_cache) > CACHED_FOLDERS:
            _cache.popitem(last=False)
    return index


async def _index(root: FilesRoot, folder: Target) -> Index:
    st = folder.stat
    key: _Key = (st.st_dev, st.st_ino, root.serve_hidden)
    version: _Version = (st.st_mtime_ns, st.st_ctime_ns, st.st_size)
    cached = _cache.get(key)
    if cached is not None and cached[0] == version:
        _cache.move_to_end(key)
        return cached[1]
    building = _building.get((key, version))
    if building is None:
        # A task of its own, on a descriptor of its own: a request that goes away
        # neither cancels the build the others wait for nor closes what it reads.
        building = asyncio.ensure_future(
            _build_and_keep(root, os.dup(folder.fd), folder, key, version))
        _building[(key, version)] = building
        building.add_done_callback(lambda _: _building.pop((key, version), None))
    return await asyncio.shield(building)


def _page(root: FilesRoot, fd: int, real_relative: str, index: Index, allowed: Allowed,
          limit: int, offset: int, dirs_first: bool = False) -> tuple[int, list[Entry]]:
    """The total the caller may see, and the page's entries, each checked again now.

    `fd` (a descriptor of the folder) is closed here.
    """
    try:
        prefix = f"{real_relative}/" if real_relative else ""
        # As a file path, the folder itself is allowed only to a caller that may read
        # everything under it: then no entry that is not a link needs a check.
        if index.has_links or not allowed(prefix, False):
            visible = [e for e in index.entries
                       if allowed(e.link if e.link is not None else prefix + e.name, e.is_dir)]
        else:
            visible = index.entries
        if dirs_first:
            # The page's order (a stable sort keeps names in order within each kind); the
            # JSON listing keeps plain name order.
            visible = sorted(visible, key=lambda e: not e.is_dir)
        found: list[Entry] = []
        real_names = real_relative.split("/") if real_relative else []
        for e in visible[offset:offset + limit]:
            try:
                if e.link is None:
                    st = os.stat(e.name, dir_fd=fd, follow_symlinks=False)
                else:
                    names, st, _ = root.walk([*real_names, e.name], open_folder=False,
                                             open_file=False)
                    if not allowed("/".join(names), stat.S_ISDIR(st.st_mode)):
                        continue
            except (Outside, OSError):
                continue  # gone since the index was read
            if stat.S_ISDIR(st.st_mode):
                found.append(Entry(e.name, "dir", st))
            elif stat.S_ISREG(st.st_mode):
                found.append(Entry(e.name, "file", st))
        return len(visible), found
    finally:
        os.close(fd)


def url_path(path: str) -> str:
    """A path for a URL: its bytes as they are on disk, percent-encoded (`%FF`)."""
    return quote(os.fsencode(path))


async def listing(root: FilesRoot, folder: Target, base_url: str, limit: int, offset: int,
                  digests: DigestStore,
                  allowed: Allowed = lambda real, is_dir: True,
                  dirs_first: bool = False) -> dict[str, Any]:
    """The page; `folder.fd` must stay open until this returns (the caller closes it)."""
    index = await _index(root, folder)
    total, page = await asyncio.to_thread(_page, root, os.dup(folder.fd), folder.real_relative,
                                          index, allowed, limit, offset, dirs_first)
    prefix = f"{folder.relative}/" if folder.relative else ""
    keys = [FileKey.of(storable(prefix + e.name), e.stat) for e in page if e.kind == "file"]
    try:
        known = await digests.get_many(keys)
    except Exception:
        known = {}  # digests are a bonus; the listing stands without them
    items: list[dict[str, Any]] = []
    for e in page:
        path = prefix + e.name + ("/" if e.kind == "dir" else "")
        item: dict[str, Any] = {
            # Names that are not UTF-8 show U+FFFD here; `url` keeps their exact bytes.
            "name": printable(e.name),
            "kind": e.kind,
            "size": e.stat.st_size if e.kind == "file" else None,
            "mtime": datetime.fromtimestamp(e.stat.st_mtime, UTC).isoformat(),
            "url": f"{base_url}/files/{url_path(path)}",
        }
        if e.kind == "file":
            sha = known.get(storable(prefix + e.name))
            item["digest"] = repr_digest(sha) if sha is not None else None
        items.append(item)
    return {"path": printable(prefix), "total": total, "offset": offset, "limit": limit,
            "entries": items}

