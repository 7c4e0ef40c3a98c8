"""From a request to its principal: a token, a signed link, or the anonymous client."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time

from fastapi import Request

from exporter.access.links import BY, EXPIRES, OPERATOR, SIGNATURE, expiry, signature, split_query
from exporter.access.principal import ADMIN, CHALLENGES, LINK, Principal, anonymous
from exporter.errors import ApiError
from exporter.state import State, get_state

COOKIE = "exporter_token"
# The cookie is the server's own page's credential. It counts for reads only: a form on
# another site could otherwise make a signed-in browser create links or revoke tokens.
COOKIE_METHODS = frozenset({"GET", "HEAD"})


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


async def authenticate(request: Request, st: State, *, page: bool = False) -> Principal:
    """Authorization header, else a signed link, else the `exporter_token` cookie (GET and
    HEAD only), else the anonymous client.

    A bad cookie gets 401 like a bad header, except on the page (`page=True`), which
    then shows the caller as signed out and offers the sign-in form again.
    """
    header = request.headers.get("authorization")
    if header is not None:
        principal = await st.tokens.principal(_credential(header))
        if principal is None:
            raise _bad_credentials("unknown, revoked or expired token")
        return principal
    query = request.scope.get("query_string", b"").decode("latin-1")
    if SIGNATURE in query:
        rest, link = split_query(query)
        if SIGNATURE in link:
            return await _link_principal(request, st, rest, link)
    cookie = request.cookies.get(COOKIE) if request.method in COOKIE_METHODS else None
    if cookie:
        principal = await st.tokens.principal(cookie)
        if principal is not None:
            return principal
        if not page:
            raise _bad_credentials("the exporter_token cookie holds an unknown, revoked or"
                                   " expired token: sign in again")
    client = request.client.host if request.client else "unknown"
    s = st.settings
    return anonymous(client, s.public_datasets, s.public_files)


async def _link_principal(request: Request, st: State, rest: list[tuple[str, str]],
                          link: dict[str, list[str]]) -> Principal:
    if any(len(link.get(k, [])) != 1 for k in (SIGNATURE, EXPIRES, BY)):
        raise ApiError(403, "a signed link needs exactly one signature, expires and by")
    (given,), (expires_text,), (by,) = link[SIGNATURE], link[EXPIRES], link[BY]
    if not expires_text.isdigit() or len(expires_text) > 12:
        raise ApiError(403, "invalid signed link")
    expires = int(expires_text)
    raw_path = request.scope.get("raw_path") or request.url.path.encode()
    expected = signature(await st.links.key(), request.method,
                         raw_path.decode("latin-1"), rest, expires, by)
    if not hmac.compare_digest(expected.encode(), given.encode()):
        raise ApiError(403, "invalid signed link")
    if expires <= time.time():
        raise ApiError(403, "this signed link has expired")
    if by == OPERATOR:
        scopes = frozenset({ADMIN})
    else:
        maker = await st.tokens.by_name(by)
        if maker is None:  # revoked or expired since: its links die with it
            raise ApiError(403, "the token that signed this link is no longer valid")
        scopes = maker.scopes
    key = "link " + hashlib.sha256(given.encode()).hexdigest()[:16]
    return Principal(LINK, by, scopes, link_expires=expiry(expires), limit_key=key)


async def require_admin(request: Request) -> tuple[State, Principal]:
    """The state and principal of a request that must come from an admin."""
    st = get_state(request)
    principal = await authenticate(request, st)
    if not principal.is_admin:
        raise principal.denied()
    return st, principal
