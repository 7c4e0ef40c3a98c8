"""Unit tests of exporter/access: scopes and what they reach, signed links (splitting,
reading, signing), durations, and reading credentials from an Authorization header.
No server, no database. (tests/test_links_properties.py checks properties of links and
durations on random input; these pin the exact answers.)"""

from __future__ import annotations

import base64
import hashlib
import hmac
from datetime import UTC, datetime, timedelta

import pytest

from exporter.access.authenticate import _credential
from exporter.access.durations import parse_duration
from exporter.access.links import (
    OPERATOR,
    LinkParams,
    canonical_path,
    canonical_query,
    read_link,
    sign,
    signature,
    split_query,
    token_identity,
)
from exporter.access.principal import (
    ANONYMOUS,
    CHALLENGES,
    LINK,
    TOKEN,
    Principal,
    anonymous,
    check_scope,
    token_limit_key,
)
from exporter.errors import ApiError

# --- scopes ------------------------------------------------------------------------------


@pytest.mark.parametrize("scope", [
    "admin", "datasets:*", "datasets:orders", "datasets:ventes_été", "datasets:a.b-c",
    "files:*", "files:nested/", "files:a/b/", "files:*/", "files:ü/",
])
def test_good_scopes(scope: str) -> None:
    assert check_scope(scope) == scope


@pytest.mark.parametrize("scope", [
    "", "Admin", "admin ", "datasets", "datasets:", "datasets:a/b", "datasets:a b",
    "files:", "files:nested", "files:/", "files:a b/", "tokens:*", "*",
])
def test_bad_scopes(scope: str) -> None:
    with pytest.raises(ValueError, match="bad scope"):
        check_scope(scope)


def token(*scopes: str) -> Principal:
    return Principal(TOKEN, "t", frozenset(scopes), token_id=1)


DATASET_MATRIX: dict[tuple[str, ...], set[str]] = {
    # scopes: datasets it may read, among orders, daily_revenue, orders_2 and "*"
    ("admin",): {"orders", "daily_revenue", "orders_2", "*"},
    ("datasets:*",): {"orders", "daily_revenue", "orders_2", "*"},
    ("datasets:orders",): {"orders"},
    ("datasets:orders", "datasets:daily_revenue"): {"orders", "daily_revenue"},
    ("files:*",): set(),
    (): set(),
}


@pytest.mark.parametrize("scopes", list(DATASET_MATRIX))
def test_may_read_dataset(scopes: tuple[str, ...]) -> None:
    principal = token(*scopes)
    readable = {n for n in ("orders", "daily_revenue", "orders_2", "*")
                if principal.may_read_dataset(n)}
    assert readable == DATASET_MATRIX[scopes]


FILES = ["README.txt", "nested/data.json", "nested/deeper/x.bin", "nestedness.txt",
         "other/nested/x", "a b/c.txt"]
FILE_MATRIX: dict[tuple[str, ...], set[str]] = {
    ("admin",): set(FILES),
    ("files:*",): set(FILES),
    # A folder scope reaches what is under that folder, and nothing that only starts alike.
    ("files:nested/",): {"nested/data.json", "nested/deeper/x.bin"},
    ("files:nested/deeper/",): {"nested/deeper/x.bin"},
    ("files:nested/deeper/", "files:other/"): {"nested/deeper/x.bin", "other/nested/x"},
    ("datasets:*",): set(),
}


@pytest.mark.parametrize("scopes", list(FILE_MATRIX))
def test_may_read_file(scopes: tuple[str, ...]) -> None:
    principal = token(*scopes)
    assert {f for f in FILES if principal.may_read_file(f)} == FILE_MATRIX[scopes]


FOLDERS = ["", "/", "nested", "nested/", "/nested/", "nested/deeper", "nested/deeper/x",
           "other", "nestedness"]
FOLDER_MATRIX: dict[tuple[str, ...], set[str]] = {
    ("admin",): set(FOLDERS),
    ("files:*",): set(FOLDERS),
    # The folders above what it may read may be listed (to get there), and those under it.
    ("files:nested/",): {"", "/", "nested", "nested/", "/nested/", "nested/deeper",
                         "nested/deeper/x"},
    ("files:nested/deeper/",): {"", "/", "nested", "nested/", "/nested/", "nested/deeper",
                                "nested/deeper/x"},
    ("datasets:*",): set(),
}


@pytest.mark.parametrize("scopes", list(FOLDER_MATRIX))
def test_may_list_folder(scopes: tuple[str, ...]) -> None:
    principal = token(*scopes)
    assert {f for f in FOLDERS if principal.may_list_folder(f)} == FOLDER_MATRIX[scopes]


def test_a_deeper_scope_does_not_list_a_sibling() -> None:
    principal = token("files:nested/deeper/")
    assert not principal.may_list_folder("nested/other")
    assert not principal.may_read_file("nested/data.json")


@pytest.mark.parametrize(("principal", "label", "admin"), [
    (Principal(TOKEN, "ci", frozenset({"admin"})), "token ci", True),
    (Principal(LINK, "ci", frozenset({"datasets:*"})), "link by ci", False),
    (Principal(ANONYMOUS, "127.0.0.1", frozenset()), "anonymous", False),
])
def test_labels_and_admin(principal: Principal, label: str, admin: bool) -> None:
    assert (principal.label, principal.is_admin) == (label, admin)


def test_denied_is_401_with_challenges_for_the_anonymous_and_403_for_others() -> None:
    error = anonymous("10.0.0.1", [], []).denied()
    assert (error.status, error.headers) == (401, CHALLENGES)
    assert error.message.startswith("authentication required")
    error = token("datasets:orders").denied()
    assert (error.status, error.headers, error.message) == (
        403, [], "token t may not download this")
    assert Principal(LINK, "ci", frozenset()).denied().message == "link by ci may not download this"


@pytest.mark.parametrize(("datasets", "files", "scopes"), [
    ([], [], set()),
    (["orders"], [], {"datasets:orders"}),
    (["*"], ["*"], {"datasets:*", "files:*"}),
    ([], ["nested", "/docs/", "a/b/"], {"files:nested/", "files:docs/", "files:a/b/"}),
])
def test_anonymous_scopes_come_from_the_settings(
    datasets: list[str], files: list[str], scopes: set[str]
) -> None:
    principal = anonymous("10.0.0.1", datasets, files)
    assert principal.scopes == scopes
    assert (principal.kind, principal.name, principal.limit_key) == (
        ANONYMOUS, "10.0.0.1", "anonymous 10.0.0.1")


def test_public_nested_files_reach_only_that_folder() -> None:
    principal = anonymous("x", [], ["nested"])
    assert principal.may_read_file("nested/data.json")
    assert not principal.may_read_file("nestedness.txt")


def test_limit_keys_and_identities_are_by_row() -> None:
    assert token_limit_key(7, "ci") == "token ci #7"
    assert token_limit_key(8, "ci") != token_limit_key(7, "ci")
    assert token_identity(7) == "token 7"


# --- Authorization header ----------------------------------------------------------------


def basic(text: str) -> str:
    return "Basic " + base64.b64encode(text.encode()).decode()


@pytest.mark.parametrize(("header", "credential"), [
    ("Bearer exp_abc", "exp_abc"),
    ("bearer   exp_abc  ", "exp_abc"),
    ("BEARER exp_abc", "exp_abc"),
    (basic("user:exp_abc"), "exp_abc"),
    (basic(":exp_abc"), "exp_abc"),
    (basic("user:pass:with:colons"), "pass:with:colons"),
    (basic("é:exp_é"), "exp_é"),
])
def test_credentials(header: str, credential: str) -> None:
    assert _credential(header) == credential


@pytest.mark.parametrize(("header", "message"), [
    ("Bearer", "use Authorization: Bearer TOKEN, or Basic with the token as password"),
    ("Bearer    ", "use Authorization: Bearer TOKEN, or Basic with the token as password"),
    ("Digest username=x", "use Authorization: Bearer TOKEN, or Basic with the token as password"),
    ("exp_abc", "use Authorization: Bearer TOKEN, or Basic with the token as password"),
    (basic("user"), "use Authorization: Bearer TOKEN, or Basic with the token as password"),
    (basic("user:"), "use Authorization: Bearer TOKEN, or Basic with the token as password"),
    ("Basic !!!notbase64", "malformed Basic credentials"),
    ("Basic " + base64.b64encode(b"u:\xff").decode(), "malformed Basic credentials"),
])
def test_bad_credentials(header: str, message: str) -> None:
    with pytest.raises(ApiError) as caught:
        _credential(header)
    assert (caught.value.status, caught.value.message, caught.value.headers) == (
        401, message, CHALLENGES)


# --- durations ---------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "seconds"), [
    ("90s", 90), ("15m", 900), ("12h", 43_200), ("30d", 2_592_000), ("2w", 1_209_600),
    (" 15m\t", 900), ("007s", 7), ("36500d", 36500 * 86400), ("5214w", 5214 * 604800),
])
def test_durations(text: str, seconds: int) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


BAD = "a whole number and s, m, h, d or w, e.g. 15m"


@pytest.mark.parametrize(("text", "message"), [
    ("", f"bad duration '': {BAD}"),
    ("15", f"bad duration '15': {BAD}"),
    ("0m", f"bad duration '0m': {BAD}"),
    ("15M", f"bad duration '15M': {BAD}"),
    ("15 m", f"bad duration '15 m': {BAD}"),
    ("1.5h", f"bad duration '1.5h': {BAD}"),
    ("-1h", f"bad duration '-1h': {BAD}"),
    ("\u00b2m", f"bad duration '\u00b2m': {BAD}"),
    ("\u0661\u0665m", f"bad duration '\u0661\u0665m': {BAD}"),  # Arabic-Indic digits
    ("1234567890s", f"bad duration '1234567890s': {BAD}"),  # ten digits
    ("x" * 50, f"bad duration '{'x' * 40}...': {BAD}"),
    ("36501d", "duration '36501d' is too long: at most 36500d"),
    ("5215w", "duration '5215w' is too long: at most 36500d"),
])
def test_bad_durations(text: str, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_duration(text)
    assert str(caught.value) == message


# --- signed links ------------------------------------------------------------------------


@pytest.mark.parametrize(("query", "rest", "link"), [
    ("", [], {}),
    ("a=1&b=&c", [("a", "1"), ("b", ""), ("c", "")], {}),
    ("id=gt.5&~expires=9&~by=ci&~signature=s",
     [("id", "gt.5")], {"~expires": ["9"], "~by": ["ci"], "~signature": ["s"]}),
    # Percent-encoded, a link's parameter is still one; repeated, every value is kept.
    ("%7Eby=a&~by=b&x=%7E", [("x", "~")], {"~by": ["a", "b"]}),
    # A quoted column named like one is an ordinary parameter.
    ("%22~by%22=eq.1&a+b=c+d", [('"~by"', "eq.1"), ("a b", "c d")], {}),
])
def test_split_query(query: str, rest: list[tuple[str, str]],
                     link: dict[str, list[str]]) -> None:
    assert split_query(query) == (rest, link)


SIG = "A" * 43


def link(expires: str = "1700000000", by: str = "ci", sig: str = SIG) -> dict[str, list[str]]:
    return {"~expires": [expires], "~by": [by], "~signature": [sig]}


def test_read_link() -> None:
    assert read_link(link()) == LinkParams(1_700_000_000, "ci", SIG)
    assert read_link(link("0", "x" * 64, "-_" * 21 + "z")) == LinkParams(0, "x" * 64,
                                                                         "-_" * 21 + "z")
    assert read_link(link(by=OPERATOR)).by == OPERATOR


@pytest.mark.parametrize("params", [
    {},
    {"~expires": ["1"], "~by": ["ci"]},
    {**link(), "~by": ["a", "b"]},
    {**link(), "~signature": []},
])
def test_a_link_needs_one_of_each(params: dict[str, list[str]]) -> None:
    with pytest.raises(ValueError, match="exactly one ~expires, ~by and ~signature"):
        read_link(params)


@pytest.mark.parametrize("params", [
    link(expires=""), link(expires="-1"), link(expires="1e9"), link(expires="\u00b2"),
    link(expires="1" * 12), link(expires=" 1"),
    link(sig="A" * 42), link(sig="A" * 44), link(sig="A" * 42 + "="), link(sig="A" * 42 + "+"),
    link(by=""), link(by="x" * 101), link(by="a\nb"),
    # Only a token's name (or the operator's) reaches the database: no control, no NUL, no
    # byte that was not UTF-8 (U+FFFD), nothing longer than a token's name.
    link(by="x" * 65), link(by="\x00"), link(by="a\x1b[31m"), link(by="\ufffd"),
    link(by="\x9b"), link(by="a b"), link(by="-a"), link(by="\u00e9"), link(by="@operators"),
])
def test_a_malformed_link_is_a_value_error(params: dict[str, list[str]]) -> None:
    with pytest.raises(ValueError, match="invalid signed link"):
        read_link(params)


KEY = b"k" * 32


def test_signature_is_hmac_sha256_of_the_request_and_its_maker() -> None:
    """The signed message's layout, pinned: changing it breaks every link handed out."""
    message = b"GET\n/datasets/orders.csv\nid=gt.5\n1700000000\nci\ntoken 7"
    expected = base64.urlsafe_b64encode(
        hmac.new(KEY, message, hashlib.sha256).digest()).rstrip(b"=").decode()
    assert signature(KEY, "GET", "/datasets/orders.csv", [("id", "gt.5")], 1_700_000_000, "ci",
                     token_identity(7)) == expected
    assert len(expected) == 43


def sig(method: str = "GET", path: str = "/datasets/orders.csv",
        rest: tuple[tuple[str, str], ...] = (("id", "gt.5"),), expires: int = 1,
        by: str = "ci", maker: str = "token 7", key: bytes = KEY) -> str:
    return signature(key, method, path, list(rest), expires, by, maker)


def test_what_the_signature_covers() -> None:
    same = [
        sig("HEAD"),  # HEAD shows what GET sends: one link serves both
        sig(path="/datasets/%6Frders.csv"),  # re-encoding an unreserved character
        sig(rest=(("id", "gt.5"),)),
    ]
    assert set(same) == {sig()}
    changed = [
        sig("POST"), sig(path="/datasets/orders.ndjson"), sig(rest=()),
        sig(rest=(("id", "gt.6"),)), sig(rest=(("id", "gt.5"), ("limit", "1"))),
        sig(expires=2), sig(by="other"), sig(maker="token 8"), sig(maker=OPERATOR),
        sig(key=b"other"),
    ]
    assert sig() not in changed
    assert len(set(changed)) == len(changed)


@pytest.mark.parametrize(("path", "canonical"), [
    ("/datasets/orders.csv", "/datasets/orders.csv"),
    ("/files/a b.txt", "/files/a%20b.txt"),
    ("/files/a%20b.txt", "/files/a%20b.txt"),
    ("/files/%7Euser/é", "/files/~user/%C3%A9"),
    ("/datasets/a%2Fb.csv", "/datasets/a/b.csv"),
    ("/files/(x);y=z:@!$&'*+,", "/files/(x);y=z:@!$&'*+,"),
])
def test_canonical_path(path: str, canonical: str) -> None:
    assert canonical_path(path) == canonical


def test_canonical_query_encodes_every_reserved_character() -> None:
    assert canonical_query([("a b", "c&d=e"), ("~x", "é/?#+")]) == \
        "a%20b=c%26d%3De&~x=%C3%A9%2F%3F%23%2B"


def test_sign_appends_the_link_parameters() -> None:
    when = datetime(2026, 1, 1, 12, 0, 0, 999_000, tzinfo=UTC)
    url = sign(KEY, "/files/a b.txt", "x=1%2B1", when, "ci", token_identity(7))
    expires = int(datetime(2026, 1, 1, 12, tzinfo=UTC).timestamp())
    mac = signature(KEY, "GET", "/files/a b.txt", [("x", "1+1")], expires, "ci", "token 7")
    assert url == f"/files/a%20b.txt?x=1%2B1&~expires={expires}&~by=ci&~signature={mac}"


@pytest.mark.parametrize("query", ["~by=x", "a=1&%7Esignature=x", "~expires="])
def test_sign_refuses_a_signed_url(query: str) -> None:
    with pytest.raises(ValueError, match="already signed"):
        sign(KEY, "/datasets/orders.csv", query, datetime.now(UTC), "ci", OPERATOR)
