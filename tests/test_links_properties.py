"""Property tests (Hypothesis) of the pure parts of access: durations, link signing and
parsing, quoted column names. No server: these are functions of their arguments."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from urllib.parse import quote, unquote, urlencode, urlsplit

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exporter.access.durations import LONGEST_DURATION, parse_duration
from exporter.access.links import (
    LINK_PARAMETERS,
    OPERATOR,
    REDACTED,
    SIGNATURE,
    canonical_path,
    read_link,
    redact_query,
    sign,
    signature,
    split_query,
    token_identity,
)
from exporter.access.tokens import is_token_name
from exporter.errors import ApiError
from exporter.exports.query import _unquote
from tests.fuzzing import NASTY, odd_encoded, spellings

# Each example is quick; a loaded machine must not turn the deadline into a failure. No
# example database: tests write nothing into the checkout (Hypothesis's is ./.hypothesis).
relaxed = settings(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
# Text as it arrives decoded from a URL: any character but lone surrogates.
TEXT = st.text(st.characters(blacklist_categories=["Cs"]), max_size=30)
NAMES = TEXT.filter(lambda k: k not in LINK_PARAMETERS)
PAIRS = st.lists(st.tuples(NAMES.filter(bool), TEXT), max_size=6)
PATHS = st.lists(TEXT.filter(lambda s: s not in ("", ".", "..")), min_size=1, max_size=4).map(
    lambda parts: "/datasets/" + "/".join(parts))
KEYS = st.binary(min_size=1, max_size=64)
MAKERS = st.one_of(st.just(OPERATOR), st.integers(1, 2**63 - 1).map(token_identity))
BY = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", fullmatch=True)
WHEN = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2999, 1, 1),
                    timezones=st.just(UTC))


@relaxed
@given(st.integers(1, 999_999_999), st.sampled_from(sorted(UNITS)),
       st.sampled_from(["", " ", "\t"]))
def test_durations_are_their_number_of_units_or_too_long(n: int, unit: str, pad: str) -> None:
    seconds = n * UNITS[unit]
    if seconds <= LONGEST_DURATION.total_seconds():
        assert parse_duration(f"{pad}{n}{unit}{pad}") == timedelta(seconds=seconds)
    else:
        with pytest.raises(ValueError, match="too long"):
            parse_duration(f"{n}{unit}")


@relaxed
@given(st.text(max_size=40))
def test_any_text_is_a_bounded_duration_or_a_value_error(text: str) -> None:
    try:
        lifetime = parse_duration(text)
    except ValueError:
        return
    assert timedelta(0) < lifetime <= LONGEST_DURATION
    # So that now +/- the duration never overflows.
    assert datetime.now(UTC) + lifetime > datetime.now(UTC) - lifetime
    assert text.strip()[:-1].isascii() and text.strip()[:-1].isdigit()


@relaxed
@given(KEYS, PATHS, PAIRS, WHEN, BY, MAKERS)
def test_a_signed_link_verifies_as_made(key: bytes, path: str, pairs: list[tuple[str, str]],
                                        when: datetime, by: str, maker: str) -> None:
    query = urlencode(pairs, quote_via=quote, safe="")
    url = urlsplit(sign(key, path, query, when, by, maker))
    rest, link = split_query(url.query)
    assert rest == split_query(query)[0]
    params = read_link(link)
    assert (params.expires, params.by) == (int(when.timestamp()), by)
    assert canonical_path(url.path) == url.path
    for method in ("GET", "HEAD"):
        assert signature(key, method, url.path, rest, params.expires, by, maker) == \
            params.signature
    # Another maker (a token of the same name, another row), method, path, query or expiry
    # does not verify.
    others = [
        signature(key, "GET", url.path, rest, params.expires, by, maker + "0"),
        signature(key, "POST", url.path, rest, params.expires, by, maker),
        signature(key, "GET", url.path + "x", rest, params.expires, by, maker),
        signature(key, "GET", url.path, [*rest, ("x", "")], params.expires, by, maker),
        signature(key, "GET", url.path, rest, params.expires + 1, by, maker),
        signature(key + b"x", "GET", url.path, rest, params.expires, by, maker),
    ]
    assert params.signature not in others


@relaxed
@given(KEYS, PATHS, PAIRS, st.sampled_from(LINK_PARAMETERS), TEXT, WHEN)
def test_a_signed_url_is_not_signed_again(key: bytes, path: str, pairs: list[tuple[str, str]],
                                          name: str, value: str, when: datetime) -> None:
    query = urlencode([*pairs, (name, value)], quote_via=quote, safe="")
    with pytest.raises(ValueError):
        sign(key, path, query, when, "maker", OPERATOR)


@relaxed
@given(st.text(max_size=200))
def test_any_query_splits(query: str) -> None:
    rest, link = split_query(query)
    assert set(link) <= set(LINK_PARAMETERS)
    assert not any(k in LINK_PARAMETERS for k, _ in rest)


@relaxed
@given(st.dictionaries(st.sampled_from(LINK_PARAMETERS), st.lists(st.text(max_size=60),
                                                                    max_size=3)))
def test_any_link_parameters_read_or_give_a_value_error(link: dict[str, list[str]]) -> None:
    try:
        params = read_link(link)
    except ValueError:
        return
    # Accepted only when well formed: one of each, a Unix time datetime can hold.
    assert all(len(v) == 1 for v in link.values()) and len(link) == 3
    assert 0 <= params.expires < 10**11
    assert len(params.signature) == 43 and params.by and len(params.by) <= 100


# A maker's name as a link may carry it: anything, decoded from odd encodings too.
MAKER_NAMES = st.one_of(BY, TEXT, st.lists(st.sampled_from(NASTY), max_size=8).map("".join),
                        odd_encoded().map(unquote), st.just(OPERATOR))


@relaxed
@given(MAKER_NAMES)
def test_only_a_token_name_or_the_operator_signs_a_link(by: str) -> None:
    try:
        params = read_link({"~expires": ["1700000000"], "~by": [by], "~signature": ["A" * 43]})
    except ValueError as error:
        assert str(error).startswith("invalid signed link")
        return
    # What reaches the query by name: no control, no NUL, no U+FFFD, at most 64 characters.
    assert params.by == OPERATOR or is_token_name(params.by)
    assert params.by.isascii() and params.by.isprintable() and len(params.by) <= 64


@relaxed
@given(PAIRS, spellings(SIGNATURE), odd_encoded(), st.integers(0, 6))
def test_the_signature_is_redacted_under_any_spelling(
    pairs: list[tuple[str, str]], spelled: str, value: str, at: int
) -> None:
    pieces = [f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in pairs]
    pieces.insert(at, f"{spelled}={value}")
    query = "&".join(pieces)
    redacted = redact_query(query)
    rest, link = split_query(redacted)
    assert link[SIGNATURE] == [REDACTED]
    assert rest == split_query(query)[0]  # nothing else changes


@relaxed
@given(st.text(max_size=200))
def test_any_query_keeps_no_signature_once_redacted(query: str) -> None:
    rest, link = split_query(redact_query(query))
    assert set(link.get(SIGNATURE, [])) <= {REDACTED, ""}
    assert rest == split_query(query)[0]


@relaxed
@given(TEXT.filter(bool))
def test_any_column_name_quotes_and_unquotes(name: str) -> None:
    assert _unquote('"' + name.replace('"', '""') + '"') == name


@relaxed
@given(TEXT)
def test_a_malformed_quoted_name_is_a_400(text: str) -> None:
    parameter = '"' + text
    try:
        name = _unquote(parameter)
    except ApiError as error:
        assert error.status == 400
        return
    assert parameter == '"' + name.replace('"', '""') + '"'
