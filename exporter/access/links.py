"""Signed links: a URL that works without credentials until it expires.

The signature is an HMAC-SHA256 over the method, the path, the rest of the query, the
expiry, the maker's name and the maker's identity (the token's row, never its name
alone), so changing any of them breaks it, and a token revoked or replaced by another
of the same name takes its links with it. Path and query are compared in a canonical
percent-encoding, so a client that re-encodes a character does not break a link, while
any change of meaning does.

The link's own parameters start with `~`, so that they shadow no dataset column: a
column literally named `~by` is still reached as the quoted parameter `"~by"`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncEngine

from exporter.access.durations import parse_duration
from exporter.access.tokens import is_token_name
from exporter.db import driver_connection
from exporter.tables import secrets as secrets_table

EXPIRES, BY, SIGNATURE = "~expires", "~by", "~signature"
LINK_PARAMETERS = (EXPIRES, BY, SIGNATURE)
# The maker of links made on the server with `exporter link` (not a token name).
OPERATOR = "@operator"
_KEY_NAME = "link_signing_key"
_READ_KEY = "SELECT value FROM exporter.secrets WHERE name = $1"
_PATH_SAFE = "/!$&'()*+,;=:@-._~"
# ASCII digits only ('²'.isdigit() is True, int('²') fails), and a Unix time that
# datetime can represent.
_EXPIRES = re.compile(r"[0-9]{1,11}")
_SIGNATURE = re.compile(r"[A-Za-z0-9_-]{43}")  # 32 bytes of HMAC, unpadded base64url
# One answer for every link that does not verify, whatever the reason (malformed, changed,
# or made by a token that is unknown, revoked or expired): a different answer for a name
# that exists would list the token names to anyone who asks.
INVALID = "invalid signed link: changed since it was made, or its token was revoked or expired"
REDACTED = "REDACTED"
# A link lives at most this long, whoever makes it (POST /links or `exporter link`): it
# can only be stopped with its maker's token, or for all at once by rotating the key.
MAX_LIFETIME = timedelta(days=30)
# What a link may point at: an export, a file or folder, a stored export's file.
LINKABLE = ("/datasets/", "/files/", "/exports/")


@dataclass(frozen=True)
class LinkParams:
    """A signed link's own parameters, well formed (not yet verified)."""

    expires: int
    by: str
    signature: str


def token_identity(token_id: int) -> str:
    """What a token's links are bound to: its row, which a new token of the same name
    never has."""
    return f"token {token_id}"


def link_lifetime(text: str) -> timedelta:
    """A link's lifetime from a duration such as 15m; ValueError beyond MAX_LIFETIME."""
    lifetime = parse_duration(text)
    if lifetime > MAX_LIFETIME:
        raise ValueError(f"a link lives at most {MAX_LIFETIME.days} days")
    return lifetime


def check_link_path(path: str) -> None:
    """ValueError unless `path` (without EXPORTER_ROOT_PATH) is one a link may point at."""
    if any(segment in (".", "..") for segment in unquote(path).split("/")):
        raise ValueError("a link's path may not hold . or .. segments")
    if not path.startswith(LINKABLE):
        raise ValueError(f"a link points under {', '.join(LINKABLE[:-1])} or {LINKABLE[-1]}")


def canonical_path(path: str) -> str:
    return quote(unquote(path), safe=_PATH_SAFE)


def canonical_query(pairs: Sequence[tuple[str, str]]) -> str:
    return urlencode(list(pairs), quote_via=quote, safe="")


def split_query(query: str) -> tuple[list[tuple[str, str]], dict[str, list[str]]]:
    """The ordinary parameters, and the link's own (~expires, ~by, ~signature)."""
    rest: list[tuple[str, str]] = []
    link: dict[str, list[str]] = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key in LINK_PARAMETERS:
            link.setdefault(key, []).append(value)
        else:
            rest.append((key, value))
    return rest, link


def read_link(link: dict[str, list[str]]) -> LinkParams:
    """The link's own parameters checked for shape; ValueError if they are malformed."""
    if any(len(link.get(k, [])) != 1 for k in LINK_PARAMETERS):
        raise ValueError(f"a signed link needs exactly one {EXPIRES}, {BY} and {SIGNATURE}")
    (expires,), (by,), (given,) = link[EXPIRES], link[BY], link[SIGNATURE]
    if not _EXPIRES.fullmatch(expires) or not _SIGNATURE.fullmatch(given):
        raise ValueError(INVALID)
    # A maker's name has the shape of a token's (checked when it is made), so a control
    # byte, a NUL or a byte that is not UTF-8 (decoded as U+FFFD) never reaches a query.
    if by != OPERATOR and not is_token_name(by):
        raise ValueError(INVALID)
    return LinkParams(int(expires), by, given)


def redact_query(query: str) -> str:
    """`query` with the value of every parameter that authenticates a link replaced by
    REDACTED: judged by the name as split_query decodes it (`~sig%6Eature` is
    `~signature`), so that no spelling of it reaches a log."""
    pieces = query.split("&")
    for i, piece in enumerate(pieces):
        name, equals, _ = piece.partition("=")
        if equals and unquote(name.replace("+", " ")) == SIGNATURE:
            pieces[i] = f"{name}={REDACTED}"
    return "&".join(pieces)


def signature(key: bytes, method: str, path: str, rest: Sequence[tuple[str, str]],
              expires: int, by: str, maker: str) -> str:
    """`maker` is the maker's identity: `token_identity(id)`, or OPERATOR."""
    # HEAD shows what GET would send, so one link serves both.
    method = "GET" if method in ("GET", "HEAD") else method
    message = "\n".join([method, canonical_path(path), canonical_query(rest), str(expires), by,
                         maker])
    mac = hmac.new(key, message.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


def sign(key: bytes, path: str, query: str, expires_at: datetime, by: str, maker: str) -> str:
    """`path?query&~expires=...&~by=...&~signature=...` for a GET of path?query."""
    rest, link = split_query(query)
    if link:
        raise ValueError("the URL is already signed (or names a ~ parameter of signed links)")
    expires = int(expires_at.timestamp())
    mac = signature(key, "GET", path, rest, expires, by, maker)
    params = [*rest, (EXPIRES, str(expires)), (BY, by), (SIGNATURE, mac)]
    return f"{canonical_path(path)}?{canonical_query(params)}"


def expiry(expires: int) -> datetime:
    return datetime.fromtimestamp(expires, UTC)


class LinkKeys:
    """The signing key: from the settings, or generated once and kept in the database
    so that every server process and every restart agrees."""

    def __init__(self, engine: AsyncEngine, configured: str | None) -> None:
        self._engine = engine
        self._configured = configured

    async def key(self) -> bytes:
        if self._configured:
            return self._configured.encode()
        # Read each time: a rotation takes effect in every process at once. One
        # statement outside a transaction (every export of a table signs its cursor with
        # it, before its first byte); the insert only the first time.
        async with self._engine.connect() as conn:
            driver: Any = await driver_connection(conn)
            found = await driver.fetchval(_READ_KEY, _KEY_NAME)
        if found is not None:
            return bytes(found)
        async with self._engine.begin() as conn:
            await conn.execute(
                insert(secrets_table).values(name=_KEY_NAME, value=secrets.token_bytes(32))
                .on_conflict_do_nothing(index_elements=["name"])
            )
            value = (await conn.execute(
                sa.select(secrets_table.c.value).where(secrets_table.c.name == _KEY_NAME)
            )).scalar_one()
        return bytes(value)

    async def rotate(self) -> None:
        """A new key: every link signed before stops working."""
        async with self._engine.begin() as conn:
            statement = insert(secrets_table).values(name=_KEY_NAME, value=secrets.token_bytes(32))
            await conn.execute(statement.on_conflict_do_update(
                index_elements=["name"],
                set_={"value": statement.excluded.value, "created_at": sa.func.now()},
            ))
