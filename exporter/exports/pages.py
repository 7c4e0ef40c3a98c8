"""PostgREST's pagination and counts: `Range` in items, `Prefer: count=...`, and the
`Content-Range` (with its status) that answers them.

The headers it reads and answers, and why: docs/internals.md, section `exports/pages.py`.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncConnection

from exporter.errors import ApiError
from exporter.exports import sql
from exporter.exports.query import MAX_BIGINT, ExportQuery

ITEMS = "items"
COUNTS = ("exact", "planned", "estimated")
# Longer is no range of rows (two 19-digit numbers and a unit): refused before parsing.
MAX_HEADER = 64
_RANGE = re.compile(r"(?:items=)?([0-9]+)-([0-9]*)", re.IGNORECASE)
_UNIT = re.compile(r"[A-Za-z][A-Za-z0-9!#$%&'*+.^_`|~-]*=")


def _bad(message: str) -> ApiError:
    return ApiError(400, message)


@dataclass(frozen=True)
class ItemRange:
    first: int
    last: int | None  # None: to the end


def parse_range(value: str | None, unit: str | None) -> ItemRange | None:
    """The items a request asks for; None when it asks for none (no Range, or a bytes
    range, which resumes a streamed copy)."""
    if unit is not None:
        unit = unit.strip().lower()
        if unit not in (ITEMS, "bytes"):
            raise _bad(f"Range-Unit {unit[:MAX_HEADER]!r} is not supported: items (rows), or "
                       "bytes (resuming a download)")
    if value is None:
        return None
    value = value.strip()
    if value.lower().startswith("bytes="):
        if unit == ITEMS:
            raise _bad("Range: bytes=... contradicts Range-Unit: items")
        return None
    if unit == "bytes":
        raise _bad("Range-Unit: bytes takes Range: bytes=first-last")
    if _UNIT.match(value) and not (unit == ITEMS and value.lower().startswith("items=")):
        # HTTP's own form, `unit=...`, in a unit HTTP does not define: RFC 9110 has the
        # server ignore it (the whole export, 200). PostgREST's form has no unit, and
        # `items=` counts with Range-Unit: items, which says what the client means.
        return None
    if len(value) > MAX_HEADER:
        raise _bad(f"the Range header is longer than {MAX_HEADER} characters")
    if "," in value:
        raise _bad("one range of items at a time (first-last): several are not supported")
    match = _RANGE.fullmatch(value)
    if match is None:
        raise _bad(f"malformed Range {value!r}: rows as first-last or first- (from 0, "
                   "inclusive)")
    first = int(match[1])
    last = int(match[2]) if match[2] else None
    if first > MAX_BIGINT or (last is not None and last > MAX_BIGINT):
        raise _bad(f"a Range bound is larger than {MAX_BIGINT}")
    if last is not None and last < first:
        raise ApiError(416, f"the Range {value} ends before it starts",
                       headers={"Content-Range": "*/*"})
    return ItemRange(first, last)


@dataclass(frozen=True)
class Preferences:
    count: str | None = None
    respond_async: bool = False


def parse_prefer(headers: list[str]) -> Preferences:
    """`Prefer` headers (RFC 7240, any number, comma-separated): count= and
    respond-async are honoured; anything else is refused, since a client that asks for
    a behaviour it does not get would take the answer for what it asked."""
    count: str | None = None
    respond_async = False
    for header in headers:
        if len(header) > 1024:
            raise _bad("a Prefer header is longer than 1024 characters")
        for item in header.split(","):
            token = item.split(";")[0].strip()
            if not token:
                continue
            name, _, value = token.partition("=")
            name, value = name.strip().lower(), value.strip().strip('"').lower()
            if name == "respond-async" and not value:
                respond_async = True
            elif name == "count":
                if value not in COUNTS:
                    raise _bad(f"Prefer: count={value[:32]} is not one of "
                               f"{', '.join(COUNTS)}")
                if count is not None and count != value:
                    raise _bad("Prefer asks for two different counts")
                count = value
            elif name == "handling" and value == "strict":
                pass  # what every answer here does anyway
            elif name == "wait" and value.isdigit():
                pass  # an upper bound (RFC 7240): every answer comes without waiting
            else:
                raise _bad(f"Prefer: {token[:64]} is not supported here: count=exact|planned|"
                           "estimated, respond-async and wait are")
    return Preferences(count, respond_async)


@dataclass(frozen=True)
class Window:
    """Which rows of the whole result a request sends (from `offset`, at most `limit`)
    and what it asked to be told of them."""

    range: ItemRange | None
    count: str | None
    offset: int
    limit: int | None


def window(query: ExportQuery, items: ItemRange | None, count: str | None) -> Window | None:
    """Narrow `query` to the rows `items` asks for among those its limit/offset select;
    None when there is nothing to answer about (no Range, no count)."""
    if items is None and count is None:
        return None
    offset = query.offset or 0
    end = None if query.limit is None else offset + query.limit  # exclusive
    if items is not None:
        offset = max(offset, items.first)
        if items.last is not None:
            end = items.last + 1 if end is None else min(end, items.last + 1)
    # No more than a bigint: `Range: 0-9223372036854775807` asks for every row, and its
    # end + 1 is one past what PostgreSQL's LIMIT takes.
    limit = None if end is None else min(MAX_BIGINT, max(0, end - offset))
    query.offset = offset or None
    query.limit = limit
    return Window(items, count, offset, limit)


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]


async def exact_count(conn: AsyncConnection, query: ExportQuery) -> int:
    result = await conn.exec_driver_sql(sql.count_sql(query))
    return int(result.scalar_one())


async def planned_count(conn: AsyncConnection, query: ExportQuery) -> int:
    """EXPLAIN's "Plan Rows" of the query's own SELECT: it counts the filters and the
    limit, and works for views, unlike pg_class.reltuples (a table's total only).
    Planning only: nothing runs."""
    plan = await conn.exec_driver_sql("EXPLAIN (FORMAT JSON) " + sql.select_sql(query))
    value = plan.scalar_one()
    doc = json.loads(value) if isinstance(value, str) else value
    return int(doc[0]["Plan"]["Plan Rows"])


def _whole(query: ExportQuery) -> ExportQuery:
    """All the filtered rows: what a count counts (PostgREST's total ignores limit,
    offset and order)."""
    return dataclasses.replace(query, order=[], limit=None, offset=None)


async def answer(conn: AsyncConnection, query: ExportQuery, w: Window,
                 estimated_above: int) -> Answer:
    """Status and headers for `query` (already narrowed by `window`), counted on `conn`,
    inside the export's transaction. 416 (an ApiError) when the range starts past the
    last row."""
    total: int | None = None  # what Content-Range says after the slash
    exact: int | None = None  # the true total, when known
    applied = w.count
    if w.count == "exact":
        exact = total = await exact_count(conn, _whole(query))
    elif w.count in ("planned", "estimated"):
        total = await planned_count(conn, _whole(query))
        if w.count == "estimated" and total <= estimated_above:
            exact = total = await exact_count(conn, _whole(query))
    if exact is not None:
        sent = max(0, exact - w.offset)
        if w.limit is not None:
            sent = min(sent, w.limit)
    else:
        # The rows the window holds, counted: as many as the COPY will send (no more
        # than the range's end when it has one).
        sent = await exact_count(conn, query)
    if sent == 0 and w.offset > 0 and (w.limit is None or w.limit > 0):
        if exact is None:
            exact = await exact_count(conn, _whole(query))
        raise ApiError(416, f"the range starts at row {w.offset}, past the last one "
                       f"({exact} rows)", headers={"Content-Range": f"*/{exact}"})
    span = f"{w.offset}-{w.offset + sent - 1}" if sent else "*"
    headers = {"Content-Range": f"{span}/{'*' if total is None else total}",
               "Range-Unit": ITEMS}
    if applied is not None:
        headers["Preference-Applied"] = f"count={applied}"
    if total is not None:
        partial = sent < total
    else:
        # No count asked: partial unless this is provably the whole result (from row
        # 0, and fewer rows than the window could hold).
        partial = w.range is not None and not (
            w.offset == 0 and (w.limit is None or sent < w.limit))
    return Answer(206 if partial else 200, headers)
