"""What a principal may see of the datasets, for the JSON API (`/datasets`) and the page,
so both show the same things under the same checks."""

from __future__ import annotations

from urllib.parse import quote

from exporter.access.principal import Principal
from exporter.compression import CODINGS
from exporter.exports import renderers
from exporter.exports.catalog import Catalog, Dataset


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


def compressed_export_urls(base_url: str, dataset: Dataset) -> dict[str, str]:
    """The same as files in each coding, for tools that do not negotiate one (`wget`):
    by `format.extension` (`csv.gz`, `ndjson.zst`)."""
    urls = export_urls(base_url, dataset)
    return {
        f"{r.name}.{c.extension}": f"{urls[r.name]}.{c.extension}"
        for r in renderers.all_renderers()
        if not r.compressed  # Parquet, XLSX: compressed inside already
        for c in CODINGS
    }
