"""What a principal may see: its datasets, and folders with only what it may download.

Shared by the JSON API (`/datasets`, `/files/.../`) and the HTML page, so both show
the same things under the same checks.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from exporter import renderers
from exporter.access.principal import Principal
from exporter.catalog import Catalog, Dataset
from exporter.files.digests import DigestStore
from exporter.files.listing import listing
from exporter.files.paths import FilesRoot, Target
from exporter.state import State


async def visible_datasets(catalog: Catalog, principal: Principal) -> list[Dataset]:
    return [ds for ds in await catalog.all() if principal.may_read_dataset(ds.name)]


def export_urls(base_url: str, dataset: Dataset) -> dict[str, str]:
    """The dataset's full export in each format, by format name."""
    base = base_url.rstrip("/")
    # Every reserved character encoded, the slash too: names may hold any of them.
    name = quote(dataset.name, safe="")
    return {
        r.name: f"{base}/datasets/{name}.{r.extension}"
        for r in renderers.all_renderers()
    }


def may_see(principal: Principal, root: FilesRoot, target: Target) -> bool:
    real = root.relative_real(target)
    return principal.may_list_folder(real) if target.is_dir else principal.may_read_file(real)


def open_path(st: State, principal: Principal, path: str) -> tuple[FilesRoot, Target]:
    """The file or folder at `path`, if the principal may see it; else the refusal."""
    # The path as asked, before it is looked up, so a refusal does not tell whether it
    # exists; then the path as resolved, since a link inside the root may lead elsewhere.
    if not (principal.may_read_file(path) or principal.may_list_folder(path)):
        raise principal.denied()
    root = FilesRoot(st.settings.files_root, serve_hidden=st.settings.serve_hidden)
    target = root.resolve(path)
    if not may_see(principal, root, target):
        raise principal.denied()
    return root, target


async def folder_listing(st: State, principal: Principal, root: FilesRoot, folder: Target,
                         base_url: str, limit: int, offset: int) -> dict[str, Any]:
    """The folder's entries that the principal may download, with their digests."""
    return await listing(root, folder, base_url.rstrip("/"), limit, offset,
                         DigestStore(st.engine), lambda t: may_see(principal, root, t))
