"""XLSX: a workbook streamed as it is made; PostgreSQL writes each row's sheet XML.

The COPY's SELECT turns each row into `<row><c>...</c>...</row>` by the result's column
types (numbers, booleans, dates and times as serial numbers with a format, everything
else an inline string, XML-escaped in SQL); this process only frames the rows into
sheets and the sheets into a ZIP, deflating in a worker thread. Why, and the rules for
each type: docs/internals.md, `exports/renderers/xlsx.py`.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass, field, replace
from xml.sax.saxutils import quoteattr

from exporter.exports.copy import Output
from exporter.exports.query import ExportQuery, ResultColumn
from exporter.exports.renderers.base import CopyStatement, Renderer, Rows, register
from exporter.exports.renderers.zipstream import Deflater, ZipWriter

MEDIA_TYPE = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
# A sheet holds 1,048,576 rows: the header and 1,048,575 rows of data.
ROWS_PER_SHEET = 1_048_575
# Sheet XML gathered before it is deflated in a worker thread (and at most this long,
# so that a slow query still shows progress).
BATCH = 512 * 1024
BATCH_SECONDS = 1.0
# The largest integer from which every smaller one is a double too.
EXACT_INTEGER = 2**53
# Significant digits of every decimal that reads back from a double as itself (DBL_DIG).
DOUBLE_DIGITS = 15

_MAIN = "http://schemas.openxmlformats.org/spreadsheetml/2006/main"
_RELS = "http://schemas.openxmlformats.org/officeDocument/2006/relationships"
_PACKAGE_RELS = "http://schemas.openxmlformats.org/package/2006/relationships"
_XML = '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'

# Cell styles (styles.xml's cellXfs, by position).
DATE, TIMESTAMP, TIME, BOLD = 1, 2, 3, 4
DATE_FORMAT, TIMESTAMP_FORMAT, TIME_FORMAT = "yyyy-mm-dd", "yyyy-mm-dd hh:mm:ss", "hh:mm:ss"

CONTENT_TYPES = _XML + (
    '<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
    '<Default Extension="rels" ContentType="application/vnd.openxmlformats-package.'
    'relationships+xml"/>'
    # Every other .xml part is a sheet, however many the rows need.
    '<Default Extension="xml" ContentType="application/vnd.openxmlformats-officedocument.'
    'spreadsheetml.worksheet+xml"/>'
    '<Override PartName="/xl/workbook.xml" ContentType="application/vnd.openxmlformats-'
    'officedocument.spreadsheetml.sheet.main+xml"/>'
    '<Override PartName="/xl/styles.xml" ContentType="application/vnd.openxmlformats-'
    'officedocument.spreadsheetml.styles+xml"/></Types>')
ROOT_RELS = _XML + (
    f'<Relationships xmlns="{_PACKAGE_RELS}"><Relationship Id="rId1" Type="{_RELS}/'
    'officeDocument" Target="xl/workbook.xml"/></Relationships>')
STYLES = _XML + (
    f'<styleSheet xmlns="{_MAIN}"><numFmts count="3">'
    f'<numFmt numFmtId="164" formatCode="{DATE_FORMAT}"/>'
    f'<numFmt numFmtId="165" formatCode="{TIMESTAMP_FORMAT}"/>'
    f'<numFmt numFmtId="166" formatCode="{TIME_FORMAT}"/></numFmts>'
    '<fonts count="2"><font><sz val="11"/><name val="Calibri"/></font>'
    '<font><b/><sz val="11"/><name val="Calibri"/></font></fonts>'
    '<fills count="2"><fill><patternFill patternType="none"/></fill>'
    '<fill><patternFill patternType="gray125"/></fill></fills>'
    '<borders count="1"><border><left/><right/><top/><bottom/><diagonal/></border></borders>'
    '<cellStyleXfs count="1"><xf numFmtId="0" fontId="0" fillId="0" borderId="0"/>'
    '</cellStyleXfs><cellXfs count="5">'
    '<xf numFmtId="0" fontId="0" fillId="0" borderId="0" xfId="0"/>'
    '<xf numFmtId="164" fontId="0" fillId="0" borderId="0" xfId="0" applyNumberFormat="1"/>'
    '<xf numFmtId="165" fontId="0" fillId="0" borderId="0" xfId="0" applyNumberFormat="1"/>'
    '<xf numFmtId="166" fontId="0" fillId="0" borderId="0" xfId="0" applyNumberFormat="1"/>'
    '<xf numFmtId="0" fontId="1" fillId="0" borderId="0" xfId="0" applyFont="1"/>'
    '</cellXfs><cellStyles count="1"><cellStyle name="Normal" xfId="0" builtinId="0"/>'
    '</cellStyles></styleSheet>')

# XML 1.0 has no way to write these characters (not even as &#1;): OOXML's `_xHHHH_`
# does, and so an `_x` that would read as one is escaped itself (its `_` as `_x005F_`).
_CONTROL = [c for c in range(1, 32) if c not in (9, 10, 13)]
_UNREPRESENTABLE = [*_CONTROL, 0xFFFE, 0xFFFF]
_ESCAPE = re.compile("_(?=x[0-9A-Fa-f]{4}_)|[&<>\r\n" + "".join(
    chr(c) for c in _UNREPRESENTABLE) + "]")
_ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;", "\r": "&#13;", "\n": "&#10;",
             "_": "_x005F_"}


def escape(value: str) -> str:
    """Text as an inline string's content, as the COPY's SQL writes it (`_text`)."""
    return _ESCAPE.sub(lambda m: _ENTITIES.get(m[0]) or f"_x{ord(m[0]):04X}_", value)


def unescape(value: str) -> str:
    """What a reader shows for a cell's text: `_xHHHH_` as its character."""
    return re.sub("_x([0-9A-Fa-f]{4})_", lambda m: chr(int(m[1], 16)), value)


# In SQL: the same, with a regular expression only to choose the slow path.
_SPECIAL = ("[&<>\\n\\r" + "".join(f"\\x{c:02x}" for c in _CONTROL)
            + "\\uFFFE\\uFFFF]|_x[0-9A-Fa-f]{4}_")


def _escaped_sql(value: str) -> str:
    sql = f"regexp_replace({value}, '_(?=x[0-9A-Fa-f]{{4}}_)', '_x005F_', 'g')"
    for char, entity in (("'&'", "&amp;"), ("'<'", "&lt;"), ("'>'", "&gt;"),
                         ("chr(13)", "&#13;"), ("chr(10)", "&#10;")):
        sql = f"replace({sql}, {char}, '{entity}')"
    for c in _CONTROL:
        sql = f"replace({sql}, chr({c}), '_x{c:04X}_')"
    for c in (0xFFFE, 0xFFFF):
        sql = f"regexp_replace({sql}, '\\u{c:04X}', '_x{c:04X}_', 'g')"
    return sql


_TEXT_OPEN = '<c t="inlineStr"><is><t xml:space="preserve">'
_TEXT_CLOSE = "</t></is></c>"
_EMPTY = "'<c/>'"


def _text_cell(value: str) -> str:
    return (f"CASE WHEN {value} IS NULL THEN {_EMPTY}"
            f" WHEN {value} ~ '{_SPECIAL}' THEN '{_TEXT_OPEN}' || {_escaped_sql(value)}"
            f" || '{_TEXT_CLOSE}' ELSE '{_TEXT_OPEN}' || {value} || '{_TEXT_CLOSE}' END")


def _number(value: str, style: int | None = None) -> str:
    s = f' s="{style}"' if style else ""
    return f"'<c{s}><v>' || {value} || '</v></c>'"


def _as_text(value: str) -> str:
    # The text of a number or a date: nothing in it needs escaping.
    return f"'<c t=\"inlineStr\"><is><t>' || {value} || '</t></is></c>'"


# Excel's serial numbers count days from 1899-12-30 (1900-03-01 is 61); before
# 1900-03-01 Excel's calendar has a 29 February 1900 that never was, and there is nothing
# before 1900 or after 9999: such dates are written as text.
_FIRST_DAY, _LAST_DAY = "1900-03-01", "10000-01-01"
_UNIX_EPOCH_SERIAL = 25569  # 1970-01-01


def _precision(pg_type: str) -> int:
    """A numeric type's declared precision (numeric(12,2): 12); unbounded: a lot."""
    found = re.match(r"numeric\((\d+)", pg_type)
    return int(found[1]) if found else 1000


def _cell(pg_type: str, v: str) -> str:
    """The SQL of one cell, for a value `v` of the type `pg_type`."""
    kind = kind_of(pg_type)
    if kind == "integer":
        body = _number(v)
    elif kind == "bigint":
        body = (f"CASE WHEN {v} BETWEEN {-EXACT_INTEGER} AND {EXACT_INTEGER}"
                f" THEN {_number(v)} ELSE {_as_text(v)} END")
    elif kind == "numeric" and _precision(pg_type) <= DOUBLE_DIGITS:
        body = f"CASE WHEN {v} = 'NaN' THEN {_as_text(v)} ELSE {_number(v)} END"
    elif kind == "numeric":
        # A double whose decimal reads back as this value: at most 15 significant digits
        # (float8 -> numeric keeps 15, DOUBLE_DIGITS), within a double's range; NaN and
        # infinities fail the range test.
        body = (f"CASE WHEN {v} = 0 THEN {_number(v)}"
                f" WHEN NOT abs({v}) BETWEEN 1e-300 AND 1e300 THEN {_as_text(v)}"
                f" WHEN {v}::float8::numeric = {v} THEN {_number(v)} ELSE {_as_text(v)} END")
    elif kind == "float":
        body = (f"CASE WHEN {v} IN ('NaN', 'Infinity', '-Infinity') THEN {_as_text(v)}"
                f" ELSE {_number(v)} END")
    elif kind == "boolean":
        return (f"CASE WHEN {v} THEN '<c t=\"b\"><v>1</v></c>'"
                f" WHEN NOT {v} THEN '<c t=\"b\"><v>0</v></c>' ELSE {_EMPTY} END")
    elif kind == "date":
        serial = f"({v} - date '1899-12-30')"
        body = (f"CASE WHEN {v} >= '{_FIRST_DAY}' AND {v} < '{_LAST_DAY}'"
                f" THEN {_number(serial, DATE)} ELSE {_as_text(v)} END")
    elif kind in ("timestamp", "timestamptz"):
        bounds = "timestamptz" if kind == "timestamptz" else "timestamp"
        serial = f"(date_part('epoch', {v}) / 86400 + {_UNIX_EPOCH_SERIAL})"
        text = (f"(({v}) AT TIME ZONE 'UTC')::text" if kind == "timestamptz" else v)
        body = (f"CASE WHEN {v} >= {bounds} '{_FIRST_DAY} 00:00:00+00'"
                f" AND {v} < {bounds} '{_LAST_DAY} 00:00:00+00'"
                f" THEN {_number(serial, TIMESTAMP)} ELSE {_as_text(text)} END")
    elif kind == "time":
        body = _number(f"(date_part('epoch', {v}) / 86400)", TIME)
    else:
        return _text_cell(v)
    return f"CASE WHEN {v} IS NULL THEN {_EMPTY} ELSE {body} END"


_KINDS = {
    "smallint": "integer", "integer": "integer", "bigint": "bigint", "numeric": "numeric",
    "real": "float", "double precision": "float", "boolean": "boolean", "date": "date",
    "timestamp without time zone": "timestamp", "timestamp with time zone": "timestamptz",
    "time without time zone": "time",
}
# Column widths, in characters, for the cells of a kind (Excel shows #### in a column
# too narrow for a date).
_TEXT_TYPES = ("text", "character varying", "character", "name")
_WIDTHS = {"date": 11, "timestamp": 20, "timestamptz": 20, "time": 10}


def kind_of(pg_type: str) -> str:
    """A column's kind of cell: its type without modifier; an array is text."""
    if pg_type.endswith("]"):
        return "text"
    return _KINDS.get(re.sub(r"\(\d+(,\d+)?\)", "", pg_type).strip(), "text")


def header_name(column: ResultColumn) -> str:
    kind = kind_of(column.type)
    return f"{column.name} (UTC)" if kind == "timestamptz" else column.name


def sheet_name(dataset: str, number: int) -> str:
    """`orders`, then `orders (2)`, `orders (3)`...: at most 31 characters, none of
    `[]:*?/\\` nor control characters (each such one an `_`), as Excel requires."""
    suffix = f" ({number})" if number > 1 else ""
    base = re.sub(r"[\[\]:*?/\\\x00-\x1f]", "_", dataset).strip("'") or "export"
    return base[:31 - len(suffix)] + suffix


@dataclass(frozen=True)
class Layout:
    """What the sheets look like around the rows: names, header row, widths."""

    dataset: str
    columns: tuple[ResultColumn, ...]
    rows_per_sheet: int = ROWS_PER_SHEET

    def head(self) -> bytes:
        widths = []
        for i, column in enumerate(self.columns, start=1):
            width = max(_WIDTHS.get(kind_of(column.type), 10), len(header_name(column)) + 2)
            widths.append(f'<col min="{i}" max="{i}" width="{min(width, 60)}"'
                          ' customWidth="1"/>')
        cols = f"<cols>{''.join(widths)}</cols>" if widths else ""
        header = "".join(f'<c t="inlineStr" s="{BOLD}"><is><t xml:space="preserve">'
                         f"{escape(header_name(c))}</t></is></c>" for c in self.columns)
        return (_XML + f'<worksheet xmlns="{_MAIN}"><sheetViews><sheetView workbookViewId="0">'
                '<pane ySplit="1" topLeftCell="A2" activePane="bottomLeft" state="frozen"/>'
                '<selection pane="bottomLeft"/></sheetView></sheetViews>'
                f"{cols}<sheetData><row>{header}</row>\n").encode()

    TAIL = b"</sheetData></worksheet>"

    def workbook(self, sheets: int) -> bytes:
        entries = "".join(
            f"<sheet name={quoteattr(sheet_name(self.dataset, n))} sheetId=\"{n}\""
            f' r:id="rId{n}"/>' for n in range(1, sheets + 1))
        return (_XML + f'<workbook xmlns="{_MAIN}" xmlns:r="{_RELS}"><sheets>{entries}'
                "</sheets></workbook>").encode()

    @staticmethod
    def workbook_rels(sheets: int) -> bytes:
        rels = "".join(f'<Relationship Id="rId{n}" Type="{_RELS}/worksheet"'
                       f' Target="worksheets/sheet{n}.xml"/>' for n in range(1, sheets + 1))
        rels += (f'<Relationship Id="rId{sheets + 1}" Type="{_RELS}/styles"'
                 ' Target="styles.xml"/>')
        return (_XML + f'<Relationships xmlns="{_PACKAGE_RELS}">{rels}</Relationships>'
                ).encode()


# How each of the COPY's rows ends (its line break included, so that what follows a
# sheet's last row end is the next row's).
_ROW_END = b"</row>\n"


class Workbook:
    """The archive's bytes, synchronously (run in a worker thread): the sheets' rows in,
    the ZIP out, a new sheet every `rows_per_sheet` rows."""

    def __init__(self, layout: Layout) -> None:
        self._layout = layout
        self._zip = ZipWriter()
        self._sheets = 0
        self._rows = 0  # in the current sheet
        self._deflater = Deflater()
        self._held = b""

    def start(self) -> bytes:
        return (self._zip.whole("[Content_Types].xml", CONTENT_TYPES.encode())
                + self._zip.whole("_rels/.rels", ROOT_RELS.encode())
                + self._zip.whole("xl/styles.xml", STYLES.encode())
                + self._new_sheet())

    def _new_sheet(self) -> bytes:
        self._sheets += 1
        self._rows = 0
        self._deflater = Deflater()
        return (self._zip.begin(f"xl/worksheets/sheet{self._sheets}.xml")
                + self._zip.data(self._deflater.feed(self._layout.head())))

    def _end_sheet(self) -> bytes:
        d = self._deflater
        return self._zip.data(d.feed(Layout.TAIL) + d.finish()) + self._zip.end(d)

    def rows(self, data: bytes) -> bytes:
        """Whole or partial rows of sheet XML (each row ends with `</row>`, which text
        never holds: its `<` is escaped). A piece that ends inside a row's end keeps
        those bytes for the next one, so that every row end is counted."""
        out = []
        limit = self._layout.rows_per_sheet
        data = self._held + data
        self._held = b""
        for k in range(len(_ROW_END) - 1, 0, -1):
            if data.endswith(_ROW_END[:k]):
                data, self._held = data[:-k], data[-k:]
                break
        while data:
            if self._rows == limit:
                # Bytes after the sheet's last row end begin a row: it goes on a new sheet.
                out.append(self._end_sheet())
                out.append(self._new_sheet())
            room = limit - self._rows
            count = data.count(_ROW_END)
            if count < room or (count == room and data.endswith(_ROW_END)):
                self._rows += count
                out.append(self._zip.data(self._deflater.feed(data)))
                break
            at = -1
            for _ in range(room):
                at = data.index(_ROW_END, at + 1)
            cut = at + len(_ROW_END)
            out.append(self._zip.data(self._deflater.feed(data[:cut])))
            self._rows = limit
            data = data[cut:]
        return b"".join(out)

    def finish(self) -> bytes:
        held, self._held = self._held, b""
        return (self._zip.data(self._deflater.feed(held)) + self._end_sheet()
                + self._zip.whole("xl/workbook.xml", self._layout.workbook(self._sheets))
                + self._zip.whole("xl/_rels/workbook.xml.rels",
                                  Layout.workbook_rels(self._sheets))
                + self._zip.finish())


class SheetRows(Rows):
    """The COPY's rows into a Workbook, in batches deflated in a worker thread while the
    COPY goes on (one batch in flight: a deflate stream is one sequence of calls)."""

    def __init__(self, prelude: Output, output: Output, layout: Layout) -> None:
        super().__init__(prelude, output)
        self._workbook = Workbook(layout)
        self._pending: list[bytes] = []
        self._size = 0
        self._last = 0.0
        self._job: asyncio.Future[bytes] | None = None
        self._first = True

    async def begin(self) -> None:
        await self.prelude(self._workbook.start())

    async def write(self, data: bytes) -> None:
        self._pending.append(data)
        self._size += len(data)
        now = time.monotonic()
        if self._first:
            # The first rows leave at once: until the first bytes do, the answer waits
            # (and the first row's deadline, EXPORTER_STATEMENT_TIMEOUT, runs).
            self._first = False
            self._last = now
            await self._submit()
            # Even if deflate gave nothing yet: the ZIP's first entries are waiting.
            await self._drain(always=True)
        elif self._size >= BATCH or now - self._last >= BATCH_SECONDS:
            self._last = now
            await self._submit()

    async def _submit(self) -> None:
        batch = b"".join(self._pending)
        self._pending.clear()
        self._size = 0
        await self._drain()
        self._job = asyncio.ensure_future(asyncio.to_thread(self._workbook.rows, batch))

    async def _drain(self, *, always: bool = False) -> None:
        job, self._job = self._job, None
        if job is not None:
            out = await job
            if out or always:
                await self.output(out)

    async def end(self) -> None:
        await self._submit()
        await self._drain()
        await self.output(await asyncio.to_thread(self._workbook.finish))


@dataclass(frozen=True)
class XlsxRenderer(Renderer):
    layout: Layout | None = field(default=None, compare=False)

    def for_query(self, query: ExportQuery) -> Renderer:
        return replace(self, layout=Layout(query.dataset.name, tuple(query.result_columns())))

    def body(self, select: str) -> CopyStatement:
        assert self.layout is not None, "for_query first"
        kinds = [kind_of(c.type) for c in self.layout.columns]
        # Positional names: output names may repeat, or be anything at all.
        names = [f"c{i}" for i in range(len(kinds))]
        source = f"({select}) AS s({', '.join(names)})"
        if any(k == "text" and c.type not in _TEXT_TYPES
               for k, c in zip(kinds, self.layout.columns, strict=True)):
            # Each value made text once (a text cell reads it twice); OFFSET 0 keeps the
            # planner from folding the casts back into every use.
            casts = ", ".join(f"s.{n}::text AS {n}" if k == "text" else f"s.{n}"
                              for k, n in zip(kinds, names, strict=True))
            source = f"(SELECT {casts} FROM {source} OFFSET 0) AS s"
        cells = " || ".join(_cell(c.type, f"s.{n}")
                            for c, n in zip(self.layout.columns, names, strict=True))
        # CSV format with NDJSON's quote and delimiter: the row's XML never holds \x01,
        # \x02 or a line break (escaped), so COPY writes it untouched.
        cells = cells or "''"
        return CopyStatement(f"SELECT '<row>' || {cells} || '</row>' FROM {source}",
                             {"format": "csv", "quote": "\x01", "delimiter": "\x02"})

    def rows(self, prelude: Output, output: Output) -> Rows:
        assert self.layout is not None, "for_query first"
        return SheetRows(prelude, output, self.layout)


# One COPY: its rows are made into cells here, in Python, slower than one backend reads.
XLSX = register(XlsxRenderer("xlsx", "xlsx", MEDIA_TYPE, MEDIA_TYPE, compressed=True,
                                  rows_by_line=False, splits=False))
