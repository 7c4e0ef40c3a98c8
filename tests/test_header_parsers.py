"""The pure header parsers: property tests (Hypothesis) and their cost on absurd input.

Each parser either returns its documented result or raises its documented exception
(only `ranges.Unsatisfiable`), whatever the header; and a header of megabytes costs
time in proportion to its length, not its square.
"""

from __future__ import annotations

import contextlib
import time
from datetime import UTC
from email.utils import format_datetime, formatdate
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exporter.files import conditions, ranges
from exporter.http import content_disposition, parse_accept

# The machine is shared: no per-example deadline, and a moderate number of examples.
# No example database: it would be written into the checkout (.hypothesis/).
PROPERTY = settings(max_examples=300, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])

# Header values reach the app as latin-1 text; the parsers must also survive any str.
latin1 = st.text(st.characters(max_codepoint=0xFF))
anything = st.one_of(latin1, st.text())
digits = st.one_of(st.integers(0, 10**20).map(str),
                   st.integers(1, 5000).map(lambda n: "9" * n),
                   st.integers(1, 30).map(lambda n: "0" * n + "7"))
ws = st.sampled_from(["", " ", "  ", "\t"])

VALIDATORS = conditions.Validators('"10-abc-1"', "Sun, 06 Nov 1994 08:49:37 GMT", 784111777)


def _spec() -> st.SearchStrategy[str]:
    return st.one_of(
        st.builds(lambda a, b: f"{a}-{b}", digits, digits),
        st.builds(lambda a: f"{a}-", digits),
        st.builds(lambda b: f"-{b}", digits),
        latin1,
    )


range_headers = st.one_of(
    latin1,
    st.builds(lambda unit, w, specs: f"{unit}={w}" + ",".join(f"{w}{s}" for s in specs),
              st.sampled_from(["bytes", "BYTES", " bytes ", "items"]), ws,
              st.lists(_spec(), min_size=0, max_size=20)),
)


@PROPERTY
@given(range_headers, st.integers(0, 2**40), st.integers(1, 32))
def test_parse_range_returns_ranges_inside_the_file_or_raises_unsatisfiable(
        header: str, size: int, max_ranges: int) -> None:
    try:
        wanted = ranges.parse_range(header, size, max_ranges)
    except ranges.Unsatisfiable:
        return
    if wanted is None:
        return
    assert 1 <= len(wanted) <= max_ranges
    previous_end = -2
    for r in wanted:
        assert 0 <= r.start <= r.end < size
        assert r.start > previous_end + 1  # sorted, merged, no byte twice
        previous_end = r.end


def test_parse_range_with_numbers_of_thousands_of_digits() -> None:
    huge = "9" * 5000
    with pytest.raises(ranges.Unsatisfiable):
        ranges.parse_range(f"bytes={huge}-", 100, 16)
    assert ranges.parse_range(f"bytes=10-{huge}", 100, 16) == [ranges.ByteRange(10, 99)]
    assert ranges.parse_range(f"bytes=-{huge}", 100, 16) == [ranges.ByteRange(0, 99)]
    assert ranges.parse_range(f"bytes=000000000000000000000000005-{huge}", 100, 16) == [
        ranges.ByteRange(5, 99)]
    # Still invalid (ignored), not unsatisfiable, when the end is below the start.
    assert ranges.parse_range(f"bytes={huge}9-{huge}", 100, 16) is None
    assert ranges.parse_range("bytes=00-0", 100, 16) == [ranges.ByteRange(0, 0)]
    # Digits of other scripts are not numbers in HTTP.
    assert ranges.parse_range("bytes=\u0663-", 100, 16) is None


etag = st.builds(lambda weak, body: f'{"W/" if weak else ""}"{body}"', st.booleans(),
                 st.text(st.sampled_from("abc-0123456789"), max_size=12))
etag_lists = st.one_of(
    anything,
    st.just("*"),
    st.builds(lambda tags, sep: sep.join(tags), st.lists(etag, max_size=20),
              st.sampled_from([",", ", ", " , "])),
)


@PROPERTY
@given(etag_lists)
def test_parse_etags_returns_a_list_or_none(value: str) -> None:
    tags = conditions.parse_etags(value)
    assert tags is None or all(isinstance(w, bool) and t.startswith('"') for w, t in tags)


@PROPERTY
@given(st.lists(etag, min_size=1, max_size=20), st.sampled_from([",", ", ", " ,\t"]))
def test_parse_etags_reads_every_tag_of_a_well_formed_list(tags: list[str], sep: str) -> None:
    parsed = conditions.parse_etags(sep.join(tags) + sep)
    assert parsed == [(t.startswith("W/"), t.removeprefix("W/")) for t in tags]


http_dates = st.one_of(
    anything,
    st.integers(-2**40, 2**40).map(lambda s: formatdate(s, usegmt=True)
                                   if -62135596800 <= s <= 253402300799 else str(s)),
    st.builds(lambda day, month, year, hour, tz: f"Sun, {day} {month} {year} {hour}:49:37 {tz}",
              digits, st.sampled_from(["Nov", "Foo", ""]), digits, digits,
              st.one_of(st.sampled_from(["GMT", "-0000", "+2359", "-2400"]),
                        digits.map(lambda d: "+" + d))),
)


@PROPERTY
@given(http_dates)
def test_parse_date_returns_seconds_or_none(value: str) -> None:
    result = conditions.parse_date(value)
    assert result is None or isinstance(result, int)


@PROPERTY
@given(st.datetimes(timezones=st.just(UTC)))
def test_parse_date_reads_back_an_imf_fixdate(moment: Any) -> None:
    moment = moment.replace(microsecond=0)
    if moment.year < 1900:  # two- and three-digit years are read as recent ones (RFC 5322)
        return
    assert conditions.parse_date(format_datetime(moment, usegmt=True)) == int(moment.timestamp())


def test_parse_date_ignores_dates_that_overflow() -> None:
    for value in ["Sun, 06 Nov 99999999999999999999 08:49:37 GMT",
                  "Sun, 99999999999999999999 Nov 1994 08:49:37 GMT",
                  "Sun, 06 Nov 1994 99999999999999999999:49:37 GMT",
                  "Sun, 06 Nov 1994 08:49:37 +99999999999999999999",
                  "Sun, 06 Nov 1994 08:49:37 GMT" + " " * 100]:
        assert conditions.parse_date(value) is None, value


@PROPERTY
@given(st.dictionaries(st.sampled_from(["if-match", "if-none-match", "if-modified-since",
                                        "if-unmodified-since"]),
                       st.one_of(etag_lists, http_dates)),
       st.sampled_from(["GET", "HEAD", "POST"]), st.one_of(st.none(), etag_lists, http_dates))
def test_conditions_answer_304_412_or_go_on(headers: dict[str, str], method: str,
                                            if_range: str | None) -> None:
    assert conditions.evaluate(method, headers, VALIDATORS) in (None, 304, 412)
    assert isinstance(conditions.if_range_allows(if_range, VALIDATORS), bool)


accept_headers = st.one_of(
    anything,
    st.lists(st.builds(lambda t, q: f"{t};q={q}", st.sampled_from(
        ["text/csv", "application/x-ndjson", "*/*", "text/*", ""]),
        st.one_of(st.floats(allow_nan=True), digits, latin1)), max_size=20).map(",".join),
)


@PROPERTY
@given(accept_headers)
def test_parse_accept_returns_media_types(header: str) -> None:
    types = parse_accept(header)
    assert all(isinstance(t, str) and t == t.lower() and t for t in types)


# uvicorn refuses a header value with these (and so would answer 500).
FORBIDDEN_IN_HEADER = set(range(0x00, 0x09)) | set(range(0x0A, 0x20)) | {0x7F}


@PROPERTY
@given(st.one_of(st.text(), st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF,
                                                  categories=["Cs"]))),
       st.sampled_from(["attachment", "inline"]),
       st.one_of(st.none(), st.just("curl/8.5.0"), st.just("Wget/1.21"), latin1))
def test_content_disposition_is_a_valid_header_value(name: str, disposition: str,
                                                     user_agent: str | None) -> None:
    value = content_disposition(name, disposition, user_agent=user_agent)
    raw = value.encode("latin-1")
    assert not FORBIDDEN_IN_HEADER & set(raw)
    assert value.startswith(f'{disposition}; filename="')


# --- cost on absurd input -------------------------------------------------------------

MEGABYTES = 1_600_000
# Generous: each of these takes tens of milliseconds here. Before, the If-None-Match
# list took 9 s or more.
BOUND = 3.0


def _timed(call: Any) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def test_a_1_6_mb_if_none_match_is_parsed_in_linear_time() -> None:
    value = '"abc",' * (MEGABYTES // 6)
    assert _timed(lambda: conditions.parse_etags(value)) < BOUND
    assert _timed(lambda: conditions.evaluate("GET", {"if-none-match": value}, VALIDATORS)) < BOUND
    # And one tag that is not closed, at the end of a long list: still one pass.
    assert _timed(lambda: conditions.parse_etags(value + '"abc')) < BOUND


@pytest.mark.parametrize("value", [
    "bytes=" + "0-1," * (MEGABYTES // 4),
    "bytes=" + "," * MEGABYTES + "0-1",
    "bytes=" + "9" * MEGABYTES + "-",
    "bytes=" + " " * MEGABYTES,
])
def test_a_1_6_mb_range_is_parsed_in_linear_time(value: str) -> None:
    def parse() -> None:
        with contextlib.suppress(ranges.Unsatisfiable):
            ranges.parse_range(value, 1000, 16)

    assert _timed(parse) < BOUND


@pytest.mark.parametrize("value", [
    "text/csv;q=0.5," * (MEGABYTES // 15),
    "text/csv;" + ";" * MEGABYTES,
    " " * MEGABYTES,
    "text/csv;q=" + "9" * MEGABYTES,
])
def test_a_1_6_mb_accept_is_parsed_in_linear_time(value: str) -> None:
    assert _timed(lambda: parse_accept(value)) < BOUND


@pytest.mark.parametrize("value", [
    "Sun, 06 Nov 1994 08:49:37 GMT " * (MEGABYTES // 30),
    "9" * MEGABYTES,
])
def test_a_1_6_mb_date_is_parsed_in_linear_time(value: str) -> None:
    assert _timed(lambda: conditions.parse_date(value)) < BOUND
    assert _timed(lambda: conditions.if_range_allows(value, VALIDATORS)) < BOUND


def test_a_content_disposition_of_a_long_name_is_built_in_linear_time() -> None:
    name = "é\"%;\x01" * (MEGABYTES // 5)
    assert _timed(lambda: content_disposition(name, user_agent="curl/8")) < BOUND
    assert _timed(lambda: content_disposition(name)) < BOUND
