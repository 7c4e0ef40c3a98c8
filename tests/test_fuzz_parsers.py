"""Hypothesis on the pure parsers: whatever a client sends, each answers with a result or
with its documented refusal (an ApiError with a 4xx status, or a documented ValueError),
never with another exception, which the server would turn into a 500.

The explicit @example cases are hostile inputs found by fuzzing or named in issue 10;
they run on every run, whatever Hypothesis draws."""

from __future__ import annotations

import itertools
import logging
import os
import string
import time
from datetime import timedelta
from pathlib import Path
from urllib.parse import unquote

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from exporter.access.durations import parse_duration
from exporter.access.links import LINK_PARAMETERS, OPERATOR, read_link, split_query
from exporter.access.tokens import is_token_name
from exporter.errors import ApiError
from exporter.exports import sql
from exporter.exports.catalog import Column, Dataset
from exporter.exports.operators import NAMES as OPERATORS
from exporter.exports.operators import UNSUPPORTED
from exporter.exports.query import LOGIC, MAX_BIGINT, RESERVED, ExportQuery, parse
from exporter.files.conditions import (
    NOT_MODIFIED,
    PRECONDITION_FAILED,
    Validators,
    evaluate,
    if_range_allows,
    parse_date,
    parse_etags,
)
from exporter.files.paths import FilesRoot
from exporter.files.ranges import ByteRange, Unsatisfiable, parse_range
from exporter.http import content_disposition, parse_accept
from exporter.server.logs import PLAIN, PlainFormatter, escape
from tests.fuzzing import HUGE, PARSERS, hostile_text, huge_numbers, odd_encoded, spellings

# The demo table's columns (exporter/exports/demo.py), as the catalog describes them.
ORDERS = Dataset("exports", "orders", "table", 20_000, {
    c.name: c for c in [
        Column("id", "bigint", "bigint", "N", False),
        Column("customer", "text", "text", "S", False),
        Column("amount", "numeric(12,2)", "numeric", "N", False),
        Column("created_at", "timestamp with time zone", "timestamp with time zone", "D", False),
        Column("updated_at", "timestamp with time zone", "timestamp with time zone", "D", False),
        Column("ship_date", "date", "date", "D", True),
        Column("paid", "boolean", "boolean", "B", True),
        Column("order_uuid", "uuid", "uuid", "U", False),
        Column("details", "jsonb", "jsonb", "U", True),
        Column("tags", "text[]", "text[]", "A", True),
        Column("note", "text", "text", "S", True),
    ]
})
COLUMNS = list(ORDERS.columns)


def assert_client_error(error: ApiError) -> None:
    assert 400 <= error.status < 500, (error.status, error.message)
    assert error.message


# -- the query grammar (exporter/exports/query.py) ------------------------------------------------

def filter_values() -> st.SearchStrategy[str]:
    value = hostile_text()
    listed = st.lists(value, max_size=6).map(lambda items: "(" + ",".join(items) + ")")
    operator = st.sampled_from([*OPERATORS, "not", "", "nullsfirst"])
    grammatical = st.builds(
        lambda neg, op, v: ("not." if neg else "") + f"{op}.{v}",
        st.booleans(), operator, st.one_of(value, listed, huge_numbers()),
    )
    return st.one_of(grammatical, value)


# PostgREST's grammar beyond names and values: fields with JSON paths and quotes, select
# items, operators with modifiers, logic trees.
FIELDS = [*COLUMNS, "details->>a", "details->a->0", '"note"', '"ship.date"', "tags->a", "x->"]
ITEMS = [*FIELDS, "*", "a:id", "id::text", "id::int;drop", 'id::"int"', "a:details->>b::int",
         "items(*)", "...x(y)", "amount.sum()", ":id", '"a,b"', "id::numeric(10,2)[]"]
OPERATOR_FORMS = [*OPERATORS, *UNSUPPORTED, "eq(any)", "like(all)", "fts(english)",
                  "in(any)", "eq()"]


def tree_values() -> st.SearchStrategy[str]:
    value = st.one_of(hostile_text(10), st.sampled_from(['"a,b"', "(1,2)", "{1,2}", '"x)"']))
    leaf = st.builds(lambda f, neg, op, v: f"{f}.{'not.' if neg else ''}{op}.{v}",
                     st.sampled_from(FIELDS), st.booleans(), st.sampled_from(OPERATOR_FORMS),
                     value)
    tree = st.recursive(leaf, lambda children: st.builds(
        lambda neg, conj, items: f"{'not.' if neg else ''}{conj}({','.join(items)})",
        st.booleans(), st.sampled_from(["and", "or"]), st.lists(children, max_size=3)),
        max_leaves=8)
    return st.lists(tree, max_size=4).map(lambda items: "(" + ",".join(items) + ")")


def query_params() -> st.SearchStrategy[list[tuple[str, str]]]:
    names = st.one_of(st.sampled_from(COLUMNS), st.sampled_from(sorted(RESERVED)), hostile_text())
    column_list = st.lists(st.sampled_from([*COLUMNS, "", " ", "nope"]), max_size=4)
    modifiers = st.lists(st.sampled_from(["asc", "desc", "nullsfirst", "nullslast", "x", ""]),
                         max_size=3)
    order = st.lists(st.builds(lambda c, m: ".".join([c, *m]), st.sampled_from(COLUMNS),
                               modifiers), min_size=1, max_size=3).map(",".join)
    pair = st.one_of(
        st.tuples(st.just("select"), st.one_of(column_list.map(",".join), hostile_text())),
        st.tuples(st.just("order"), st.one_of(order, hostile_text())),
        st.tuples(st.sampled_from(["limit", "offset"]), st.one_of(huge_numbers(), hostile_text())),
        st.tuples(st.sampled_from(COLUMNS), filter_values()),
        st.tuples(names, hostile_text()),
        st.tuples(st.sampled_from(sorted(LOGIC)), st.one_of(tree_values(), hostile_text())),
        st.tuples(st.just("select"), st.lists(st.sampled_from(ITEMS), max_size=4).map(",".join)),
        st.tuples(st.sampled_from(FIELDS), st.builds(
            lambda op, v: f"{op}.{v}", st.sampled_from(OPERATOR_FORMS), hostile_text())),
    )
    return st.lists(pair, max_size=6)


@PARSERS
@given(query_params())
@example([("limit", HUGE)])  # issue 10: 5,000 digits
@example([("offset", HUGE)])
@example([("id", "in.(" + ",".join(map(str, range(1700))) + ")")])  # issue 10
@example([("expires", "\u00b2"), ("by", "x"), ("signature", "x")])  # issue 10
@example([("limit", "\u00b2")])  # a digit to str.isdigit(), not to int()
@example([("id", "eq.1\x00")])
@example([("select", "id,,customer")])
@example([("order", "id.desc.nullslast.asc")])
@example([("tags", 'in.("a,b",c\\"d,"e\\)",)')])
@example([("id", "not.")])
@example([("or", "(" + "and(" * 5000 + "id.eq.1" + ")" * 5001)])
@example([("not.and", "(" + ",".join(["id.eq.1"] * 200_000) + ")")])
@example([("select", "id::" + "x" * 10_000)])
@example([("select", "details" + "->a" * 10_000)])
@example([("or", '(customer.eq."a,b",customer.eq."\\",id.eq(any).{1,"2"})')])
def test_query_parse_answers_a_query_or_a_4xx(params: list[tuple[str, str]]) -> None:
    try:
        query = parse(ORDERS, params)
    except ApiError as error:
        assert_client_error(error)
        return
    assert isinstance(query, ExportQuery)
    assert all(c.name in ORDERS.columns for c in query.columns)
    assert all(f.column.name in ORDERS.columns and f.operator in OPERATORS
               for f in query.filters)
    assert all(f.column.name in ORDERS.columns and f.operator in OPERATORS
               for f in query.all_filters())
    # Whatever parsed renders: casts as check_values would resolve them.
    query.types.update({i.cast: "text" for i in query.items if i.cast is not None})
    assert sql.select_sql(query).startswith("SELECT ")
    for count in (query.limit, query.offset):
        assert count is None or 0 <= count <= MAX_BIGINT


def test_select_of_more_columns_than_postgresql_allows_is_a_400() -> None:
    """Found by the corpus: PostgreSQL refuses more than 1,664 columns, which was a 502."""
    parse(ORDERS, [("select", ",".join(["id"] * 1664))])
    with pytest.raises(ApiError) as refused:
        parse(ORDERS, [("select", ",".join(["id"] * 1665))])
    assert refused.value.status == 400 and refused.value.parameter == "select"


@PARSERS
@given(st.lists(hostile_text(), max_size=8))
def test_in_list_round_trips_through_quoting(items: list[str]) -> None:
    """Any values, quoted PostgREST's way, come back out of `in.(...)` unchanged."""
    if any("\x00" in item for item in items):
        return  # refused before the grammar, tested above
    quoted = ",".join('"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"' for v in items)
    query = parse(ORDERS, [("customer", f"in.({quoted})")])
    assert list(query.filters[0].values) == (items if quoted else [])


# -- Range (exporter/files/ranges.py) -----------------------------------------------------

def range_headers() -> st.SearchStrategy[str]:
    number = st.one_of(st.integers(0, 2**70).map(str), huge_numbers(), st.just(""))
    spec = st.one_of(
        st.builds(lambda a, b: f"{a}-{b}", number, number),
        st.builds(lambda a: f"-{a}", number),
        hostile_text(),
    )
    unit = st.sampled_from(["bytes", "BYTES", " bytes ", "items", ""])
    specs = st.lists(spec, max_size=6).map(lambda s: ",".join(s))
    return st.one_of(st.builds(lambda u, s: f"{u}={s}", unit, specs), hostile_text())


@PARSERS
@given(range_headers(), st.integers(0, 2**62), st.integers(1, 100))
@example("bytes=" + HUGE + "-", 1000, 8)  # issue 10: 5,000 digits
@example("bytes=0-" + HUGE, 1000, 8)
@example("bytes=-" + HUGE, 1000, 8)
@example("bytes=\u0661\u0662-", 1000, 8)  # Arabic-Indic digits are \d to `re`
@example("bytes=0-0,-1", 0, 8)
def test_parse_range_lies_within_the_file(header: str, size: int, max_ranges: int) -> None:
    try:
        ranges = parse_range(header, size, max_ranges)
    except Unsatisfiable:
        return
    if ranges is None:
        return
    assert 1 <= len(ranges) <= max_ranges
    for r in ranges:
        assert isinstance(r, ByteRange)
        assert 0 <= r.start <= r.end < size
    # merged: in order, neither overlapping nor touching
    for a, b in itertools.pairwise(ranges):
        assert a.end + 1 < b.start


# -- conditional requests (exporter/files/conditions.py) ----------------------------------

def http_dates() -> st.SearchStrategy[str]:
    days = st.sampled_from(["Mon", "Tue", "Sun", "Xyz", ""])
    months = st.sampled_from(["Jan", "Feb", "Dec", "Foo"])
    numbers = st.one_of(st.integers(-(10**6), 10**6).map(str), huge_numbers())
    zones = st.sampled_from(["GMT", "UTC", "+0000", "-0000", "+9999", "-2359", "EST", "", "Z"])
    built = st.builds(
        lambda d, day, m, y, hh, mm, ss, z: f"{d}, {day} {m} {y} {hh}:{mm}:{ss} {z}",
        days, numbers, months, numbers, numbers, numbers, numbers, zones,
    )
    return st.one_of(built, hostile_text())


OVERFLOWING_DATES = [
    "Sun, 06 Nov 99999 08:49:37 GMT",  # issue 10: year 99999
    "Sun, 99999999999 Nov 1994 08:49:37 GMT",  # issue 10: a huge day number
    "Sun, 06 Nov 1994 99999999999:49:37 GMT",
    "Sun, 06 Nov 0 08:49:37 GMT",
    "Sun, 01 Jan 1 00:00:00 +2359",
    "Fri, 31 Dec 9999 23:59:59 -2359",
    f"Sun, 06 Nov {HUGE} 08:49:37 GMT",
]


def validators() -> Validators:
    mtime = 1_700_000_000
    return Validators('"1f-abc-2"', "Tue, 14 Nov 2023 22:13:20 GMT", mtime)


@PARSERS
@given(http_dates())
@example("")
def test_parse_date_is_a_timestamp_or_none(value: str) -> None:
    result = parse_date(value)
    assert result is None or isinstance(result, int)


@pytest.mark.parametrize("value", OVERFLOWING_DATES)
def test_overflowing_dates_are_ignored(value: str) -> None:
    result = parse_date(value)
    assert result is None or isinstance(result, int)
    v = validators()
    for name in ("if-modified-since", "if-unmodified-since"):
        assert evaluate("GET", {name: value}, v) in (None, NOT_MODIFIED, PRECONDITION_FAILED)
    assert if_range_allows(value, v) in (True, False)


def etag_lists() -> st.SearchStrategy[str]:
    tag = st.one_of(
        st.just('"1f-abc-2"'),
        st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0xFF,
                                       exclude_characters='"'), max_size=20)
        .map(lambda t: f'"{t}"'),
        hostile_text(),
    )
    weak = st.booleans().map(lambda w: "W/" if w else "")
    item = st.builds(lambda w, t: w + t, weak, tag)
    return st.one_of(st.lists(item, max_size=6).map(", ".join), st.just("*"), hostile_text())


@PARSERS
@given(etag_lists())
@example('"' + "a" * 100_000 + '"')  # issue 10: a 100 kB If-None-Match
@example(", ".join(['"x"'] * 20_000))
@example('W/"1f-abc-2", ,, "x"')
def test_etag_lists_parse_or_are_malformed(value: str) -> None:
    tags = parse_etags(value)
    if tags is not None:
        for weak, tag in tags:
            assert isinstance(weak, bool)
            assert tag.startswith('"') and tag.endswith('"') and len(tag) >= 2


@PARSERS
@given(st.sampled_from(["GET", "HEAD", "POST", "PUT"]),
       st.dictionaries(st.sampled_from(["if-match", "if-none-match", "if-modified-since",
                                        "if-unmodified-since"]),
                       st.one_of(etag_lists(), http_dates()), max_size=4),
       st.one_of(st.none(), etag_lists(), http_dates()))
def test_evaluate_answers_304_412_or_goes_on(method: str, headers: dict[str, str],
                                             if_range: str | None) -> None:
    v = validators()
    assert evaluate(method, headers, v) in (None, NOT_MODIFIED, PRECONDITION_FAILED)
    assert if_range_allows(if_range, v) in (True, False)


def test_evaluate_matches_the_current_tag() -> None:
    v = validators()
    assert evaluate("GET", {"if-none-match": f'W/"x", {v.etag}'}, v) == NOT_MODIFIED
    assert evaluate("GET", {"if-match": f"W/{v.etag}"}, v) == PRECONDITION_FAILED
    assert evaluate("GET", {"if-match": v.etag}, v) is None


# -- durations (exporter/access/durations.py) ---------------------------------------------

@PARSERS
@given(st.one_of(
    st.builds(lambda n, u: f"{n}{u}", st.one_of(st.integers(-5, 10**12).map(str), huge_numbers()),
              st.sampled_from(["s", "m", "h", "d", "w", "", "y", "M"])),
    hostile_text(),
))
@example("999999999w")  # 9 digits of weeks: beyond what a timedelta holds
@example("999999999d")
@example("\u0661m")  # an Arabic-Indic 1 is \d to `re`
@example(HUGE + "s")
def test_parse_duration_is_positive_or_a_value_error(text: str) -> None:
    try:
        duration = parse_duration(text)
    except ValueError as error:
        # The message names the problem: "bad duration ..." or "duration ... is too long".
        assert "duration" in str(error)
        return
    assert isinstance(duration, timedelta)
    assert duration > timedelta(0)


# -- Content-Disposition and Accept (exporter/http.py) ------------------------------------

HEADER_SAFE = set(string.printable) - set("\r\n\x0b\x0c")


@PARSERS
@given(st.text(max_size=80), st.sampled_from(["attachment", "inline"]))
@example("a\r\nSet-Cookie: x=1", "attachment")
@example('"; filename*=x', "attachment")
@example("r\u00e9sum\u00e9 \u65e5\u672c.csv", "attachment")
@example("..", "attachment")
@example("\x00", "attachment")
def test_content_disposition_is_header_safe_and_round_trips(filename: str, kind: str) -> None:
    header = content_disposition(filename, kind)
    assert header.isascii()
    assert set(header) <= HEADER_SAFE, header
    assert header.startswith(f'{kind}; filename="')
    expected = filename.replace("/", "_").replace("\x00", "")
    if "filename*=" in header:
        encoded = header.split("filename*=UTF-8''", 1)[1]
        assert ";" not in encoded and '"' not in encoded and " " not in encoded
        assert unquote(encoded, errors="strict") == expected
    else:
        assert header == f'{kind}; filename="{expected}"'


@PARSERS
@given(st.text(max_size=80))
@example("caf\u00e9\x85\u2028.csv")
@example('a"b\\c\r\n.csv')
def test_content_disposition_for_curl_has_no_control_characters(filename: str) -> None:
    header = content_disposition(filename, user_agent="curl/8.5.0")
    # Header values travel as latin-1: every character must be one byte, none a control.
    header.encode("latin-1")
    assert not any(ord(c) < 0x20 or ord(c) == 0x7F for c in header), header


def test_content_disposition_of_a_non_utf8_file_name() -> None:
    """A name read from the disk that is not UTF-8 arrives with surrogate escapes."""
    name = os.fsdecode(b"caf\xe9.txt")
    header = content_disposition(name)
    assert header.isascii()
    assert set(header) <= HEADER_SAFE


@PARSERS
@given(st.one_of(st.none(), hostile_text(), st.lists(
    st.builds(lambda t, q: f"{t};q={q}", st.sampled_from(["text/csv", "*/*", "application/x-ndjson",
                                                          "", "text/*"]),
              st.one_of(st.floats(allow_nan=True).map(str), huge_numbers(), hostile_text())),
    max_size=5).map(", ".join)))
@example("text/csv;q=nan, */*;q=inf")
@example("text/csv;q=" + HUGE)
def test_parse_accept_lists_media_types(header: str | None) -> None:
    types = parse_accept(header)
    assert all(isinstance(t, str) and t == t.lower() and t for t in types)


# -- paths (exporter/files/paths.py) ------------------------------------------------------

def request_paths() -> st.SearchStrategy[str]:
    segment = st.one_of(st.sampled_from(["", ".", "..", ".git", "a", "nested", "%2e%2e", "…"]),
                        hostile_text())
    return st.one_of(st.lists(segment, max_size=6).map("/".join), hostile_text())


@PARSERS
@given(request_paths())
@example("a/" * 3000)
@example("x" * 300)
@example("nested/../../secret.txt")
@example("\udcff")  # a lone surrogate, as from a non-UTF-8 name
def test_segments_are_plain_names_or_a_4xx(path: str) -> None:
    root = FilesRoot(Path("/nonexistent-root"))
    try:
        names, wants_folder = root.segments(path)
    except ApiError as error:
        assert_client_error(error)
        return
    assert isinstance(wants_folder, bool)
    for name in names:
        assert name not in ("", ".", "..") and "/" not in name and "\\" not in name
        assert not name.startswith(".")
        assert not any(ord(c) < 0x20 or c == "\x7f" for c in name)


# -- signed links' own parameters, as they come in a raw query string (issue 21) ------------

def link_pairs() -> st.SearchStrategy[list[tuple[str, str]]]:
    names = st.one_of(*(spellings(name) for name in LINK_PARAMETERS), odd_encoded(4))
    return st.lists(st.tuples(names, odd_encoded()), max_size=5)


SIGNED = [("~expires", "1999999999"), ("~signature", "A" * 43)]


@PARSERS
@given(link_pairs())
@example([("~by", "%00"), *SIGNED])  # issue 21: reached PostgreSQL, a 502
@example([("~by", "a%00b"), *SIGNED])
@example([("~by", "%1b[31mRED%1b[0m"), *SIGNED])
@example([("~by", "%FF"), *SIGNED])
@example([("~by", "%C0%AE"), *SIGNED])
@example([("~by", "%ED%A0%80"), *SIGNED])
@example([("~by", "%C2%9B"), *SIGNED])
@example([("~by", "x" * 65), *SIGNED])
@example([("%7Eby", "%0a"), ("~sig%6Eature", "A" * 43), ("%7eexpires", "1999999999")])
def test_link_parameters_in_any_encoding_read_or_are_refused(
    pairs: list[tuple[str, str]]
) -> None:
    _, link = split_query("&".join(f"{k}={v}" for k, v in pairs))
    try:
        params = read_link(link)
    except ValueError as error:
        assert str(error).startswith(("invalid signed link", "a signed link needs"))
        return
    assert set(link) == set(LINK_PARAMETERS) and all(len(v) == 1 for v in link.values())
    # Only the name of a token (or the operator's) goes on to the database.
    assert params.by == OPERATOR or is_token_name(params.by)


# -- the plain log (exporter/server/logs.py) ---------------------------------------------------

ANY_TEXT = st.one_of(hostile_text(200), st.text(st.characters(codec=None), max_size=200),
                     odd_encoded().map(lambda v: unquote(v, errors="surrogateescape")))


@PARSERS
@given(ANY_TEXT)
@example("/files/x\x1b[31mRED\x1b[0m")  # issue 21: printed as it came
@example("a\nb\rc\x85d\u2028e\u2029f\x00\x7f\u202e\udc80")
def test_a_plain_log_line_of_any_text_is_one_printable_line(text: str) -> None:
    assert escape(text).isprintable()
    if text.isprintable():
        assert escape(text) == text
    record = logging.LogRecord("exporter.app", logging.WARNING, __file__, 1,
                               "GET %s: %s", (text, text), None)
    line = PlainFormatter(PLAIN).format(record)
    assert line.isprintable() and escape(text) in line


def test_the_parsers_are_quick_on_large_inputs() -> None:
    """Inputs of hostile size are handled in linear-ish time (generous bound)."""
    started = time.monotonic()
    parse_etags(" ," * 50_000 + '"x"')
    parse_accept("a/b;q=1," * 20_000)
    with pytest.raises(ApiError):
        parse(ORDERS, [("id", "in.(" + '"' + "\\" * 200_000 + ")")])
    assert time.monotonic() - started < 10
