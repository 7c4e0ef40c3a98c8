"""An export request, read once from a URL and headers: what every road of an export
(HEAD, a streamed GET, a stored export, a resume, the audit trail) starts from.

`read` is the one place a path, a query string and the headers become a dataset, a
representation (format and coding), a query, a window of rows and preferences; what it
refuses is a 4xx before anything runs. `ExportRequest.url` names the representation
whole: two requests with the same `url` get the same bytes from the same snapshot, so it
is what a stored copy is found by when a download resumes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import quote

from starlette.datastructures import Headers as StarletteHeaders

from exporter.access.links import LINK_PARAMETERS, canonical_query
from exporter.access.principal import LINK, Principal
from exporter.compression import Coding, accepted
from exporter.errors import ApiError
from exporter.export_names import coding_hint, readings
from exporter.exports import pages, renderers
from exporter.exports.catalog import Catalog, Dataset
from exporter.exports.query import ExportQuery, parse
from exporter.exports.renderers import Renderer
from exporter.http import parse_accept

DATASETS = "/datasets/"


@dataclass(frozen=True)
class Headers:
    """The request headers an export reads (absent: None)."""

    accept: str | None = None
    accept_encoding: str | None = None
    range: tuple[str, ...] = ()
    range_unit: str | None = None
    prefer: tuple[str, ...] = ()

    @classmethod
    def of(cls, h: StarletteHeaders) -> Headers:
        return cls(accept=h.get("accept"), accept_encoding=h.get("accept-encoding"),
                   range=tuple(h.getlist("range")), range_unit=h.get("range-unit"),
                   prefer=tuple(h.getlist("prefer")))


@dataclass(frozen=True)
class Representation:
    """The bytes' shape: a format, in a file of a coding (`orders.csv.gz`) or not."""

    renderer: Renderer
    file_coding: Coding | None = None

    @property
    def suffix(self) -> str:
        coding = f".{self.file_coding.extension}" if self.file_coding else ""
        return f".{self.renderer.extension}{coding}"

    @property
    def content_type(self) -> str:
        return self.file_coding.media_type if self.file_coding else self.renderer.content_type


@dataclass
class ExportRequest:
    dataset: Dataset
    representation: Representation
    query: ExportQuery
    # The query string's own parameters (a link's removed), as given.
    params: list[tuple[str, str]]
    principal: Principal
    method: str = "GET"
    # `base` + the representation's suffix is the export's path: `/datasets/orders`, or
    # `/downloads` for the audit trail.
    base: str = ""
    items: pages.ItemRange | None = None
    prefer: pages.Preferences = field(default_factory=pages.Preferences)
    window: pages.Window | None = None
    # `Range: bytes=...`: a resume (the copy it continues checks its If-Range itself).
    byte_range: str | None = None
    # The content coding negotiated for the answer (Content-Encoding); never with a
    # byte range (a range's bytes are identity bytes) or a file coding.
    content_coding: Coding | None = None

    @property
    def query_string(self) -> str:
        """The query's parameters in canonical form (a link's own left out)."""
        return canonical_query(self.params)

    @property
    def url(self) -> str:
        """The representation's canonical URL (without the server's prefix)."""
        query = self.query_string
        return self.base + self.representation.suffix + (f"?{query}" if query else "")

    @property
    def renderer(self) -> Renderer:
        return self.representation.renderer


def negotiate(accept: str | None) -> Renderer:
    """The format `Accept` asks for; 406 when none is offered."""
    for media_type in parse_accept(accept):
        if media_type in ("*/*", "text/*"):
            return renderers.DEFAULT
        renderer: Renderer | None = renderers.by_media_type(media_type)
        if renderer is not None:
            return renderer
    offered = ", ".join(r.media_type for r in renderers.all_renderers())
    pgrst = [m for m in parse_accept(accept) if m.startswith("application/vnd.pgrst.")]
    if pgrst:
        # PostgREST's singular object, plan, and array/stripped forms: a whole export
        # is streamed rows, never one object made of them (docs/postgrest.md).
        raise ApiError(406, f"{pgrst[0]} (PostgREST's) is not supported: this dataset is "
                       f"available as {offered}")
    raise ApiError(406, f"this dataset is available as {offered}")


async def find(catalog: Catalog, principal: Principal, name: str, accept: str | None,
               ) -> tuple[Dataset, Representation]:
    """The dataset and representation `name` (`orders`, `orders.csv`, `orders.csv.gz`)
    names; a refusal before the lookup tells nothing of what exists."""
    names = readings(name)
    if not any(principal.may_read_dataset(r.dataset) for r in names):
        raise principal.denied()
    for attempt in range(2):
        if attempt:
            await catalog.reload()  # a table or view created since the last look
        for reading in names:
            if (ds := catalog.get(reading.dataset)) is None:
                continue
            if not principal.may_read_dataset(ds.name):
                raise principal.denied()
            if reading.format is None:
                return ds, Representation(negotiate(accept))
            renderer = renderers.by_extension(reading.format)
            assert renderer is not None  # readings() knows only registered formats
            return ds, Representation(renderer, reading.coding)
    raise ApiError(404, f"no dataset named '{name}' in schema '{catalog.schema}'"
                        f"{coding_hint(name)}")


def read(dataset: Dataset, representation: Representation, principal: Principal,
         params: Sequence[tuple[str, str]], headers: Headers, *, method: str = "GET",
         base: str | None = None, compression: bool = False) -> ExportRequest:
    """The request whole, or the 4xx that refuses it. `compression`: whether this server
    compresses answers (EXPORTER_COMPRESSION)."""
    # A link's own parameters were checked when it authenticated; anywhere else parse()
    # refuses them.
    if principal.kind == LINK:
        params = [p for p in params if p[0] not in LINK_PARAMETERS]
    query = parse(dataset, params)
    if len(headers.range) > 1:
        raise ApiError(400, "one Range header at a time")
    raw_range = headers.range[0] if headers.range else None
    # Items (PostgREST's pages) before bytes: `Range: bytes=` resumes a copy.
    items = pages.parse_range(raw_range, headers.range_unit)
    prefer = pages.parse_prefer(list(headers.prefer))
    if prefer.respond_async and (items is not None or prefer.count is not None):
        raise ApiError(400, "a stored export (Prefer: respond-async) is always whole: its "
                       "manifest counts its rows; Range and Prefer: count are for streamed "
                       "answers")
    byte_range = raw_range if items is None else None
    content_coding = None
    if (representation.file_coding is None and raw_range is None
            and representation.renderer.compressible):
        content_coding = accepted(compression, headers.accept_encoding)
    return ExportRequest(
        dataset=dataset, representation=representation, query=query, params=list(params),
        principal=principal, method=method,
        base=DATASETS + quote(dataset.name, safe="") if base is None else base,
        items=items, prefer=prefer, window=pages.window(query, items, prefer.count),
        byte_range=byte_range,
        content_coding=content_coding)
