"""What GET/HEAD /files/{path} does, out of the route module: find the file or folder
the path names, a folder's listing, or that a folder was asked without its trailing
slash. No HTTP here: files/response.py makes the answers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from exporter.access.admission import admit
from exporter.access.principal import Principal
from exporter.errors import bad_parameter
from exporter.files.context import Files
from exporter.files.listing import url_path
from exporter.files.paths import Target
from exporter.files.store import StoreTarget
from exporter.files.visible import folder_listing, open_path
from exporter.streaming import Client

MAX_LIMIT = 10_000
FILES_PATH = "/files/"


@dataclass(frozen=True)
class ToFolder:
    """A folder asked without its trailing slash: `path` (URL-encoded) with one."""

    path: str


@dataclass(frozen=True)
class Listing:
    body: dict[str, Any]


# A file is found as its Target, open (the caller closes it), or in a store.
Found = ToFolder | Listing | Target | StoreTarget


def _int(raw: str | None, name: str, default: int, low: int, high: int) -> int:
    if raw is None:
        return default
    digits = raw.removeprefix("-")
    if not digits.isascii() or not digits.isdigit():
        raise bad_parameter(name, f"{name} must be an integer")
    # Huge numbers are out of range without int() on thousands of digits (refused > 4300).
    value = int(raw) if len(digits.lstrip("0")) <= 19 else None
    if value is None or not low <= value <= high:
        raise bad_parameter(name, f"{name} must be between {low} and {high}")
    return value


async def serve_path(files: Files, client: Client, principal: Principal, path: str,
                     method: str, limit: str | None, offset: str | None,
                     base_url: str) -> Found:
    """What `path` (as `os.fsdecode` names files) under the files root is; a file's
    download admitted (GET). `limit` and `offset` page a listing, as the query gives them."""
    root, target = await open_path(files.settings, principal, path, files.store)
    found = False
    try:
        if target.is_dir and not target.wants_folder:
            return ToFolder(url_path(target.relative))
        if target.is_dir:
            body = await folder_listing(files.engine, principal, root, target, base_url,
                                        _int(limit, "limit", 1000, 1, MAX_LIMIT),
                                        _int(offset, "offset", 0, 0, 2**62))
            return Listing(body)
        if method == "GET":
            await admit(client, files.limiter, principal.limit_key, export=False)
        found = True
        return target
    finally:
        if not found:
            target.close()
