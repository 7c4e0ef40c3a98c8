"""JSON listings of folders under the files root, a page at a time."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from exporter.errors import ApiError
from exporter.files.digests import DigestStore, FileKey, repr_digest
from exporter.files.paths import FilesRoot, Target


@dataclass(frozen=True)
class Entry:
    name: str
    kind: str  # file | dir
    stat: os.stat_result


def _entries(root: FilesRoot, folder: Target, allowed: Callable[[Target], bool]) -> list[Entry]:
    found: list[Entry] = []
    with os.scandir(folder.real) as it:
        for item in it:
            name = item.name
            if not root.is_visible(name):
                continue
            try:
                name.encode("utf-8")  # a name that is not UTF-8 cannot be put in JSON or a URL
            except UnicodeEncodeError:
                continue
            prefix = f"{folder.relative}/" if folder.relative else ""
            try:
                # The very check a request gets: what is listed can be fetched, and
                # links out of the root, FIFOs, sockets and devices are not there.
                target = root.resolve(prefix + name)
            except ApiError:
                continue
            if not allowed(target):
                continue  # listed only what the caller may download
            if target.is_file:
                found.append(Entry(name, "file", target.stat))
            elif target.is_dir:
                found.append(Entry(name, "dir", target.stat))
    found.sort(key=lambda e: e.name)
    return found


async def listing(root: FilesRoot, folder: Target, base_url: str, limit: int, offset: int,
                  digests: DigestStore,
                  allowed: Callable[[Target], bool] = lambda target: True) -> dict[str, Any]:
    every = _entries(root, folder, allowed)
    page = every[offset:offset + limit]
    prefix = f"{folder.relative}/" if folder.relative else ""
    keys = [FileKey.of(prefix + e.name, e.stat) for e in page if e.kind == "file"]
    try:
        known = await digests.get_many(keys)
    except Exception:
        known = {}  # digests are a bonus; the listing stands without them
    items: list[dict[str, Any]] = []
    for e in page:
        path = prefix + e.name + ("/" if e.kind == "dir" else "")
        item: dict[str, Any] = {
            "name": e.name,
            "kind": e.kind,
            "size": e.stat.st_size if e.kind == "file" else None,
            "mtime": datetime.fromtimestamp(e.stat.st_mtime, UTC).isoformat(),
            "url": f"{base_url}/files/{quote(path)}",
        }
        if e.kind == "file":
            sha = known.get(prefix + e.name)
            item["digest"] = repr_digest(sha) if sha is not None else None
        items.append(item)
    return {"path": prefix, "total": len(every), "offset": offset, "limit": limit,
            "entries": items}
