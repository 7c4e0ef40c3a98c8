"""An export's name in a path: `dataset[.format][.coding]`, read the same way by the export
routes, stored exports, scopes and signed links.

`orders.csv.gz` is dataset `orders` as CSV in a gzip file; `orders` leaves the format to
`Accept`. A coding counts only after a format (`orders.gz` is only ever a dataset's own
name), and only the last suffixes do: a dataset named `x.csv` is `x.csv.csv`. The formats
register their extensions here (exporter/exports/renderers) so that the access feature,
below the exports, reads names as they do.
"""

from __future__ import annotations

from dataclasses import dataclass

from exporter.compression import Coding, by_extension

_formats: set[str] = set()


def register_format(extension: str) -> None:
    _formats.add(extension)


@dataclass(frozen=True)
class ExportName:
    dataset: str
    format: str | None = None  # a format's extension; None: negotiated from Accept
    coding: Coding | None = None  # a file in that coding (`.csv.gz`)

    @property
    def suffix(self) -> str:
        if self.format is None:
            return ""
        return f".{self.format}" + (f".{self.coding.extension}" if self.coding else "")


def readings(name: str) -> tuple[ExportName, ...]:
    """What `name` may mean, the one with a format suffix first: `orders.csv.gz` is
    `orders` as a gzipped CSV, or a dataset named `orders.csv.gz`."""
    whole = ExportName(name)
    base, dot, extension = name.rpartition(".")
    if not dot or not base:
        return (whole,)
    coding = by_extension(extension)
    if coding is not None:
        inner, dot, extension = base.rpartition(".")
        if dot and inner and extension in _formats:
            return ExportName(inner, extension, coding), whole
        return (whole,)
    if extension in _formats:
        return ExportName(base, extension), whole
    return (whole,)


def dataset_names(name: str) -> list[str]:
    """The datasets `name` may name (`orders.csv`: `orders`, or `orders.csv` itself)."""
    return [reading.dataset for reading in readings(name)]


def coding_hint(name: str) -> str:
    """For a 404: a compressed export names its format first (`orders.gz` is not
    `orders.csv.gz`)."""
    base, _, extension = name.rpartition(".")
    if base and by_extension(extension) is not None and len(readings(name)) == 1:
        return f" (a compressed export names its format first: {base}.csv.{extension})"
    return ""
