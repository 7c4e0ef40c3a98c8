"""From a request to its principal: a token, a signed link, or the anonymous client."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from dataclasses import replace

from fastapi import Request

from exporter.access.links import (
    INVALID,
    OPERATOR,
    LinkKeys,
    expiry,
    read_link,
    signature,
    split_query,
    token_identity,
)
from exporter.access.principal import ADMIN, CHALLENGES, LINK, Principal, anonymous
from exporter.access.tokens import TokenStore
from exporter.config import Settings
from exporter.errors import ApiError
from exporter.server.prefix import app_path, app_raw_path

COOKIE = "exporter_token"
# The cookie is the server's own page's credential. It counts for reads only: a form on
# another site could otherwise make a signed-in browser create links or revoke tokens.
COOKIE_METHODS = frozenset({"GET", "HEAD"})
# What a link whose maker is not an active token is verified against (token_identity
# never gives it).
NO_MAKER = "no token"


def _cookie_counts(request: Request) -> bool:
    """GET and HEAD; and the page's own DELETE of a prepared download (cancel, delete).

    A browser sends Origin with every DELETE (a fetch, never a form), and another site's
    page can send one only after a CORS preflight; the origin must be this server's own,
    so that not even an origin allowed by EXPORTER_CORS_ORIGINS deletes with the cookie.
    """
    if request.method in COOKIE_METHODS:
        return True
    origin = request.headers.get("origin")
    return (request.method == "DELETE" and app_path(request.scope).startswith("/exports/")
            and origin == f"{request.url.scheme}://{request.url.netloc}")


def _bad_credentials(reason: str) -> ApiError:
    return ApiError(401, reason, headers=CHALLENGES)


def _credential(header: str) -> str:
    """The token in `Bearer TOKEN`, or the password of `Basic base64(user:TOKEN)`."""
    scheme, _, value = header.strip().partition(" ")
    scheme = scheme.lower()
    if scheme == "bearer" and value.strip():
        return value.strip()
    if scheme == "basic":
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise _bad_credentials("malformed Basic credentials") from None
        _, colon, password = decoded.partition(":")
        if colon and password:
            return password
    raise _bad_credentials("use Authorization: Bearer TOKEN, or Basic with the token as password")


async def authenticate(request: Request, tokens: TokenStore, links: LinkKeys,
                       settings: Settings, *, page: bool = False) -> Principal:
    """Authorization header, else a signed link, else the `exporter_token` cookie (GET and
    HEAD, and the page's DELETE /exports/ID), else the anonymous client.

    A bad cookie gets 401 like a bad header, except on the page (`page=True`), which
    then shows the caller as signed out and offers the sign-in form again.
    """
    header = request.headers.get("authorization")
    if header is not None:
        principal = await tokens.principal(_credential(header))
        if principal is None:
            raise _bad_credentials("unknown, revoked or expired token")
        return principal
    query = request.scope.get("query_string", b"").decode("latin-1")
    if "~" in query or "%7" in query:  # ~ as itself or percent-encoded
        rest, link = split_query(query)
        if link:  # even one of the link's parameters: never ignored in silence
            return await _link_principal(request, tokens, links, rest, link)
    cookie = request.cookies.get(COOKIE) if _cookie_counts(request) else None
    if cookie:
        principal = await tokens.principal(cookie)
        if principal is not None:
            return principal
        if not page:
            raise _bad_credentials("the exporter_token cookie holds an unknown, revoked or"
                                   " expired token: sign in again")
    client = request.client.host if request.client else "unknown"
    return anonymous(client, settings.public_datasets, settings.public_files)


async def _link_principal(request: Request, tokens: TokenStore, links: LinkKeys,
                          rest: list[tuple[str, str]], link: dict[str, list[str]]
                          ) -> Principal:
    try:
        params = read_link(link)
    except ValueError as error:
        raise ApiError(403, str(error)) from None
    if params.by == OPERATOR:
        maker, identity = None, OPERATOR
    else:
        maker = await tokens.by_name(params.by)
        # An unknown, revoked or expired maker is verified all the same, against an
        # identity that no token has: the same answer after the same work as a wrong
        # signature, so that links tell nobody which token names exist.
        identity = (NO_MAKER if maker is None or maker.token_id is None
                    else token_identity(maker.token_id))
    # Signed without EXPORTER_ROOT_PATH: valid whether the proxy strips it or not.
    raw_path = app_raw_path(request.scope) or app_path(request.scope).encode()
    expected = signature(await links.key(), request.method, raw_path.decode("latin-1"),
                         rest, params.expires, params.by, identity)
    signed = hmac.compare_digest(expected.encode(), params.signature.encode())
    if not signed or identity == NO_MAKER:
        # Also what a link of a token revoked and then replaced under its name gets: it
        # was signed for the old token's row.
        raise ApiError(403, INVALID)
    if params.expires <= time.time():
        raise ApiError(403, "this signed link has expired")
    if maker is None:
        # Operator links are handed to different people one by one: each has its own budget.
        key = "link " + hashlib.sha256(params.signature.encode()).hexdigest()[:16]
        return Principal(LINK, OPERATOR, frozenset({ADMIN}), link_expires=expiry(params.expires),
                         limit_key=key)
    # A token's links draw on the token's own budget: more links are not more slots.
    return replace(maker, kind=LINK, link_expires=expiry(params.expires))
