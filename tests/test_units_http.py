"""Unit tests of exporter/http.py: the exact Content-Disposition of a name and the order
Accept puts media types in. (tests/test_header_parsers.py and test_fuzz_parsers.py check
their properties on random input; these pin the answers.)"""

from __future__ import annotations

import pytest

from exporter.http import content_disposition, parse_accept


@pytest.mark.parametrize(("filename", "expected"), [
    ("orders-20260101T000000Z.csv", 'attachment; filename="orders-20260101T000000Z.csv"'),
    ("a b (1).txt", 'attachment; filename="a b (1).txt"'),
    # A slash is no part of a saved name; a NUL byte is dropped.
    ("dir/x.txt", 'attachment; filename="dir_x.txt"'),
    ("nul\x00.txt", 'attachment; filename="nul.txt"'),
    # Accents are dropped from the fallback; the name itself travels in filename*.
    ("ventes_été.csv",
     "attachment; filename=\"ventes_ete.csv\"; filename*=UTF-8''ventes_%C3%A9t%C3%A9.csv"),
    # What would end or escape a quoted string, or mean a parameter, is replaced.
    ('a"b;c%d\\e.txt',
     "attachment; filename=\"a_b_c_d_e.txt\"; filename*=UTF-8''a%22b%3Bc%25d%5Ce.txt"),
    ("tab\there.txt", "attachment; filename=\"tab_here.txt\"; filename*=UTF-8''tab%09here.txt"),
    # Nothing left of the name in ASCII: a name of last resort.
    ("日本", "attachment; filename=\"download\"; filename*=UTF-8''%E6%97%A5%E6%9C%AC"),
    ("日本.txt", "attachment; filename=\".txt\"; filename*=UTF-8''%E6%97%A5%E6%9C%AC.txt"),
    # A name that was not UTF-8 on disk (lone surrogates) gets U+FFFD.
    ("\udcff.bin", "attachment; filename=\".bin\"; filename*=UTF-8''%EF%BF%BD.bin"),
    # RFC 8187's attr-chars stay as they are.
    ("x!#$&+-.^_`|~é",
     "attachment; filename=\"x!#$&+-.^_`|~e\"; filename*=UTF-8''x!#$&+-.^_`|~%C3%A9"),
])
def test_content_disposition(filename: str, expected: str) -> None:
    assert content_disposition(filename) == expected


def test_content_disposition_inline() -> None:
    assert content_disposition("a.pdf", "inline") == 'inline; filename="a.pdf"'
    assert content_disposition("é.pdf", "inline") == \
        "inline; filename=\"e.pdf\"; filename*=UTF-8''%C3%A9.pdf"


@pytest.mark.parametrize(("filename", "expected"), [
    # curl -OJ reads only filename=: it gets the UTF-8 bytes (spelled as latin-1 for ASGI).
    ("ventes_été.csv", "attachment; filename=\"ventes_\u00c3\u00a9t\u00c3\u00a9.csv\";"
     " filename*=UTF-8''ventes_%C3%A9t%C3%A9.csv"),
    # ... with quotes and backslashes escaped and control characters replaced.
    ('é"\\\x01.txt', "attachment; filename=\"\u00c3\u00a9\\\"\\\\_.txt\";"
     " filename*=UTF-8''%C3%A9%22%5C%01.txt"),
    # A plain ASCII name is the same for everyone.
    ("plain.csv", 'attachment; filename="plain.csv"'),
])
def test_content_disposition_for_curl(filename: str, expected: str) -> None:
    assert content_disposition(filename, user_agent="curl/8.5.0") == expected
    # Other clients get the ASCII fallback.
    assert content_disposition(filename, user_agent="Wget/1.21") == content_disposition(filename)


@pytest.mark.parametrize(("header", "expected"), [
    (None, ["*/*"]),
    ("", ["*/*"]),
    ("  ", ["*/*"]),
    ("text/csv", ["text/csv"]),
    ("Text/CSV", ["text/csv"]),
    ("text/csv;charset=utf-8", ["text/csv"]),
    ("application/x-ndjson;q=0.9, text/csv;q=0.5", ["application/x-ndjson", "text/csv"]),
    ("text/csv;q=0.5, application/x-ndjson", ["application/x-ndjson", "text/csv"]),
    # Equal weights keep the header's order.
    ("text/html, image/png, text/csv", ["text/html", "image/png", "text/csv"]),
    ("text/csv; Q=0.2, */*;q=0.1", ["text/csv", "*/*"]),
    ("text/csv ; q = 0.3 , application/x-ndjson;q=0.4", ["application/x-ndjson", "text/csv"]),
    # q=0 means "not this"; a q that is no number counts as 0.
    ("text/csv;q=0, application/x-ndjson", ["application/x-ndjson"]),
    ("text/csv;q=0", []),
    ("text/csv;q=abc", []),
    (",, text/csv ,", ["text/csv"]),
    (";q=1", []),
])
def test_parse_accept(header: str | None, expected: list[str]) -> None:
    assert parse_accept(header) == expected
