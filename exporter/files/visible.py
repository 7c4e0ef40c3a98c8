"""What a principal may see of the files: folders with only what it may download.

Shared by the JSON API (`/files/.../`) and the HTML page, so both show the same things
under the same checks.
"""

from __future__ import annotations

import functools
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from exporter.access.principal import Principal
from exporter.config import Settings
from exporter.files.digests import DigestStore
from exporter.files.listing import in_thread_owned, listing
from exporter.files.paths import FilesRoot, NotCached, Target
from exporter.files.store import StoreTarget, open_store_path, store_listing
from exporter.objects import ObjectStore

# Where the files are (a folder or a store), and a path checked in it.
Root = FilesRoot | ObjectStore
AnyTarget = Target | StoreTarget


def may_see(principal: Principal, real_relative: str, is_dir: bool) -> bool:
    """By where a path really leads (links resolved), relative to the root."""
    if is_dir:
        return principal.may_list_folder(real_relative)
    return principal.may_read_file(real_relative)


async def open_path(settings: Settings, principal: Principal, path: str,
                    store: ObjectStore | None = None) -> tuple[Root, AnyTarget]:
    """The file or folder at `path` (in `store` if the files are there), open, if the
    principal may see it; else the refusal.

    The caller owns the target's descriptor (`target.close()`).
    """
    # The path as asked, before it is looked up, so a refusal does not tell whether it
    # exists; then the path as resolved, since a link inside the root may lead elsewhere.
    if not (principal.may_read_file(path) or principal.may_list_folder(path)):
        raise principal.denied()
    root: Root
    target: AnyTarget
    if store is not None:
        root, target = store, await open_store_path(store, path, settings.serve_hidden)
    else:
        try:
            # On the event loop when the kernel's caches hold the whole path, as they do
            # for files asked often: a worker thread's hand-over and back cost 0.4 ms of
            # CPU per request, 40 % of an X-Accel-Redirect answer (docs/benchmarks.md).
            root, target = _open(settings, path, cached=True)
        except NotCached:
            root, target = await in_thread_owned(functools.partial(_open, settings, path),
                                                 lambda opened: opened[1].close())
    if not may_see(principal, target.real_relative, target.is_dir):
        target.close()
        raise principal.denied()
    return root, target


def _open(settings: Settings, path: str, cached: bool = False) -> tuple[FilesRoot, Target]:
    root = FilesRoot(settings.files_folder, serve_hidden=settings.serve_hidden)
    # With X-Accel-Redirect nginx reads the file: here it is walked and checked, not
    # opened (an open, an fstat and a close less per request).
    return root, root.open(path, open_file=not settings.files_accel_redirect, cached=cached)


async def folder_listing(engine: AsyncEngine, principal: Principal, root: Root,
                         folder: AnyTarget,
                         base_url: str, limit: int, offset: int,
                         dirs_first: bool = False) -> dict[str, Any]:
    """The folder's entries that the principal may download, with their digests
    (folders before files with `dirs_first`, as the page shows them)."""
    def allowed(real: str, is_dir: bool) -> bool:
        return may_see(principal, real, is_dir)

    if isinstance(root, ObjectStore):
        assert isinstance(folder, StoreTarget)
        return await store_listing(root, folder, base_url.rstrip("/"), limit, offset,
                                   DigestStore(engine), allowed, dirs_first)
    assert isinstance(folder, Target)
    return await listing(root, folder, base_url.rstrip("/"), limit, offset,
                         DigestStore(engine), allowed, dirs_first)
