"""What the export routes take beyond access/deps.py's: the parts of the app's state the
exports feature uses (`ExportsDep`), and the headers an export reads (`headers_of`)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from exporter.access.deps import StateDep
from exporter.exports.context import Exports
from exporter.exports.request import Headers


async def exports_of(st: StateDep) -> Exports:
    return Exports(st.settings, st.engine, st.catalog, st.audit, st.limiter, st.links,
                   replica=st.replica, stored=st.stored, resume_copies=st.resume_copies)


ExportsDep = Annotated[Exports, Depends(exports_of)]


def headers_of(request: Request) -> Headers:
    h = request.headers
    return Headers(accept=h.get("accept"), accept_encoding=h.get("accept-encoding"),
                   range=tuple(h.getlist("range")), range_unit=h.get("range-unit"),
                   prefer=tuple(h.getlist("prefer")), if_range=h.get("if-range"))
