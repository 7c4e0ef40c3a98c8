"""The renderer type and the registry of formats (what a renderer is: the package's
docstring)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Copy:
    """`COPY (query) TO STDOUT WITH (options)`, as asyncpg's copy_from_query takes it."""

    query: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Renderer:
    name: str
    extension: str  # the suffix of `/datasets/{name}.{extension}`
    media_type: str  # what `Accept` asks for
    content_type: str  # what the response says

    def header(self, select: str) -> Copy | None:
        """A COPY whose output goes before the rows (sent even when there are none)."""
        return None

    def body(self, select: str) -> Copy:
        raise NotImplementedError


_by_extension: dict[str, Renderer] = {}
_by_media_type: dict[str, Renderer] = {}


def register(renderer: Renderer, *aliases: str) -> Renderer:
    _by_extension[renderer.extension] = renderer
    for media_type in (renderer.media_type, *aliases):
        _by_media_type[media_type] = renderer
    return renderer


def by_extension(extension: str) -> Renderer | None:
    return _by_extension.get(extension)


def by_media_type(media_type: str) -> Renderer | None:
    return _by_media_type.get(media_type)


def all_renderers() -> list[Renderer]:
    return list(_by_extension.values())
